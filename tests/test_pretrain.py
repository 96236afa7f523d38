"""pretrain.py end to end on a tiny model: resume, branching, DDP, the image start, bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from common import compile_and_wrap
from configurator import apply_overrides
from data.errors import UserError
from tests.tiny_data import ROOT, make_tiny_dataset

TINY = ["--n_layer=1", "--n_head=2", "--n_kv_head=2", "--n_embd=32", "--ffn_hidden=64", "--seq_len=64",
        "--vit_width=16", "--vit_heads=2", "--caption_len=20", "--batch_size=4", "--max_iters=10",
        "--warmup_iters=2", "--learning_rate=1e-2", "--min_lr=1e-3", "--log_interval=1", "--eval_interval=5",
        "--eval_batches=2", "--ckpt_interval=100", "--image_ratio=0.5"]
TIMING_KEYS = ("tokens_per_s", "mfu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(make_tiny_dataset(tmp_path_factory.mktemp("data")))


def pretrain(data_dir, out_dir, *args, nproc=1, check=True):
    cmd = [sys.executable, "pretrain.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "pretrain.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd + TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *args],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def read_log(out_dir, from_iter=0):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records if r["iter"] >= from_iter]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def continuous_run(data_dir, tmp_path_factory):
    """Text for 5 steps, then 4 image steps; keeps the text-only checkpoint at 0.5."""
    out = tmp_path_factory.mktemp("continuous")
    pretrain(data_dir, out, "--vision_start_frac=0.5", "--image_iters=4", "--save_fracs=(0.5,)")
    return out


def test_loss_falls_and_images_start_at_the_start_step(continuous_run):
    log = [r for r in read_log(continuous_run) if "loss" in r]
    assert [r["iter"] for r in log] == list(range(9))
    # step 5 is the first image step
    assert all(r["image_share"] == 0 for r in log if r["iter"] < 5)
    assert log[5]["image_share"] > 0 and log[5]["caption_loss"] is not None
    assert all(r["caption_loss"] is None for r in log[:5])
    assert log[4]["text_loss"] < log[0]["text_loss"]


def test_validation_also_scores_captions_under_other_pictures(continuous_run):
    evals = [r for r in read_log(continuous_run) if "val_caption_loss" in r]
    assert evals
    for r in evals:
        assert math.isfinite(r["val_caption_loss_swapped"])
        # each caption under its neighbour's picture: other image tokens, another loss
        assert r["val_caption_loss_swapped"] != r["val_caption_loss"]


def test_resume_equals_uninterrupted(data_dir, continuous_run, tmp_path):
    first = pretrain(data_dir, tmp_path, "--vision_start_frac=0.5", "--image_iters=4", "--stop_at_iter=7")
    assert "iter 6:" in first.stdout and "iter 7:" not in first.stdout
    pretrain(data_dir, tmp_path, "--vision_start_frac=0.5", "--image_iters=4", "--init_from=resume")
    assert read_log(tmp_path) == read_log(continuous_run)  # every loss, bit for bit
    assert_same_weights(weights(tmp_path / "ckpt.pt"), weights(continuous_run / "ckpt.pt"))


def test_resume_mid_log_window_logs_the_same_averages(data_dir, tmp_path):
    args = ["--vision_start_frac=0.5", "--image_iters=4", "--log_interval=4"]
    pretrain(data_dir, tmp_path / "full", *args)
    pretrain(data_dir, tmp_path / "resumed", *args, "--stop_at_iter=6")
    pretrain(data_dir, tmp_path / "resumed", *args, "--init_from=resume")
    assert read_log(tmp_path / "resumed") == read_log(tmp_path / "full")


def test_branch_from_text_checkpoint_equals_continuous(data_dir, continuous_run, tmp_path):
    text_run, branch = tmp_path / "text", tmp_path / "branch"
    pretrain(data_dir, text_run, "--vision_start_frac=1.0", "--image_iters=0", "--save_fracs=(0.5, 1.0)")
    assert all(r["image_share"] == 0 for r in read_log(text_run) if "loss" in r)
    # the shared text prefix is the same model, whether or not images came later
    assert_same_weights(weights(text_run / "ckpt_frac0.50.pt"), weights(continuous_run / "ckpt_frac0.50.pt"))
    pretrain(data_dir, branch, "--vision_start_frac=0.5", "--image_iters=4",
             f"--init_from={text_run / 'ckpt_frac0.50.pt'}")
    assert read_log(branch) == read_log(continuous_run, from_iter=5)
    assert_same_weights(weights(branch / "ckpt.pt"), weights(continuous_run / "ckpt.pt"))
    # a branch must keep the settings that made its past
    bad = pretrain(data_dir, tmp_path / "bad", "--vision_start_frac=0.5", "--learning_rate=5e-3",
                   f"--init_from={text_run / 'ckpt_frac0.50.pt'}", check=False)
    assert bad.returncode != 0 and "learning_rate: checkpoint 0.01, now 0.005" in bad.stderr
    late = pretrain(data_dir, tmp_path / "late", "--vision_start_frac=0.3",
                    f"--init_from={text_run / 'ckpt_frac0.50.pt'}", check=False)
    assert late.returncode != 0 and "past this run's image start" in late.stderr


def test_ddp_two_processes_equal_one_process_with_accumulation(data_dir, tmp_path):
    args = ["--vision_start_frac=0.5", "--image_iters=3", "--grad_accum=2", "--dtype=float32", "--image_ratio=0.3"]
    pretrain(data_dir, tmp_path / "one", *args)
    ddp = pretrain(data_dir, tmp_path / "two", *args, "--device=cpu", nproc=2)
    assert "on 2 rank(s)" in ddp.stdout
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["iter"] for r in one] == [r["iter"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "text_loss", "caption_loss", "val_text_loss", "val_caption_loss",
                    "val_caption_loss_swapped", "image_share"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["iter"], key)
    a, b = weights(tmp_path / "one" / "ckpt.pt"), weights(tmp_path / "two" / "ckpt.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    result = pretrain(data_dir, tmp_path, "--learning_rate=1e12", "--min_lr=1e12", "--warmup_iters=0",
                      "--grad_clip=0.0", "--ckpt_interval=1", check=False)
    assert result.returncode != 0 and "not finite" in result.stderr
    checkpoint = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_bad_settings_are_rejected(data_dir, tmp_path):
    for arg, message in [("--learning_rat=1e-3", "unknown setting 'learning_rat'"),
                         ("--max_iters=ten", "max_iters must be of type int"),
                         ("--compile=1", "compile must be of type bool"),
                         ("--vision_start_frac=1.5", "vision_start_frac must lie in [0, 1]")]:
        result = pretrain(data_dir, tmp_path, arg, check=False)
        assert result.returncode != 0 and message in result.stderr, (arg, result.stderr[-500:])


def test_compiling_on_a_cpu_without_a_cpp_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(UserError, match=r"compile=True on the CPU needs a C\+\+ compiler \(no-such-compiler"):
        compile_and_wrap(torch.nn.Linear(2, 2), True, "cpu", world_size=1, local_rank=0, layouts=1)


def test_configurator_files_and_arguments(tmp_path):
    settings = {"learning_rate": 1e-3, "max_iters": 10, "save_fracs": (), "name": "x", "flag": False}
    config_file = tmp_path / "c.py"
    config_file.write_text("import math\nlearning_rate = 2 * math.pi\nmax_iters = 20\n")
    apply_overrides(settings, [str(config_file), "--max_iters=30", "--save_fracs=[0.5]", "--name=run_1"])
    assert settings == {"learning_rate": 2 * 3.141592653589793, "max_iters": 30, "save_fracs": (0.5,),
                        "name": "run_1", "flag": False}
    config_file.write_text("max_itres = 5\n")
    with pytest.raises(ValueError, match=f"{config_file}: unknown setting 'max_itres'"):
        apply_overrides(settings, [str(config_file)])
    with pytest.raises(ValueError, match="must look like --key=value"):
        apply_overrides(settings, ["--flag"])
    with pytest.raises(ValueError, match="cannot read config file"):
        apply_overrides(settings, [str(tmp_path / "missing.py")])
    with pytest.raises(SystemExit) as exit_info:  # --help lists the settings and stops
        apply_overrides(settings, ["--help"])
    assert exit_info.value.code == 0
    # upper-case globals are constants (often imported), never settings: not in the config, not overridable
    namespace = {"image_ratio": 0.5, "VISION_ENCODERS": {"patches": None}, "RAMPS": ("linear",)}
    assert apply_overrides(namespace, []) == {"image_ratio": 0.5}
    with pytest.raises(ValueError, match="unknown setting 'RAMPS'"):
        apply_overrides(namespace, ["--RAMPS=('x',)"])
