"""evaluate.py's scoring, on cases whose answers are known in advance."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate
from data.tokenizer import Tokenizer

WORDS = ["red", "blue", "green", "yes", "no", "one", "two", "three", "what", "color", "is", "it", "?", "the",
         " red", " blue", " green", " one", " two", " three", " is", " it", " what", " color", " the"]


def test_vqa_normalize_follows_the_official_rules():
    # worked out by hand from the VQA evaluator's rules (tests/test_harness.py runs lmms-eval's copy)
    assert evaluate.vqa_normalize("The Two red dogs!") == "2 red dogs"  # "!" touches no space: a space
    assert evaluate.vqa_normalize("  A   Blue.\n") == "blue"
    assert evaluate.vqa_normalize("none") == "0" and evaluate.vqa_normalize("dont") == "don't"
    assert evaluate.vqa_normalize("3.5") == "3.5"  # a decimal point stays
    assert evaluate.vqa_normalize("black-and-white") == "black and white"
    assert evaluate.vqa_normalize("black - white") == "black white"  # "-" touches a space: deleted
    assert evaluate.vqa_normalize("1,000 (approx)") == "1000 approx"  # digit,digit: punctuation deleted
    assert evaluate.vqa_normalize("man's hat") == "man's hat"
    assert evaluate.vqa_normalize("man's hat", evalai_tokenize=True) == "man 's hat"
    assert evaluate.vqa_normalize("Yes, it is?", evalai_tokenize=True) == "yes it is"
    assert evaluate.vqa_normalize("." * 40) == "." * 8  # the official code drops at most 32 periods


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_matches_the_published_values(matches, expected):
    # VQAv2: 10 annotators; averaging min(1, n/3) over the 10 leave-one-out subsets gives
    # 0.3, 0.6 and 0.9 for 1, 2 and 3 matching annotators.
    references = ["red"] * matches + ["blue"] * (10 - matches)
    assert evaluate.vqa_soft_accuracy("Red", references) == pytest.approx(expected)


def test_exact_match_with_few_references():
    assert evaluate.vqa_soft_accuracy("the red.", ["red"]) == 1.0
    assert evaluate.vqa_soft_accuracy("red", ["blue", "green"]) == 0.0
    # GQA's rule: case and ASCII punctuation ignored, nothing else (articles and spaces count)
    assert evaluate.exact_match("Yes.", ["yes"]) == 1.0 and evaluate.exact_match("the cup", ["cup"]) == 0.0


def test_pope_metrics_and_stable_score_are_exact():
    said = ["yes", "yes", "no", "no", "yes", "maybe"]
    truth = ["yes", "no", "yes", "no", "yes", "yes"]
    # tp 2, fp 1, fn 1 ("maybe" is wrong, and neither a false negative nor a false positive)
    m = evaluate.pope_metrics(said, truth)
    assert m["accuracy"] == 3 / 6 and m["precision"] == 2 / 3 and m["recall"] == 2 / 3
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 4 / 6 and m["said_yes"] == 3 / 6
    assert evaluate.pope_metrics(["no"] * 3, ["yes"] * 3)["f1"] == 0.0
    assert evaluate.stable_score(0.75, 0.25) == 50.0
    rows = [{"modality": "vision", "stable": 10.0}, {"modality": "vision", "stable": 20.0},
            {"modality": "text", "stable": -6.0}]
    assert evaluate.summarize(rows) == {"vision_avg": 15.0, "text_avg": -6.0, "overall_avg": 8.0}


def test_length_normalisation_can_change_the_pick():
    # option 0: 3 characters, log-likelihood -3 (-1 per character); option 1: 12, -6 (-0.5 per character)
    assert evaluate.pick_option([-3.0, -6.0], ["red", "twelve chars"]) == (0, 1)
    # characters, not bytes: "é" is one character (two bytes)
    assert evaluate.pick_option([-2.0, -2.2], ["éé", "abc"]) == (0, 1)


def test_pairs_are_encoded_together_and_split(tok):
    # trailing whitespace moves to the continuation; an empty context becomes <|endoftext|>
    assert evaluate.encode_pair(tok, "what is ", "red") == (tok.encode("what is"), tok.encode(" red"))
    assert evaluate.encode_pair(tok, "", " red") == ([tok.eot_id], tok.encode(" red"))


class BigramModel(torch.nn.Module):
    """A model whose log-probabilities are a fixed table: log p(next | current token). Every
    answer it gives can be worked out by hand. It also checks the image bookkeeping."""

    def __init__(self, logp, tokens_per_image, image_id):
        super().__init__()
        self.logp = logp
        self.image_id = image_id
        self.config = SimpleNamespace(tokens_per_image=tokens_per_image, block_size=64)
        # hidden state = one-hot current token, so the head's logits are the table's row
        self.lm_head = torch.nn.Linear(len(logp), len(logp), bias=False)
        self.lm_head.weight.data = logp.T.clone()

    def hidden_states(self, idx, images=None):
        n_images = 0 if images is None else images.shape[0]
        assert int((idx == self.image_id).sum()) == n_images * self.config.tokens_per_image
        return torch.nn.functional.one_hot(idx, len(self.logp)).float()

    def generate(self, idx, images=None, max_new_tokens=8, stop_id=None):
        out, token = [], idx[:, -1]
        for _ in range(max_new_tokens):
            token = self.logp[token].argmax(-1)
            out.append(token)
        return torch.stack(out, 1)


@pytest.fixture
def tok():
    return Tokenizer(Tokenizer.cl100k_ids_of(WORDS))


def sequence_loglikelihood(logp, context, continuation):
    seq = context + continuation
    return sum(logp[seq[i - 1], seq[i]].item() for i in range(len(context), len(seq)))


def test_multiple_choice_and_yes_no_pick_the_highest_likelihood(tok):
    torch.manual_seed(0)
    logp = torch.randn(tok.vocab_size, tok.vocab_size) * 3
    is_, red, blue, green = (tok.encode(w)[0] for w in [" is", " red", " blue", " green"])
    logp[is_, [red, blue, green]] = torch.tensor([0.0, -5.0, -0.5])  # after "is": red, but green per character
    logp = torch.log_softmax(logp, dim=-1)
    model = BigramModel(logp, tokens_per_image=2, image_id=tok.image_id)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    options = ["red", "blue", "green"]  # lm-eval's contract: no delimiter in the options
    items = [{"image": None, "prompt": p, "options": options, "answer": a}
             for p, a in [("what color is it", 0), ("the color is", 1), ("", 1), ("what is the", 2), ("it is", 0)]]
    task = {"name": "t", "modality": "text", "kind": "multiple_choice", "chance": 1 / 3, "delimiter": " ",
            "items": items}
    result = evaluate.evaluate_task(task, model, tok, None, "cpu", torch.autocast("cpu", enabled=False), 2, 4)
    # the same answers, worked out one token at a time; the empty prompt (batched with another
    # item) conditions on <|endoftext|>
    lls = [[sequence_loglikelihood(logp, tok.encode(i["prompt"]) or [tok.eot_id], tok.encode(" " + o))
            for o in options] for i in items]
    picks = [int(np.argmax(ll)) for ll in lls]
    normed = [int(np.argmax(np.array(ll) / [3, 4, 5])) for ll in lls]
    assert result["accuracy"] == np.mean([p == i["answer"] for p, i in zip(picks, items)])
    assert result["acc_norm"] == np.mean([p == i["answer"] for p, i in zip(normed, items)])
    assert picks != normed  # this table makes the two differ, so both are checked
    assert result["stable"] == pytest.approx(100 * (result["accuracy"] - 1 / 3))

    # a table that always prefers "no" after a chat prompt: a yes/no task scores its "no" half
    logp = torch.full((tok.vocab_size, tok.vocab_size), math.log(1e-3))
    logp[tok.assistant_id, tok.encode("no")[0]] = 0.0
    model = BigramModel(logp, tokens_per_image=2, image_id=tok.image_id)
    items = [{"image": i, "prompt": "is it red?", "options": None, "answer": a, "category": c}
             for i, (a, c) in enumerate([("yes", "random"), ("no", "random"), ("no", "adversarial"), ("no", "random")])]
    task = {"name": "pope", "modality": "vision", "kind": "yes_no", "chance": 0.5, "items": items}
    result = evaluate.evaluate_task(task, model, tok, images, "cpu", torch.autocast("cpu", enabled=False), 3, 4)
    assert result["accuracy"] == 0.75 and result["f1"] == 0.0 and result["said_yes"] == 0.0
    assert result["yes_ratio"] == 0.25  # lmms-eval's yes_ratio: the ground truth's share of "yes"
    assert result["categories"]["random"]["n"] == 3 and result["categories"]["random"]["accuracy"] == 2 / 3
    assert result["categories"]["adversarial"]["accuracy"] == 1.0
    assert result["stable"] == 25.0


def test_open_answers_are_generated_and_compared(tok):
    logp = torch.full((tok.vocab_size, tok.vocab_size), -10.0)
    red, end = tok.encode("red")[0], tok.end_id
    logp[tok.assistant_id, red] = 0.0  # answer "red", then stop
    logp[red, end] = 0.0
    model = BigramModel(logp, tokens_per_image=2, image_id=tok.image_id)
    images = np.zeros((3, 8, 8, 3), np.uint8)
    items = [{"image": 0, "prompt": "what color is it?", "options": None, "answer": ["red"]},
             {"image": 1, "prompt": "what color?", "options": None, "answer": ["blue"]},
             {"image": 2, "prompt": "what color is the?", "options": None, "answer": ["the red"]}]
    task = {"name": "qa", "modality": "vision", "kind": "open", "chance": 1 / 6, "items": items}
    result = evaluate.evaluate_task(task, model, tok, images, "cpu", torch.autocast("cpu", enabled=False), 2, 4)
    assert [e["answer"] for e in result["examples"]] == ["red"] * 3
    assert result["accuracy"] == pytest.approx(2 / 3)


def test_markdown_table_lists_every_task_and_the_averages():
    rows = [{"name": "a", "modality": "vision", "kind": "open", "n": 3, "accuracy": 0.5, "chance": 0.25,
             "stable": 25.0},
            {"name": "b", "modality": "text", "kind": "multiple_choice", "n": 3, "accuracy": 0.25,
             "acc_norm": 0.5, "chance": 0.25, "stable": 0.0}]
    pope = {"name": "p", "modality": "vision", "kind": "yes_no", "n": 4, "chance": 0.5, "stable": 25.0,
            "accuracy": 0.75, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "yes_ratio": 0.5, "said_yes": 0.25,
            "categories": {"random": {"n": 2, "accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0,
                                      "yes_ratio": 0.5, "said_yes": 0.5}}}
    table = evaluate.markdown_table(rows + [pope], evaluate.summarize(rows), 1.2345)
    assert "| a | vision | open | 3 | 50.0 | 25.0 | +25.0 |" in table
    assert "| p | vision | yes_no | 4 | 75.0 (F1 66.7) | 50.0 | +25.0 |" in table
    assert "| p | all | 4 | 75.0 | 100.0 | 50.0 | 66.7 | 50.0 | 25.0 |" in table
    assert "| p | random | 2 | 100.0 | 100.0 | 100.0 | 100.0 | 50.0 | 50.0 |" in table
    assert "yes ratio = share of \"yes\" in the ground truth" in table
    assert "| b | text | multiple_choice | 3 | 25.0 (norm 50.0) | 25.0 | +0.0 |" in table
    assert "**overall** | | | | | | **+12.5**" in table and "1.2345 bits per byte" in table
