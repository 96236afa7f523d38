"""sweep.py end to end on a miniature study: a tiny toy world, a tiny model, a 2 x 2 grid.
The tests run in file order: the later ones continue the sweep of the first."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.tiny_data import ROOT

TINY_PRETRAIN = ("--n_layer=1", "--n_head=2", "--n_kv_head=2", "--n_embd=32", "--ffn_hidden=64", "--seq_len=64",
                 "--caption_len=20", "--batch_size=4", "--max_iters=10", "--warmup_iters=2", "--image_iters=3",
                 "--log_interval=1", "--eval_interval=100", "--eval_batches=1", "--ckpt_interval=100")
TINY_FINETUNE = ("--epochs=1", "--batch_size=16", "--seq_len=64", "--log_interval=1", "--eval_interval=100",
                 "--eval_batches=1", "--ckpt_interval=100")
RESULTS = ("results.md", "results.csv", "results.json", "results.png", "lr_schedule.png")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("toyworld")
    subprocess.run([sys.executable, "data/toyworld/prepare.py", "--out_dir", str(out), "--scale", "0.02"],
                   cwd=ROOT, check=True, capture_output=True)
    return str(out)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sweep"))


def sweep(data_dir, sweep_dir, fracs, ratios):
    """Runs sweep.py; returns (exit code, its output without the settings it echoes)."""
    result = subprocess.run(
        [sys.executable, "sweep.py", f"--sweep_dir={sweep_dir}", f"--data_dir={data_dir}", f"--fracs={fracs}",
         f"--ratios={ratios}", "--parallel=2", f"--pretrain_args={TINY_PRETRAIN}",
         f"--finetune_args={TINY_FINETUNE}", "--evaluate_args=('--max_items=8',)"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if not line.startswith("config:"))
    return result.returncode, output


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def cell(sweep_dir, frac, ratio):
    return os.path.join(sweep_dir, "seed1337", f"frac{frac:.2f}_ratio{ratio:.2f}")


def file_times(root):
    """Modification times of every file under root but the results, which each run rewrites."""
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files if f not in RESULTS}


@pytest.fixture(scope="module")
def first_run(data_dir, sweep_dir):
    return sweep(data_dir, sweep_dir, (0.0, 0.5), (0.2, 0.5))


def test_every_cell_finishes_and_the_results_have_a_row_each(first_run, sweep_dir):
    code, output = first_run
    assert code == 0, output
    assert output.count("finished seed 1337 text run") == 1  # once for all cells
    for name in RESULTS:
        assert os.path.getsize(os.path.join(sweep_dir, name)) > 0, name
    with open(os.path.join(sweep_dir, "results.json")) as f:
        runs = json.load(f)["runs"]
    assert sorted((r["fraction"], r["ratio"]) for r in runs) == [(0.0, 0.2), (0.0, 0.5), (0.5, 0.2), (0.5, 0.5)]
    for r in runs:
        assert r["status"] == "ok" and r["seed"] == 1337
        for key in ("color_qa", "count_mc", "exists_yn", "arith_mc", "facts_mc", "story_mc", "vision_avg",
                    "text_avg", "overall_avg", "val_text_bpb"):
            assert isinstance(r[key], float), key
    with open(os.path.join(sweep_dir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["seed"] for r in rows] == ["1337"] * 4 + ["mean", "std", "min", "max"] * 4
    with open(os.path.join(sweep_dir, "results.md")) as f:
        table = [line for line in f if re.match(r"\| \d\.\d\d \| \d\.\d\d \| 1337 \|", line)]
    assert len(table) == 4


def test_branches_share_the_text_prefix(first_run, sweep_dir):
    assert first_run[0] == 0, first_run[1]
    text_dir = os.path.join(sweep_dir, "seed1337", "text")
    for frac in (0.0, 0.5):
        at_branch = weights(os.path.join(text_dir, f"ckpt_frac{frac:.2f}.pt"))
        for ratio in (0.2, 0.5):
            # the branch's own checkpoint at its first step = the weights it started from
            branch = os.path.join(cell(sweep_dir, frac, ratio), "pretrain", f"ckpt_frac{frac:.2f}.pt")
            assert_same_weights(weights(branch), at_branch)
        # and the image ratio then made a difference
        ends = [weights(os.path.join(cell(sweep_dir, frac, r), "pretrain", "ckpt.pt")) for r in (0.2, 0.5)]
        assert not torch.equal(ends[0]["lm_head.weight"], ends[1]["lm_head.weight"])


def test_running_again_reuses_every_stage(first_run, data_dir, sweep_dir):
    assert first_run[0] == 0, first_run[1]
    before = file_times(sweep_dir)
    code, output = sweep(data_dir, sweep_dir, (0.0, 0.5), (0.2, 0.5))
    assert code == 0, output
    assert "] start" not in output
    assert output.count("reused") == 1 + 4 * 3  # the text run, then 3 stages per cell
    assert file_times(sweep_dir) == before


def test_a_new_grid_reuses_what_matches_and_a_failed_cell_fails_alone(first_run, data_dir, sweep_dir):
    assert first_run[0] == 0, first_run[1]
    kept = file_times(cell(sweep_dir, 0.5, 0.2))
    # 0.75 is a new fraction: the text run is continued from its 0.5 checkpoint up to 0.75.
    # Ratio 1.5 is out of range: pretrain.py refuses it, so its cells fail.
    code, output = sweep(data_dir, sweep_dir, (0.5, 0.75), (0.2, 1.5))
    assert code != 0
    assert "reused   seed 1337 text run" in output
    assert "finished seed 1337 text run, extended to 0.75" in output
    for stage in ("image phase", "fine-tuning", "evaluation"):
        assert f"reused   seed 1337 frac 0.50 ratio 0.20 {stage}" in output
        assert f"finished seed 1337 frac 0.75 ratio 0.20 {stage}" in output
    assert file_times(cell(sweep_dir, 0.5, 0.2)) == kept
    for frac in (0.5, 0.75):
        log = os.path.join(cell(sweep_dir, frac, 1.5), "pretrain", "stdout.txt")
        assert f"FAILED   seed 1337 frac {frac:.2f} ratio 1.50 image phase" in output
        assert f"see {log}" in output
        assert "image_ratio must lie in [0, 1]" in open(log).read()
    with open(os.path.join(sweep_dir, "results.json")) as f:
        status = {(r["fraction"], r["ratio"]): r["status"] for r in json.load(f)["runs"]}
    assert status[(0.5, 0.2)] == status[(0.75, 0.2)] == "ok"
    assert status[(0.5, 1.5)].startswith("failed") and status[(0.75, 1.5)].startswith("failed")
    # the continued text run is the prefix of the new branch
    text_dir = os.path.join(sweep_dir, "seed1337", "text")
    assert_same_weights(weights(os.path.join(cell(sweep_dir, 0.75, 0.2), "pretrain", "ckpt_frac0.75.pt")),
                        weights(os.path.join(text_dir, "ckpt_frac0.75.pt")))
