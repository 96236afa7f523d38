"""evaluate.py's scoring, on cases whose answers are known in advance."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate
from data.errors import UserError
from data.tokenizer import Tokenizer
from tests.tiny_data import ROOT

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


def test_final_answer_scores_the_conclusion_only():
    # knowledge_qa's answers say a colour, then yes or no: only the yes or no counts
    assert evaluate.final_answer("it is red. yes", ["it is yellow. yes"]) == 1.0
    assert evaluate.final_answer("it is yellow. no", ["it is yellow. yes"]) == 0.0
    assert evaluate.final_answer("Yes", ["it is yellow. yes"]) == 1.0  # no reasoning, the same conclusion
    assert evaluate.final_answer("it is yellow.", ["it is yellow. yes"]) == 0.0  # no conclusion


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
    assert evaluate.summarize(rows) == {"vision_avg": 15.0, "text_avg": -6.0, "knowledge_avg": None,
                                        "vision_knowledge_avg": 15.0, "overall_avg": 8.0}
    # a knowledge task joins its own average and the picture tasks' one; overall stays vision + text
    summary = evaluate.summarize(rows + [{"modality": "knowledge", "stable": 36.0}])
    assert summary == {"vision_avg": 15.0, "text_avg": -6.0, "knowledge_avg": 36.0,
                       "vision_knowledge_avg": 22.0, "overall_avg": 8.0}


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
    # every item's prediction and score, in item order
    assert [(p["index"], p["prediction"], p["score"]) for p in result["predictions"]] == [
        (0, "red", 1.0), (1, "red", 0.0), (2, "red", 1.0)]
    # the commonest reference, always given: "red" once, "blue" once, "the red" once (first seen wins)
    assert (result["majority_answer"], result["majority"]) == ("red", pytest.approx(2 / 3))


def test_majority_baseline_and_answer_types_are_exact():
    open_task = {"kind": "open", "metric": "exact_match"}
    items = [{"answer": a} for a in (["Red"], ["red", "blue"], ["blue"], ["green"], ["red"])]
    assert evaluate.majority_baseline(open_task, items) == ("red", 3 / 5)  # case-blind, once per item
    assert evaluate.majority_baseline({"kind": "yes_no"}, [{"answer": a} for a in "yes no no no".split()]) == ("no", 0.75)
    same = ["cat", "dog", "cow"]
    mc = [{"options": same, "answer": a} for a in (2, 2, 0, 1, 2)]
    assert evaluate.majority_baseline({"kind": "multiple_choice"}, mc) == ("cow", 3 / 5)
    mc[0]["options"] = ["a", "b", "c"]  # options that vary: the position most often right
    assert evaluate.majority_baseline({"kind": "multiple_choice"}, mc) == ("option 3", 3 / 5)


def test_predictions_carry_ids_and_answer_types_and_break_down_by_them(tok):
    logp = torch.full((tok.vocab_size, tok.vocab_size), math.log(1e-3))
    logp[tok.assistant_id, tok.encode("no")[0]] = 0.0  # always "no"
    model = BigramModel(logp, tokens_per_image=2, image_id=tok.image_id)
    answers = [("yes", "colour"), ("no", "colour"), ("no", "count"), ("yes", "count"), ("yes", "count")]
    items = [{"id": f"q{i}", "image": 0, "prompt": "is it red?", "answer": a, "answer_type": t}
             for i, (a, t) in enumerate(answers)]
    task = {"name": "yn", "modality": "vision", "kind": "yes_no", "chance": 0.5, "items": items}
    result = evaluate.evaluate_task(task, model, tok, np.zeros((1, 8, 8, 3), np.uint8), "cpu",
                                    torch.autocast("cpu", enabled=False), 2, 4)
    assert result["predictions"][3] == {"index": 3, "id": "q3", "prediction": "no", "answer": "yes", "score": 0.0,
                                        "answer_type": "count"}
    assert (result["accuracy"], result["majority_answer"], result["majority"]) == (0.4, "yes", 0.6)
    assert result["answer_types"] == {
        "colour": {"n": 2, "accuracy": 0.5, "majority_answer": "yes", "majority": 0.5},  # a tie: first seen
        "count": {"n": 3, "accuracy": 1 / 3, "majority_answer": "yes", "majority": 2 / 3}}


def test_markdown_table_lists_every_task_and_the_averages():
    rows = [{"name": "a", "modality": "vision", "kind": "open", "n": 3, "accuracy": 0.5, "chance": 0.25,
             "stable": 25.0, "majority_answer": "red", "majority": 1 / 3,
             "answer_types": {"colour": {"n": 2, "accuracy": 0.5, "majority_answer": "red", "majority": 0.5}}},
            {"name": "b", "modality": "text", "kind": "multiple_choice", "n": 3, "accuracy": 0.25,
             "acc_norm": 0.5, "chance": 0.25, "stable": 0.0, "majority_answer": "option 2", "majority": 2 / 3}]
    pope = {"name": "p", "modality": "vision", "kind": "yes_no", "n": 4, "chance": 0.5, "stable": 25.0,
            "majority_answer": "no", "majority": 0.5,
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
    assert "**overall (vision + text)** | | | | | | **+12.5**" in table and "1.2345 bits per byte" in table
    assert "knowledge average" not in table  # no knowledge task, no row for it
    assert "| a | red | 33.3 | 25.0 | 50.0 |" in table and "| b | option 2 | 66.7 | 25.0 | 25.0 |" in table
    assert "| a | colour | 2 | red | 50.0 | 50.0 |" in table


# --------------------------------------------- bad tasks: one error line at start-up, nothing scored

def good_task():
    return {"name": "t", "modality": "vision", "kind": "open", "chance": 0.0,
            "items": [{"image": i, "prompt": "what color is it?", "answer": ["red"]} for i in range(2)]}


def choice_task(options, answer):
    return dict(good_task(), kind="multiple_choice", chance=0.5, items=[
        {"image": 0, "prompt": "what color is it?", "options": options, "answer": answer}])


def write_raw(path, data):
    path.write_bytes(data)


# (what is wrong, how to make it so: task -> file contents or a change to the folder, the error's words)
BAD_INPUTS = [
    ("malformed JSON", lambda d: write_raw(d / "eval_t.json", b'{"name": "t", "items": ['), "not a valid JSON task file"),
    ("a list, not an object", lambda d: write_json(d, [good_task()]), "a task is a JSON object"),
    ("no modality", lambda d: write_json(d, {k: v for k, v in good_task().items() if k != "modality"}),
     "modality None (expected 'vision', 'text' or 'knowledge')"),
    ("an unknown kind", lambda d: write_json(d, dict(good_task(), kind="essay")), "unknown kind 'essay'"),
    ("an unknown metric", lambda d: write_json(d, dict(good_task(), metric="bleu")), "unknown metric 'bleu'"),
    ("no items", lambda d: write_json(d, dict(good_task(), items=[])), "no items to score"),
    ("a yes/no task with no items", lambda d: write_json(d, dict(good_task(), kind="yes_no", items=[])),
     "no items to score"),
    ("an image index out of range", lambda d: write_json(d, dict(good_task(), items=[
        {"image": 2, "prompt": "what color is it?", "answer": ["red"]}])), "item 0: image 2 is not a row of its 2"),
    ("empty options", lambda d: write_json(d, choice_task([], 0)), "item 0: options []"),
    ("an answer beyond the options", lambda d: write_json(d, choice_task(["red", "blue"], 2)),
     "item 0: answer 2 is not the index of one of its 2 options"),
    ("a word outside the vocabulary", lambda d: write_json(d, dict(good_task(), items=[
        {"image": 0, "prompt": "what color is the teal one?", "answer": ["red"]}])), "item 0: text 'what color is the"),
    ("a garbage images file", lambda d: write_raw(d / "eval_images.npy", b"garbage, not numpy"),
     "eval_images.npy: not a .npy array of pictures"),
    ("float32 pictures", lambda d: np.save(d / "eval_images.npy", np.zeros((2, 16, 16, 3), np.float32)),
     "eval_images.npy: holds float32 [2, 16, 16, 3], expected uint8"),
    ("pictures of the wrong size", lambda d: np.save(d / "eval_images.npy", np.zeros((2, 32, 32, 3), np.uint8)),
     "eval_images.npy: pictures are 32x32, the model expects 16x16"),
    ("no images file", lambda d: (d / "eval_images.npy").unlink(), "eval_images.npy: no such picture file"),
]


def write_json(folder, obj):
    (folder / "eval_t.json").write_text(json.dumps(obj))


@pytest.fixture
def good_eval(tmp_path, tok):
    """A tiny checkpoint in the WORDS vocabulary and a folder with one good task."""
    from dataclasses import asdict

    from common import save_checkpoint
    from model import VLM, ModelConfig
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16,
                         ffn_hidden=32, image_size=16, patch_size=8, image_token_id=tok.image_id)
    # a fine-tuned checkpoint, as evaluate.py expects (a pretraining one needs its whole config)
    save_checkpoint(str(tmp_path / "ckpt.pt"), {"config": {}, "stage": "finetune", "model_config": asdict(config),
                                                "model": VLM(config).state_dict(), "compact_vocab": tok.compact_vocab})
    data = tmp_path / "data"
    data.mkdir()
    write_json(data, good_task())
    np.save(data / "eval_images.npy", np.zeros((2, 16, 16, 3), np.uint8))
    return tmp_path / "ckpt.pt", data


def run_evaluate(ckpt, data):
    return evaluate.main([f"--ckpt={ckpt}", f"--data_dir={data}", "--val_text=", "--device=cpu", "--dtype=float32",
                          "--max_new_tokens=2"])


def test_a_good_task_is_scored_and_its_predictions_kept(good_eval):
    ckpt, data = good_eval
    report = run_evaluate(ckpt, data)
    assert report["tasks"][0]["n"] == 2 and report["tasks"][0]["majority"] == 1.0
    lines = open(f"{ckpt}.eval.t.jsonl").read().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1]
    assert "predictions" not in report["tasks"][0]  # in the JSONL, not in the report


def test_a_knowledge_task_is_scored_after_its_picture_and_reported_in_its_averages(good_eval):
    ckpt, data = good_eval
    options = ["red", "blue", "green"]
    knowledge = {"name": "k", "modality": "knowledge", "kind": "multiple_choice", "chance": 1 / 3,
                 "items": [{"image": i, "prompt": "what color is it?", "options": options, "answer": i}
                           for i in range(2)]}
    (data / "eval_k.json").write_text(json.dumps(knowledge))
    (data / "eval_v.json").write_text(json.dumps(dict(knowledge, name="v", modality="vision")))
    report = run_evaluate(ckpt, data)
    k, t, v = report["tasks"]  # in name order
    # scored exactly as the same items asked as a vision task: the picture, the chat template, no delimiter
    assert (k["modality"], v["modality"], k["accuracy"], k["acc_norm"]) == ("knowledge", "vision", v["accuracy"],
                                                                          v["acc_norm"])
    assert open(f"{ckpt}.eval.k.jsonl").read() == open(f"{ckpt}.eval.v.jsonl").read()
    assert report["knowledge_avg"] == k["stable"]
    assert report["vision_knowledge_avg"] == pytest.approx((k["stable"] + t["stable"] + v["stable"]) / 3)
    assert report["vision_avg"] == pytest.approx((t["stable"] + v["stable"]) / 2)
    assert report["overall_avg"] == report["vision_avg"]  # no text task here; knowledge is not in it
    table = open(f"{ckpt}.eval.md").read()
    assert f"| **knowledge average** | | | | | | **{k['stable']:+.1f}** |" in table
    assert f"| **vision + knowledge average** | | | | | | **{report['vision_knowledge_avg']:+.1f}** |" in table


@pytest.mark.parametrize("problem, make, words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_a_bad_task_stops_evaluate_before_any_scoring_with_one_line(good_eval, problem, make, words):
    ckpt, data = good_eval
    make(data)
    with pytest.raises(UserError) as error:
        run_evaluate(ckpt, data)
    message = str(error.value)
    assert words in message and "\n" not in message
    assert str(data / ("eval_images.npy" if "images" in words else "eval_t.json")) in message  # names the file
    assert not os.path.exists(f"{ckpt}.eval.json") and not os.path.exists(f"{ckpt}.eval.t.jsonl")


def test_a_missing_data_dir_is_one_line_naming_the_setting(good_eval):
    ckpt, data = good_eval
    with pytest.raises(UserError, match=f"data_dir {data / 'absent'}: no such folder"):
        run_evaluate(ckpt, data / "absent")


def test_the_command_line_turns_a_bad_task_into_exit_status_1_and_one_error_line(good_eval):
    # in-process above; here once as a user runs it: report_user_errors turns any of them into this
    ckpt, data = good_eval
    write_json(data, dict(good_task(), kind="essay"))
    result = subprocess.run([sys.executable, "evaluate.py", f"--ckpt={ckpt}", f"--data_dir={data}", "--val_text="],
                            cwd=ROOT, capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert errors == [f"error: {data / 'eval_t.json'}: unknown kind 'essay' (expected one of multiple_choice, open, "
                      "yes_no)"]
