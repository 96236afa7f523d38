"""FSDP2 (parallel="fsdp") on the CPU with gloo: two ranks sharding the model train as one process
does, a resume under FSDP continues exactly, and checkpoints move between DDP and FSDP.

Tolerances: one process and two ranks add the same gradients in a different order (the
ranks' halves are summed by the reduce-scatter), so float32 results agree to rounding, not
bit for bit: losses to 1e-5 relative, weights to 1e-5 absolute after 10 steps. A resume under
the same mode is bit-identical.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.tiny_data import ROOT, make_tiny_dataset

TINY = ["--n_layer=2", "--n_head=2", "--n_kv_head=2", "--n_embd=32", "--ffn_hidden=64", "--seq_len=64",
        "--caption_len=20", "--batch_size=2", "--grad_accum=2", "--max_iters=6", "--warmup_iters=2",
        "--image_iters=4", "--vision_start_frac=0.5", "--image_ratio=0.5", "--eval_interval=5", "--eval_batches=2",
        "--log_interval=1", "--ckpt_interval=100", "--dtype=float32", "--vit_depth=1", "--vit_width=16",
        "--vit_heads=2"]


def pretrain(data_dir, out_dir, *args, ranks=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    result = subprocess.run([*launcher, "pretrain.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [(r["iter"], r.get("loss"), r.get("val_text_loss", r.get("val_chat_loss"))) for r in map(json.loads, f)]


def checkpoint(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=False)


def assert_close_runs(a, b):
    for (ia, la, va), (ib, lb, vb) in zip(losses(a), losses(b), strict=True):
        assert ia == ib
        for x, y in ((la, lb), (va, vb)):
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=1e-5)), (ia, x, y)
    wa, wb = checkpoint(a)["model"], checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    (root / "data").mkdir()
    data = make_tiny_dataset(root / "data")
    pretrain(data, root / "one")
    assert "on 2 rank(s), cpu, fsdp" in pretrain(data, root / "fsdp", "--parallel=fsdp", ranks=2)
    return data, root


def test_two_fsdp_ranks_train_as_one_process(runs):
    data, root = runs
    assert_close_runs(root / "one", root / "fsdp")
    state = checkpoint(root / "fsdp")
    # one file in the usual format: full tensors keyed by name, the optimizer's moments too
    assert state["model"]["wte.weight"].shape == checkpoint(root / "one")["model"]["wte.weight"].shape
    assert state["optimizer"]["state"]["blocks.0.attn.qkv.weight"]["exp_avg"].shape == (3 * 32, 32)


def test_a_resume_under_fsdp_is_exact(runs, tmp_path):
    data, root = runs
    pretrain(data, tmp_path, "--parallel=fsdp", "--stop_at_iter=4", ranks=2)
    pretrain(data, tmp_path, "--parallel=fsdp", "--init_from=resume", ranks=2)
    assert losses(tmp_path) == losses(root / "fsdp")
    a, b = checkpoint(tmp_path)["model"], checkpoint(root / "fsdp")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("first, then", [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_a_checkpoint_resumes_under_the_other_mode(runs, tmp_path, first, then):
    data, root = runs
    pretrain(data, tmp_path, f"--parallel={first}", "--stop_at_iter=4", ranks=2)
    pretrain(data, tmp_path, f"--parallel={then}", "--init_from=resume", ranks=2)
    assert_close_runs(tmp_path, root / "one")


def test_finetuning_under_fsdp_equals_one_process(tmp_path):
    def run(script, *args, ranks=1):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
            if ranks > 1 else [sys.executable]
        result = subprocess.run([*launcher, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    data = tmp_path / "data"
    run("data/toyworld/prepare.py", f"--out_dir={data}", "--scale=0.02")
    run("pretrain.py", *TINY, "--vit_depth=0", f"--data_dir={data}", f"--out_dir={tmp_path / 'pt'}")
    sft = ["finetune.py", f"--data_dir={data}", f"--init_from={tmp_path / 'pt' / 'ckpt.pt'}", "--batch_size=4",
           "--seq_len=0", "--text_rows=2", "--grad_accum=2", "--epochs=1", "--log_interval=1", "--eval_interval=3",
           "--eval_batches=2", "--dtype=float32", "--freeze_vision=True", "--stop_at_iter=6"]
    run(*sft, f"--out_dir={tmp_path / 'one'}")
    run(*sft, f"--out_dir={tmp_path / 'fsdp'}", "--parallel=fsdp", ranks=2)
    assert_close_runs(tmp_path / "one", tmp_path / "fsdp")
