"""evaluate.py's scores against the reference implementations' own code, and lm-eval scoring a
checkpoint through harness/lm_eval_model.py.

lm-eval (requirements-test.txt) is imported normally. lmms-eval is installed without its
dependencies (`pip install --no-deps lmms-eval==0.7.3`, as .ci/run does): its task package
imports datasets, loguru and more at import time, so the few pure-Python files we compare with
are loaded one by one, with the imports they make but their scoring never uses stubbed."""

import importlib.util
import json
import os
import random
import sys
import types
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # tests never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import evaluate  # noqa: E402
import inference  # noqa: E402
from common import save_checkpoint  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402
from model import VLM, ModelConfig  # noqa: E402

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def lmms():
    spec = importlib.util.find_spec("lmms_eval")  # finds the package without importing it
    if spec is None:
        pytest.skip("lmms-eval is not installed: pip install --no-deps lmms-eval==0.7.3")
    root = spec.submodule_search_locations[0]
    with pytest.MonkeyPatch.context() as mp:
        for name in ("lmms_eval.tasks", "lmms_eval.tasks._task_utils", "lmms_eval.tasks._task_utils.file_utils"):
            mp.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules["lmms_eval.tasks._task_utils.file_utils"].generate_submission_file = None
        mp.setitem(sys.modules, "loguru", SimpleNamespace(logger=None))

        def load(name, path):
            module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, f"{root}/{path}"))
            mp.setitem(sys.modules, name, module)
            module.__spec__.loader.exec_module(module)
            return module

        processor = load("lmms_eval.tasks._task_utils.vqa_eval_metric", "tasks/_task_utils/vqa_eval_metric.py")
        reference = SimpleNamespace(processor=processor.EvalAIAnswerProcessor(),
                                    contractions=processor.EvalAIAnswerProcessor.CONTRACTIONS,
                                    vqav2=load("lmms_vqav2", "tasks/vqav2/utils.py"),
                                    textvqa=load("lmms_textvqa", "tasks/textvqa/utils.py"),
                                    vizwiz=load("lmms_vizwiz", "tasks/vizwiz_vqa/utils.py"),
                                    pope=load("lmms_pope", "tasks/pope/utils.py"))
    return reference  # the stubs are gone again: other packages look for a real loguru


def answer_strings(contractions):
    """Answers that exercise every rule: real VQA-style answers, every contraction, number words,
    punctuation next to spaces and digits, periods, case, whitespace; and random strings."""
    answers = ["yes", "No", "2", "two", "Two.", "none", "zero", "ten", "eleven", "the dog", "A dog", "an apple",
               "dogs", "dog.", "3.5", "3.", ".5", "e.g. red", "mr. smith", "t-shirt", "t - shirt", "black/white",
               "black / white", "1,000", "1, 000", "1,2,3", "a,b", "yes!", "yes !", "(1)", "[red]", "{x}", "5%",
               "$5", "#1", "50 + 50", "a=b", "x_y", "c++", "back\\slash", "@home", "`tick`", "<3", ">_<", "what?",
               "it's", "man's hat", "dont", "Don't", "cant", "o'clock", "oclock", "Im", "i'm", "ive", "somebody'd",
               "let's", "y'all", "hello\tworld", "hello\nworld", "  padded  ", "", " ", "UPPER CASE", "café",
               "naïve", "日本", "2 dogs and 3 cats", "none of them", "one two three", "the the", ".", "..", "...",
               "." * 40, "1.2.3", "v.2", "a.b.c", "red, white", "red ,white", "10:30", "5'11\"", "\"quoted\""]
    answers += list(contractions) + list(contractions.values())
    rng = random.Random(0)
    alphabet = list("ab19 .,;:/-!?'\"()[]{}=+\\_<>@`#$%&*\t\n") + ["the", "a", "two", "none", "dont", "'s", "an"]
    answers += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(2000)]
    return answers


def test_vqa_normalisation_matches_lmms_eval(lmms):
    p = lmms.processor
    answers = answer_strings(lmms.contractions)
    for a in answers:
        # VQAv2 (lmms-eval's vqav2_process_results and the official evaluator): punctuation, then
        # digits/articles/contractions; TextVQA and VizWiz: the processor as a whole
        vqav2 = p.process_digit_article(p.process_punctuation(a.replace("\n", " ").replace("\t", " ").strip()))
        assert evaluate.vqa_normalize(a) == vqav2, a
        assert evaluate.vqa_normalize(a, evalai_tokenize=True) == p(a), a
    assert len(set(map(evaluate.vqa_normalize, answers))) > 1000  # the random strings are varied


def test_vqa_soft_accuracy_matches_lmms_eval(lmms):
    rng = random.Random(1)
    pool = ["2", "two", "Two.", "2 ", "dog", "the dog", "Dog!", "dogs", "yes", "Yes", "don't", "dont", "3.5",
            "unanswerable"]
    for _ in range(3000):
        refs = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool + ["cat", "2.0"])
        doc = {"question_id": 0, "answers": [{"answer": r, "answer_id": i} for i, r in enumerate(refs)]}
        assert evaluate.vqa_soft_accuracy(pred, refs) == lmms.vqav2.vqav2_process_results(doc, [pred])["exact_match"]
        for module, fn in ((lmms.textvqa, "textvqa_process_results"), (lmms.vizwiz, "vizwiz_vqa_process_results")):
            ref = getattr(module, fn)({"question_id": 0, "answers": list(refs)}, [pred])["exact_match"]
            assert evaluate.OPEN_METRICS["vqa_evalai"](pred, refs) == ref


def test_gqa_exact_match_matches_the_harness_rule():
    # lmms-eval's GQA metric is exact_match with ignore_case and ignore_punctuation, a port of
    # Hugging Face evaluate's exact_match; lm-eval carries the same port (lmms-eval's own module
    # imports sacrebleu at import time).
    from lm_eval.api.metrics import exact_match_hf_evaluate
    rng = random.Random(2)
    pool = ["Yes", "yes.", "no", "The cup", "the cup", "cup", "left", "Left!", "t-shirt", "tshirt", " yes", "yes "]
    for _ in range(500):
        pred, ref = rng.choice(pool), rng.choice(pool)
        expected = exact_match_hf_evaluate([pred], [ref], ignore_case=True, ignore_punctuation=True)["exact_match"]
        assert evaluate.exact_match(pred, [ref]) == expected


def test_pope_metrics_match_lmms_eval(lmms):
    rng = np.random.default_rng(3)
    for n in (1, 7, 50, 300):
        truth = list(rng.choice(["yes", "no"], n))
        said = list(rng.choice(["yes", "no", "maybe"], n, p=[0.5, 0.4, 0.1]))
        ours = evaluate.pope_metrics(said, truth)
        rows = [{"question_id": i, "score": float(s == t), "prediction": s, "ground_truth": t}
                for i, (s, t) in enumerate(zip(said, truth))]
        for key, aggregate in [("accuracy", "pope_aggregate_accuracy"), ("precision", "pope_aggregate_precision"),
                               ("recall", "pope_aggregate_recall"), ("f1", "pope_aggregate_f1_score"),
                               ("yes_ratio", "pope_aggregate_yes_ratio")]:
            assert ours[key] == getattr(lmms.pope, aggregate)(rows), (n, key)


# ------------------------------------------------------------------ lm-eval through the adapter

@pytest.fixture(scope="module")
def tiny():
    """A tiny random decoder over the full cl100k vocabulary, so any text can be scored."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=Tokenizer().vocab_size, block_size=48, n_layer=2, n_head=2, n_kv_head=1,
                         n_embd=32, ffn_hidden=64)
    return VLM(config).eval(), Tokenizer()


ITEMS = [  # what a benchmarks preparer writes: prompt as lm-eval builds it, options without the delimiter
    {"prompt": "Question: what colour is the sky?\nAnswer:", "options": ["blue", "green", "red", "café au lait"],
     "answer": 0},
    {"prompt": "the sky is ", "options": ["blue", "a colour"], "answer": 1},  # trailing space moves over
    {"prompt": "", "options": ["hello world", "goodbye", "hi"], "answer": 2},  # conditioned on <|endoftext|>
    {"prompt": "2 + 2 =", "options": ["4", "5", "22", "four"], "answer": 0},
    {"prompt": "She opened the door and", "options": ["walked in.", "flew away.", "ate it.", "naïvely smiled."],
     "answer": 0},
    {"prompt": "count:1,2,", "options": ["3", "4,5", "three"], "answer": 0},
] * 3


def test_lm_eval_scores_a_checkpoint_as_evaluate_does(tiny, tmp_path):
    from harness import lm_eval_model
    model, tok = tiny
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(str(ckpt), {"stage": "finetune", "config": {}, "model_config": asdict(model.config),
                                "model": model.state_dict()})
    with open(tmp_path / "items.jsonl", "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in ITEMS)
    (tmp_path / "tiny_mc.yaml").write_text(  # a local lm-eval task over the local file: no download
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'items.jsonl'}\n"
        f"  cache_dir: {tmp_path / 'cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: prompt\ndoc_to_choice: options\ndoc_to_target: answer\ntarget_delimiter: \" \"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    out = lm_eval_model.main([f"--ckpt={ckpt}", "--tasks=tiny_mc", f"--include_path={tmp_path}", "--num_fewshot=0",
                              "--batch_size=5", "--device=cpu", "--dtype=float32"])
    assert json.loads((tmp_path / "ckpt.pt.lm_eval.json").read_text())["tiny_mc"]["acc,none"] == \
        out["results"]["tiny_mc"]["acc,none"]
    harness = out["results"]["tiny_mc"]

    task = {"name": "tiny_mc", "modality": "text", "kind": "multiple_choice", "chance": 0.25, "delimiter": " ",
            "items": [dict(item, image=None) for item in ITEMS]}
    ours = evaluate.evaluate_task(task, model, tok, None, "cpu", NO_AUTOCAST, 5, 4)
    assert ours["accuracy"] == harness["acc,none"] and ours["acc_norm"] == harness["acc_norm,none"]
    # and item by item: the same token ids and the same log-likelihoods, bit for bit
    requests = [(*evaluate.encode_pair(tok, item["prompt"], " " + o), None) for item in ITEMS for o in item["options"]]
    lls = inference.loglikelihoods(model, requests, None, tok.eot_id, "cpu", NO_AUTOCAST, 5)
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert [tuple(r[0]) for s in samples for r in s["resps"]] == [(ll, greedy) for ll, greedy in lls]
    picks, start = [], 0
    for item in ITEMS:
        picks.append(evaluate.pick_option([ll for ll, _ in lls[start:start + len(item["options"])]], item["options"]))
        start += len(item["options"])
    assert any(raw != normed for raw, normed in picks)  # the items tell acc and acc_norm apart


def test_encode_pair_is_lm_eval_s(tiny):
    from harness.lm_eval_model import CheckpointLM
    model, tok = tiny
    lm = CheckpointLM(model, tok, "cpu", NO_AUTOCAST, batch_size=4)
    for context, continuation in [("a b ", "c"), ("x\n\n", " y"), ("hello wor", "ld"), ("Answer:", " 42"),
                                  ("tabs\t", "\tand spaces"), ("  ", "only spaces before")]:
        assert evaluate.encode_pair(tok, context, continuation) == lm._encode_pair(context, continuation)


def test_rolling_and_generation_through_the_adapter(tiny):
    from harness.lm_eval_model import CheckpointLM
    model, tok = tiny
    lm = CheckpointLM(model, tok, "cpu", NO_AUTOCAST, batch_size=4)
    text = "the quick brown fox jumps over the lazy dog"
    ids = tok.encode(text)
    # a text shorter than the context window: every token conditioned on all before it, after <|endoftext|>
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(torch.tensor([[tok.eot_id] + ids[:-1]]))[0], -1)
    expected = logp.gather(1, torch.tensor(ids)[:, None]).sum().item()
    assert lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])[0] == pytest.approx(expected, rel=1e-5)
    # a longer one is cut into windows; it must still cost more than its first part alone
    long_text = " ".join([text] * 8)
    assert len(tok.encode(long_text)) > model.config.block_size
    assert lm.loglikelihood_rolling([SimpleNamespace(args=(long_text,))])[0] < expected

    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=6)[0].tolist()
    full = tok.decode(greedy)
    stop = full[len(full) // 2:][:2] or "\n"  # a stop string from the middle of what it generates
    [answer] = lm.generate_until([SimpleNamespace(args=(text, {"until": [stop], "max_gen_toks": 6}))])
    assert answer == full.split(stop)[0]
    with pytest.raises(ValueError, match="greedy"):
        lm.generate_until([SimpleNamespace(args=(text, {"until": [], "do_sample": True, "temperature": 1.0}))])


# ------------------------------------------------------------------ lmms-eval's model interface

@pytest.fixture(scope="module")
def lmms_adapter():
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip("lmms-eval is not installed: pip install --no-deps lmms-eval==0.7.3")
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("loguru") is None:  # lmms_eval.utils imports it; nothing here logs
            mp.setitem(sys.modules, "loguru", SimpleNamespace(logger=None))
        from lmms_eval.api.instance import Instance

        from harness import lmms_eval_model
    return lmms_eval_model.CheckpointLMM, Instance


def test_lmms_eval_adapter_asks_what_evaluate_asks(lmms_adapter):
    from PIL import Image

    from data.images import load_image
    CheckpointLMM, Instance = lmms_adapter
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=Tokenizer().vocab_size, block_size=48, n_layer=1, n_head=2, n_kv_head=2,
                         n_embd=32, ffn_hidden=64, image_size=16, patch_size=8)
    model, tok = VLM(config).eval(), Tokenizer()
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(5)]  # squeezed
    questions = ["is there a cat?", "what colour is it?", "how many?", "is it big?", "where is the dog?"]
    docs = [{"image": p, "question": q, "answer": a} for p, q, a in zip(pictures, questions, ["yes", "no"] * 3)]
    lm = CheckpointLMM(model, tok, "cpu", NO_AUTOCAST, batch_size=2)
    lm.task_dict = {"toy": {"test": docs}}  # lmms-eval's evaluator sets this

    def request(kind, i, second):  # lmms-eval's (context, target or settings, doc_to_visual, doc_id, task, split)
        arguments = (docs[i]["question"], second, lambda doc: [doc["image"]], i, "toy", "test")
        return Instance(request_type=kind, arguments=arguments, idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1})

    store = np.stack([load_image(p, config.image_size) for p in pictures])
    items = [{"image": i, "prompt": q, "options": None, "answer": ["x"]} for i, q in enumerate(questions)]
    ours = evaluate.evaluate_task({"name": "toy", "modality": "vision", "kind": "open", "chance": 0.0, "items": items},
                                  model, tok, store, "cpu", NO_AUTOCAST, 2, 3)
    settings = {"until": ["\n"], "max_new_tokens": 3}
    answers = lm.generate_until([request("generate_until", i, settings) for i in range(5)])
    assert answers == [e["answer"].split("\n")[0] for e in ours["examples"]] and any(answers)

    lls = lm.loglikelihood([request("loglikelihood", i, lambda doc: doc["answer"]) for i in range(5)])
    P = config.tokens_per_image
    expected = inference.loglikelihoods(
        model, [([tok.image_id] * P + tok.encode_prompt(d["question"]), tok.encode(d["answer"]) + [tok.end_id], i)
                for i, d in enumerate(docs)], store, tok.eot_id, "cpu", NO_AUTOCAST, 2)
    assert lls == expected
