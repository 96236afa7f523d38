"""Faults and bad input: changed settings on resume, cut-off logs, failed or corrupt checkpoint
writes, diverged weights, bad settings, SIGTERM / Ctrl-C / kill -9 at random moments. Each
test is a tiny run of a few seconds; each failed on the code before these checks existed."""

import io
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from common import load_checkpoint, save_checkpoint
from data import shards
from data.atomic import atomic_write
from tests.test_pretrain import TINY, assert_same_weights, pretrain, read_log, weights
from tests.tiny_data import ROOT, make_tiny_dataset, write_tiny_chat_shards

PHASES = ["--vision_start_frac=0.5", "--image_iters=4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny pretraining data plus conversation shards, for finetune.py."""
    return str(write_tiny_chat_shards(make_tiny_dataset(tmp_path_factory.mktemp("data"))))


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    pretrain(data_dir, out, *PHASES)
    return out


def finetune(data_dir, out_dir, *args, nproc=1, check=True):
    cmd = [sys.executable, "finetune.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "finetune.py"]
    result = subprocess.run(cmd + ["--batch_size=4", "--text_rows=0", "--seq_len=0", "--epochs=1",
                                   "--log_interval=1", "--eval_interval=5", "--eval_batches=1",
                                   f"--data_dir={data_dir}",
                                   f"--out_dir={out_dir}", *args],
                            cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check and result.returncode != 0:
        raise AssertionError(f"finetune.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def assert_one_error_line(result, message):
    """A user error: exit status 1 and one `error:` line on stderr, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]


# ------------------------------------------------------------------- 1. settings on resume

def test_resume_refuses_any_changed_setting_and_keeps_the_finished_run(data_dir, finished_run, tmp_path):
    before = (finished_run / "ckpt.pt").read_bytes()
    for arg, message in [("--image_ratio=0.3", "image_ratio: checkpoint 0.5, now 0.3"),
                         ("--vision_start_frac=0.2", "vision_start_frac: checkpoint 0.5, now 0.2")]:
        result = pretrain(data_dir, finished_run, *PHASES, arg, "--init_from=resume", check=False)
        assert_one_error_line(result, message)
    assert (finished_run / "ckpt.pt").read_bytes() == before
    # settings that cannot change the past may differ (in a copy: other tests read this run)
    shutil.copytree(finished_run, tmp_path / "copy")
    pretrain(data_dir, tmp_path / "copy", *PHASES, "--init_from=resume", "--log_interval=3", "--compile=False")
    # finetune.py too: a resume with another learning rate is refused
    sft = tmp_path / "sft"
    finetune(data_dir, sft, f"--init_from={finished_run / 'ckpt.pt'}", "--stop_at_iter=2")
    result = finetune(data_dir, sft, "--init_from=resume", "--learning_rate=5e-4", check=False)
    assert_one_error_line(result, "learning_rate: checkpoint 0.002, now 0.0005")


def test_branch_may_change_only_the_image_phase(data_dir, tmp_path):
    text = tmp_path / "text"
    pretrain(data_dir, text, "--vision_start_frac=1.0", "--image_iters=0", "--save_fracs=(0.5,)")
    bad = pretrain(data_dir, tmp_path / "bad", *PHASES, "--batch_size=2", f"--init_from={text / 'ckpt_frac0.50.pt'}",
                   check=False)
    assert_one_error_line(bad, "batch_size: checkpoint 4, now 2")
    # a checkpoint that already saw images is no branch point
    mixed = tmp_path / "mixed"
    pretrain(data_dir, mixed, "--vision_start_frac=0.2", "--image_iters=8", "--stop_at_iter=4")
    late = pretrain(data_dir, tmp_path / "late", *PHASES, f"--init_from={mixed / 'ckpt.pt'}", check=False)
    assert_one_error_line(late, "after its run's image start")


# ------------------------------------------------------------------- 2. a cut-off log line

def test_resume_drops_a_cut_off_last_log_record(data_dir, finished_run, tmp_path):
    pretrain(data_dir, tmp_path, *PHASES, "--stop_at_iter=6")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"iter": 6, "lr": 0.00')  # the disk filled up mid-record
    resumed = pretrain(data_dir, tmp_path, *PHASES, "--init_from=resume")
    assert "dropped its last line, a cut-off record" in resumed.stdout
    assert read_log(tmp_path) == read_log(finished_run)


# ------------------------------------------------------------ 3. failed checkpoint writes

def test_full_disk_during_a_checkpoint_write_leaves_no_temporary_file(data_dir, tmp_path):
    def small_disk():  # files may not grow past 64 kB: the checkpoint (~250 kB) does not fit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    result = subprocess.run([sys.executable, "pretrain.py", *TINY, *PHASES, f"--data_dir={data_dir}",
                             f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), preexec_fn=small_disk)
    assert_one_error_line(result, f"cannot write {tmp_path / 'ckpt.pt'}: File too large")
    assert sorted(os.listdir(tmp_path)) == [".lock", "log.jsonl"]


class InterruptsPickling:
    def __reduce__(self):
        raise KeyboardInterrupt  # Ctrl-C in the middle of torch.save


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    good = {"model": {"w": torch.ones(3)}, "model_config": {}, "config": {}}
    save_checkpoint(path, good)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "late": InterruptsPickling()})
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


class InterruptsWrites(io.RawIOBase):
    """A file whose fifth write is interrupted by Ctrl-C, inside torch.save's C++ writer."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def writable(self):
        return True

    def write(self, data):
        self.writes += 1
        if self.writes == 5:
            raise KeyboardInterrupt
        return self.f.write(data)


def test_ctrl_c_inside_torch_save_stays_a_ctrl_c(tmp_path):
    """torch.save's writer, interrupted, fails to close the file and raises its own RuntimeError;
    the interrupt must still come out as one (exit status 130), with no temporary file left."""
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(str(tmp_path / "ckpt.pt"), "wb") as f:
            torch.save({"w": torch.ones(100_000)}, InterruptsWrites(f))
    assert os.listdir(tmp_path) == []


# ------------------------------------------- 4. and 9. checkpoint integrity and messages

def test_damaged_or_foreign_checkpoints_are_refused_by_name(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), {"model": {"w": torch.arange(4096.0)}, "model_config": {}, "config": {}, "iter_num": 3})
    data = path.read_bytes()
    where = data.index(np.float32(1000.0).tobytes())
    cases = {  # file bytes -> the message
        "flipped": (data[:where] + np.float32(1001.0).tobytes() + data[where + 4:], "is corrupt"),
        "truncated": (data[:len(data) // 2], "cannot be read, it is truncated or not a checkpoint"),
        "empty": (b"", "cannot be read, it is truncated or not a checkpoint"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message) as info:
            load_checkpoint(str(tmp_path / name))
        assert str(tmp_path / name) in str(info.value), name
    torch.save({"w": torch.ones(2)}, tmp_path / "raw.pt")  # a raw state dict
    with pytest.raises(ValueError, match="raw.pt is not a checkpoint written by pretrain.py or finetune.py"):
        load_checkpoint(str(tmp_path / "raw.pt"))
    save_checkpoint(str(tmp_path / "bare.pt"), {"model": {}})
    with pytest.raises(ValueError, match="bare.pt lacks model_config, config"):
        load_checkpoint(str(tmp_path / "bare.pt"))
    with pytest.raises(ValueError, match="not writing .*: NaN or inf in model.w;"):
        save_checkpoint(str(path), {"model": {"w": torch.tensor([1.0, float("inf")])}})
    assert path.read_bytes() == data  # the last good checkpoint stays


def test_scripts_name_a_bad_checkpoint_in_one_line(data_dir, tmp_path):
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 cut off")
    result = pretrain(data_dir, tmp_path, f"--init_from={tmp_path / 'cut.pt'}", check=False)
    assert_one_error_line(result, f"checkpoint {tmp_path / 'cut.pt'} cannot be read")
    torch.save({"w": torch.ones(2)}, tmp_path / "raw.pt")
    result = finetune(data_dir, tmp_path / "sft", f"--init_from={tmp_path / 'raw.pt'}", check=False)
    assert_one_error_line(result, "raw.pt is not a checkpoint written by pretrain.py or finetune.py")
    result = subprocess.run([sys.executable, "evaluate.py", f"--ckpt={tmp_path / 'absent.pt'}", f"--data_dir={data_dir}"],
                            cwd=ROOT, capture_output=True, text=True)
    assert_one_error_line(result, f"checkpoint {tmp_path / 'absent.pt'} does not exist")


def test_divergence_stops_with_a_verified_last_checkpoint(data_dir, tmp_path):
    # (save_checkpoint's refusal of NaN or inf is tested above: AdamW does not overflow here.)
    result = pretrain(data_dir, tmp_path, "--learning_rate=1e30", "--min_lr=1e30", "--warmup_iters=0",
                      "--grad_clip=0.0", "--ckpt_interval=1", check=False)
    assert_one_error_line(result, "the loss or its gradient is not finite")
    checkpoint = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


# --------------------------------------------------------------------- 7. bad settings

@pytest.mark.parametrize("arg, message", [
    ("--batch_size=0", "batch_size must be positive, got 0"),
    ("--grad_accum=0", "grad_accum must be positive, got 0"),
    ("--log_interval=0", "log_interval must be positive, got 0"),
    ("--eval_batches=0", "eval_batches must be positive, got 0"),
    ("--n_head=3", "n_head (3) must divide n_embd (32)"),
])
def test_zero_or_inconsistent_settings_are_refused(data_dir, tmp_path, arg, message):
    assert_one_error_line(pretrain(data_dir, tmp_path, arg, check=False), message)


def test_evaluate_refuses_a_zero_batch_size(data_dir, finished_run):
    result = subprocess.run([sys.executable, "evaluate.py", f"--ckpt={finished_run / 'ckpt.pt'}",
                             f"--data_dir={data_dir}", "--batch_size=0"], cwd=ROOT, capture_output=True, text=True)
    assert_one_error_line(result, "batch_size must be positive, got 0")


# ------------------------------------------------- 8. SIGTERM, Ctrl-C and kill -9 at random

LONG = ["--max_iters=24", "--vision_start_frac=0.5", "--image_iters=8", "--ckpt_interval=1"]  # 12 + 8 steps


@pytest.fixture(scope="module")
def long_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("long")
    pretrain(data_dir, out, *LONG)
    return out


def interrupt_at_random(data_dir, out_dir, signum, rng):
    """Starts the run and sends signum at a random moment: a random step's log line, then a
    random few milliseconds (a checkpoint is written every step, so it often lands inside a
    write). The step is at least 6 before the end, so the signal always comes in time."""
    process = subprocess.Popen([sys.executable, "pretrain.py", *TINY, *LONG, f"--data_dir={data_dir}",
                                f"--out_dir={out_dir}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    step, delay = rng.randrange(0, 14), rng.uniform(0.0, 0.02)  # of steps 0..19
    for line in process.stdout:
        if line.startswith(f"iter {step}: loss"):
            break
    time.sleep(delay)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stderr, f"step {step} + {delay * 1000:.1f} ms"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_signal_at_a_random_moment_then_resume_equals_uninterrupted(data_dir, long_run, tmp_path, signum):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    code, stderr, moment = interrupt_at_random(data_dir, tmp_path, signum, rng)
    where = f"{signal.Signals(signum).name} at {moment}: exit {code}\n{stderr[-1500:]}"
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL, where
    else:  # stopped after a step, with a checkpoint and the way to go on
        assert code == 128 + signum and "--init_from=resume" in stderr and "Traceback" not in stderr, where
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f] or signum == signal.SIGKILL, where
    # killed before its first checkpoint, the run starts over, replacing the records it logged
    resume = "--init_from=resume" if os.path.exists(tmp_path / "ckpt.pt") else "--overwrite=True"
    pretrain(data_dir, tmp_path, *LONG, resume)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f], where  # a killed writer's are gone
    assert read_log(tmp_path) == read_log(long_run), where
    assert_same_weights(weights(tmp_path / "ckpt.pt"), weights(long_run / "ckpt.pt"))


def test_a_signal_during_set_up_stops_at_the_first_step_with_a_checkpoint(data_dir, finished_run, tmp_path):
    """The handlers exist before the data and the model are set up (seconds; minutes for a
    SigLIP download or a compile): a scheduler's SIGTERM then is a clean stop, not a kill."""
    process = subprocess.Popen([sys.executable, "pretrain.py", *TINY, *PHASES, f"--data_dir={data_dir}",
                                f"--out_dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    for line in process.stdout:
        if line.startswith("model: "):  # printed once the model is built, before the first step
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and "--init_from=resume" in stderr, stderr[-2000:]
    pretrain(data_dir, tmp_path, *PHASES, "--init_from=resume")
    assert read_log(tmp_path) == read_log(finished_run)


def test_sigterm_under_ddp_stops_every_rank_at_the_same_step(data_dir, tmp_path):
    """A scheduler signals every process of the job: torchrun and both ranks. The ranks agree at
    the next log step, rank 0 writes the checkpoint, and the resumed run equals an
    uninterrupted one."""
    args = ["--max_iters=24", "--vision_start_frac=0.5", "--image_iters=8", "--grad_accum=2", "--dtype=float32",
            "--device=cpu", "--log_interval=3"]
    pretrain(data_dir, tmp_path / "full", *args, nproc=2)
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py", *TINY,
         *args, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'stopped'}"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
        start_new_session=True)
    for line in process.stdout:
        if line.startswith("iter 3: loss"):
            break
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert "stopped by SIGTERM before step" in stderr and "--init_from=resume" in stderr, stderr[-2000:]
    pretrain(data_dir, tmp_path / "stopped", *args, "--init_from=resume", nproc=2)
    assert read_log(tmp_path / "stopped") == read_log(tmp_path / "full")
    assert_same_weights(weights(tmp_path / "stopped" / "ckpt.pt"), weights(tmp_path / "full" / "ckpt.pt"))


def test_finetune_under_ddp_logs_the_loss_over_every_rank(data_dir, finished_run, tmp_path):
    """2 ranks x 1 micro-batch read the conversations that 1 rank x 2 micro-batches reads, so the
    logged loss, all-reduced over the ranks as pretrain.py's is, must be the same (it was rank
    0's half alone)."""
    args = [f"--init_from={finished_run / 'ckpt.pt'}", "--grad_accum=2", "--dtype=float32", "--device=cpu",
            "--stop_at_iter=3"]
    finetune(data_dir, tmp_path / "one", *args)
    finetune(data_dir, tmp_path / "two", *args, nproc=2)
    one, two = ([r["loss"] for r in read_log(tmp_path / run) if "loss" in r] for run in ("one", "two"))
    assert len(one) == 3 and two == pytest.approx(one, rel=1e-4)


# ------------------------- 10. a new run never replaces another; one writer per folder

def test_a_new_run_refuses_a_folder_that_holds_a_run(data_dir, finished_run, tmp_path):
    """The usual mistake after a preemption: the same command again, without init_from=resume."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = {name: (run / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    assert_one_error_line(pretrain(data_dir, run, *PHASES, check=False),
                          f"out_dir {run} already holds a run (ckpt.pt, log.jsonl with")
    sft = tmp_path / "sft"
    finetune(data_dir, sft, f"--init_from={run / 'ckpt.pt'}", "--stop_at_iter=2")
    sft_before = (sft / "ckpt.pt").read_bytes()
    result = finetune(data_dir, sft, f"--init_from={run / 'ckpt.pt'}", check=False)
    assert_one_error_line(result, "--init_from=resume, or choose another --out_dir")
    assert {name: (run / name).read_bytes() for name in before} == before
    assert (sft / "ckpt.pt").read_bytes() == sft_before
    # told to, a new run replaces the old one, and none of its checkpoints stays behind
    (run / "ckpt_frac0.30.pt").write_bytes(before["ckpt.pt"])
    pretrain(data_dir, run, *PHASES, "--stop_at_iter=2", "--overwrite=True")
    assert sorted(p.name for p in run.glob("ckpt*")) == ["ckpt.pt"]
    assert [r["iter"] for r in read_log(run)] == [0, 0, 1]


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_stuck_lock(data_dir, tmp_path):
    """A run (here a stand-in) holds out_dir/.lock while it lives."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, time; "
                               f"lock = open({str(tmp_path / '.lock')!r}, 'a+'); fcntl.flock(lock, fcntl.LOCK_EX); "
                               "print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for result in (pretrain(data_dir, tmp_path, *PHASES, check=False),  # a second run
                       pretrain(data_dir, tmp_path, *PHASES, "--init_from=resume", check=False),  # a requeue
                       finetune(data_dir, tmp_path, "--init_from=resume", check=False)):
            assert_one_error_line(result, f"out_dir {tmp_path} is in use by another process")
        sweep = subprocess.run([sys.executable, "sweep.py", f"--sweep_dir={tmp_path}"], cwd=ROOT,
                               capture_output=True, text=True)
        assert_one_error_line(sweep, f"sweep_dir {tmp_path} is in use by another process")
        assert sorted(os.listdir(tmp_path)) == [".lock"]
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    pretrain(data_dir, tmp_path, *PHASES, "--stop_at_iter=2")
    with open(tmp_path / ".lock") as f:  # who holds it, for the message a second writer gets
        assert f.read().startswith("process ")


def test_resume_removes_the_temporary_files_of_killed_writers(data_dir, tmp_path):
    pretrain(data_dir, tmp_path, *PHASES, "--stop_at_iter=6")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has ended
    for name in (f"ckpt.pt.tmp{dead}", f"log.jsonl.tmp{dead}", f"ckpt.pt.eval.json.tmp{os.getpid()}"):
        (tmp_path / name).write_bytes(b"half a checkpoint")  # what kill -9 mid-write leaves
    pretrain(data_dir, tmp_path, *PHASES, "--init_from=resume")
    # the live process's file (another program writing here) stays
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == [f"ckpt.pt.eval.json.tmp{os.getpid()}"]


# --------------------------------------------- 11. a resume knows its data by content, not by path

def test_resume_refuses_regenerated_data_and_accepts_the_same_data_by_another_path(data_dir, finished_run, tmp_path):
    pretrain(data_dir, tmp_path / "run", *PHASES, "--stop_at_iter=6")
    other = tmp_path / "regenerated"
    shutil.copytree(data_dir, other)
    make_tiny_dataset(other, seed=1)  # the same file names, other documents
    result = pretrain(other, tmp_path / "run", *PHASES, "--init_from=resume", check=False)
    assert_one_error_line(result, "shards are not those it was trained on (train_caption.bin has other contents)")
    # the same folder by another path: a symlink, relative to somewhere else
    (tmp_path / "link").symlink_to(data_dir)
    pretrain(data_dir, tmp_path / "run", *PHASES, "--init_from=resume", f"--data_dir={tmp_path / 'link'}/./")
    assert read_log(tmp_path / "run") == read_log(finished_run)
    # fine-tuning too
    sft = tmp_path / "sft"
    finetune(data_dir, sft, f"--init_from={finished_run / 'ckpt.pt'}", "--stop_at_iter=2")
    shards.write_conversation_shard(os.path.join(other, "train_chat.bin"), *load_chat(data_dir, drop_last=True))
    result = finetune(other, sft, "--init_from=resume", check=False)
    assert_one_error_line(result, "the train_chat shards are not those it was trained on (train_chat.bin has other")


def load_chat(data_dir, drop_last):
    """The conversations of data_dir's train_chat.bin (less the last), for write_conversation_shard."""
    shard = shards.read_shard(os.path.join(data_dir, "train_chat.bin"))
    n = shard.num_samples - drop_last
    spans = [slice(shard.offsets[i], shard.offsets[i + 1]) for i in range(n)]
    return (shard.images[:n], [shard.tokens[s] for s in spans], [shard.loss_mask[s] for s in spans],
            shard.vocab_size)
