"""The toy world through every stage: prepare -> pretrain -> finetune -> evaluate, tiny sizes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.tiny_data import ROOT

MODEL = ["--n_layer=1", "--n_head=2", "--n_kv_head=2", "--n_embd=32", "--ffn_hidden=64", "--vit_width=16",
         "--vit_heads=2"]
SFT = ["--batch_size=8", "--text_rows=2", "--seq_len=96", "--epochs=1", "--log_interval=1", "--eval_interval=5", "--eval_batches=2"]


def run(*cmd):
    result = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    if result.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data, out = root / "data", root / "pretrain"
    run("data/toyworld/prepare.py", f"--out_dir={data}", "--scale=0.02")
    run("pretrain.py", "config/toy.py", *MODEL, f"--data_dir={data}", f"--out_dir={out}", "--seq_len=128",
        "--batch_size=4", "--max_iters=8", "--image_iters=4", "--warmup_iters=2", "--eval_batches=2")
    return data, out / "ckpt.pt"


def finetune(data, ckpt, out, *args):
    return run("finetune.py", "config/toy_sft.py", *SFT, f"--data_dir={data}", f"--init_from={ckpt}",
               f"--out_dir={out}", *args)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in f]


def test_finetune_resume_equals_uninterrupted(pretrained, tmp_path):
    data, ckpt = pretrained
    finetune(data, ckpt, tmp_path / "full")
    finetune(data, ckpt, tmp_path / "resumed", "--stop_at_iter=3")
    finetune(data, "resume", tmp_path / "resumed", "--init_from=resume")
    full = read_log(tmp_path / "full")
    assert len([r for r in full if "loss" in r]) >= 5
    assert read_log(tmp_path / "resumed") == full
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_freezing_keeps_parts_as_pretrained(pretrained, tmp_path):
    data, ckpt = pretrained
    before = torch.load(ckpt, weights_only=False)["model"]
    finetune(data, ckpt, tmp_path / "frozen_vision", "--freeze_vision=True", "--stop_at_iter=2")
    after = torch.load(tmp_path / "frozen_vision" / "ckpt.pt", weights_only=False)["model"]
    for k in before:
        assert torch.equal(before[k], after[k]) == k.startswith("vision.encoder."), k  # the projector trains
    finetune(data, ckpt, tmp_path / "frozen_decoder", "--freeze_decoder=True", "--stop_at_iter=2")
    after = torch.load(tmp_path / "frozen_decoder" / "ckpt.pt", weights_only=False)["model"]
    for k in before:
        assert torch.equal(before[k], after[k]) != k.startswith("vision."), k


def test_evaluate_writes_one_table_next_to_the_checkpoint(pretrained, tmp_path):
    data, ckpt = pretrained
    finetune(data, ckpt, tmp_path / "sft", "--stop_at_iter=2")
    sft = tmp_path / "sft" / "ckpt.pt"
    result = run("evaluate.py", f"--ckpt={sft}", f"--data_dir={data}", "--max_items=6", "--bpb_batches=2")
    report = json.loads((tmp_path / "sft" / "ckpt.pt.eval.json").read_text())
    names = {t["name"] for t in report["tasks"]}
    assert names == {"color_qa", "count_mc", "exists_yn", "knowledge_qa", "arith_mc", "facts_mc", "story_mc"}
    for task in report["tasks"]:
        assert task["n"] == 6 and 0.0 <= task["accuracy"] <= 1.0
        assert task["stable"] == pytest.approx(100 * (task["accuracy"] - task["chance"]))
    vision = [t["stable"] for t in report["tasks"] if t["modality"] == "vision"]
    assert report["vision_avg"] == pytest.approx(sum(vision) / 3)
    assert 0 < report["val_text_bpb"] < 10
    table = (tmp_path / "sft" / "ckpt.pt.eval.md").read_text()
    assert "**vision average**" in table and table.strip() in result.stdout
    only = run("evaluate.py", f"--ckpt={sft}", f"--data_dir={data}", "--max_items=4", "--tasks=count_mc",
               "--val_text=")
    assert "count_mc" in only.stdout and "color_qa" not in only.stdout
