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


def test_normalize_answer():
    assert evaluate.normalize_answer("The Two red dogs!") == "2 red dogs"
    assert evaluate.normalize_answer("  A   Blue.\n") == "blue"
    assert evaluate.normalize_answer("three") == "3"


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_matches_the_published_values(matches, expected):
    # VQAv2: 10 annotators; averaging min(1, n/3) over the 10 leave-one-out subsets gives
    # 0.3, 0.6 and 0.9 for 1, 2 and 3 matching annotators.
    references = ["red"] * matches + ["blue"] * (10 - matches)
    assert evaluate.vqa_soft_accuracy("Red", references) == pytest.approx(expected)


def test_exact_match_with_few_references():
    assert evaluate.vqa_soft_accuracy("the red.", ["red"]) == 1.0
    assert evaluate.vqa_soft_accuracy("red", ["blue", "green"]) == 0.0


def test_f1_and_stable_score_are_exact():
    predicted = [True, True, False, False, True]
    actual = [True, False, True, False, True]
    # tp 2, fp 1, fn 1: precision 2/3, recall 2/3
    assert evaluate.f1_score(predicted, actual) == pytest.approx(2 / 3)
    assert evaluate.f1_score([False] * 3, [True] * 3) == 0.0
    assert evaluate.stable_score(0.75, 0.25) == 50.0
    rows = [{"modality": "vision", "stable": 10.0}, {"modality": "vision", "stable": 20.0},
            {"modality": "text", "stable": -6.0}]
    assert evaluate.summarize(rows) == {"vision_avg": 15.0, "text_avg": -6.0, "overall_avg": 8.0}


def test_length_normalisation_can_change_the_pick():
    # option 0: 3 bytes, log-likelihood -3 (-1 per byte); option 1: 12 bytes, -6 (-0.5 per byte)
    assert evaluate.pick_option([-3.0, -6.0], [3, 12]) == (0, 1)


class BigramModel(torch.nn.Module):
    """A model whose log-probabilities are a fixed table: log p(next | current token). Every
    answer it gives can be worked out by hand. It also checks the image bookkeeping."""

    def __init__(self, logp, tokens_per_image, image_id):
        super().__init__()
        self.logp = logp
        self.image_id = image_id
        self.config = SimpleNamespace(tokens_per_image=tokens_per_image)

    def forward(self, idx, targets, images=None):
        n_images = 0 if images is None else images.shape[0]
        assert int((idx == self.image_id).sum()) == n_images * self.config.tokens_per_image
        losses = -self.logp[idx, targets.clamp(min=0)] * (targets != -1)
        return losses.sum() / (targets != -1).sum(), losses

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
    logp = torch.log_softmax(torch.randn(tok.vocab_size, tok.vocab_size) * 3, dim=-1)
    model = BigramModel(logp, tokens_per_image=2, image_id=tok.image_id)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    options = [" red", " blue", " green"]
    items = [{"image": None, "prompt": p, "options": options, "answer": a}
             for p, a in [("what color is it", 0), ("the color is", 1), ("what is the", 2), ("it is", 0)]]
    task = {"name": "t", "modality": "text", "kind": "multiple_choice", "chance": 1 / 3, "items": items}
    result = evaluate.evaluate_task(task, model, tok, None, "cpu", torch.autocast("cpu", enabled=False), 2, 4)
    # the same answer, worked out one token at a time
    picks = [int(np.argmax([sequence_loglikelihood(logp, tok.encode(i["prompt"]), tok.encode(o)) for o in options]))
             for i in items]
    assert result["accuracy"] == np.mean([p == i["answer"] for p, i in zip(picks, items)])
    assert result["stable"] == pytest.approx(100 * (result["accuracy"] - 1 / 3))

    # a table that always prefers "no" after a chat prompt: a yes/no task scores its "no" half
    logp = torch.full((tok.vocab_size, tok.vocab_size), math.log(1e-3))
    logp[tok.assistant_id, tok.encode("no")[0]] = 0.0
    model = BigramModel(logp, tokens_per_image=2, image_id=tok.image_id)
    items = [{"image": i, "prompt": "is it red?", "options": None, "answer": a}
             for i, a in enumerate(["yes", "no", "no", "yes"])]
    task = {"name": "pope", "modality": "vision", "kind": "yes_no", "chance": 0.5, "items": items}
    result = evaluate.evaluate_task(task, model, tok, images, "cpu", torch.autocast("cpu", enabled=False), 3, 4)
    assert result["accuracy"] == 0.5 and result["f1"] == 0.0 and result["yes_ratio"] == 0.0
    assert result["stable"] == 0.0


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
    table = evaluate.markdown_table(rows, evaluate.summarize(rows), 1.2345)
    assert "| a | vision | open | 3 | 50.0 | 25.0 | +25.0 |" in table
    assert "| b | text | multiple_choice | 3 | 25.0 (norm 50.0) | 25.0 | +0.0 |" in table
    assert "**overall** | | | | | | **+12.5**" in table and "1.2345 bits per byte" in table
