"""
sweep.py's SLURM launcher and the plan's estimates, and the Stage that both launchers run.

SLURM: every stage that is not done becomes an sbatch job with --dependency=afterok on the job
that writes its input. A training stage longer than the time limit is split into jobs that end
at stop_at_iter and continue with init_from=resume; a preempted job is requeued by SLURM and
continues from its out_dir/ckpt.pt. Estimates: a stage's GPU-hours are its tokens over
gpu_tokens_per_s, its disk the checkpoints it keeps.

The functions take `s`, sweep.py's settings (nodes, nproc, time_limit, partition, account,
sbatch_lines, dry_run, launcher, gpu_tokens_per_s, eval_gpu_hours, sft_conversations), and
`p`, the settings of the sweep's pretraining runs (configurator.script_settings).
"""

import contextlib
import dataclasses
import getpass
import glob
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time

import torch

from configurator import script_settings
from data.atomic import write_text
from data.errors import UserError
from schedule import finetune_steps

ROOT = os.path.dirname(os.path.abspath(__file__))
JOB_TIME_SHARE = 0.9  # plan a job's steps for 90% of its time limit: start-up, compile and checkpoints take the rest
WEIGHT_BYTES, ADAMW_BYTES = 4, 8  # per parameter in a checkpoint: float32 weights; AdamW's two float32 moments
print_lock = threading.Lock()


@dataclasses.dataclass
class Stage:
    """One step of the sweep: `script args`, run in out_dir, after the stages in `needs`."""
    label: str
    kind: str  # "text run", "text run extension", "image phase", "fine-tuning" or "evaluation"
    out_dir: str
    script: str
    args: list
    record: list  # what its DONE file holds when it is done (usually the command)
    needs: list  # the stages whose output it reads
    # (seed,) for a seed's text run and its extensions, (seed, values of the pretraining axes) for
    # an image phase, (seed, values of all axes) for a cell's fine-tuning and evaluation
    cell: tuple
    iters: tuple = None  # pretrain.py stages: (first step, step it stops at)
    moved_ckpt: tuple = None  # (from, to): a checkpoint it hands over when done; its ckpt.pt is then deleted
    run: bool = True  # False: done earlier, reused


def say(message):
    with print_lock:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_text(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def shell(words):
    return " ".join(w if w.startswith(("--nnodes=$", "--rdzv_id=$", "--rdzv_endpoint=")) else shlex.quote(w)
                    for w in words)


# -----------------------------------------------------------------------------
# the SLURM launcher: one sbatch job per stage (or per part of a long training stage)

def limit_seconds(limit):
    """sbatch --time's formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    try:
        days, _, rest = limit.rpartition("-")
        parts = [int(p) for p in rest.split(":")]
        if days:
            h, m, s = (parts + [0, 0])[:3]
            return int(days) * 86400 + h * 3600 + m * 60 + s
        return {1: lambda m: m * 60, 2: lambda m, s: m * 60 + s,
                3: lambda h, m, s: h * 3600 + m * 60 + s}[len(parts)](*parts)
    except (ValueError, KeyError, TypeError):
        raise UserError(f"time_limit {limit!r} is not a SLURM time such as '24:00:00' or '2-00:00:00'") from None


def gpus(stage, s):
    return 1 if stage.script == "evaluate.py" else s["nodes"] * s["nproc"]


def tokens_per_step(stage):
    settings = script_settings(stage.script, stage.args)
    return settings["batch_size"] * settings["grad_accum"] * settings["seq_len"]


def job_parts(stage, first_iter, s):
    """The steps at which the stage's jobs stop: one job per part that fits into time_limit."""
    start, end = first_iter, stage.iters[1]
    steps_per_job = math.floor(limit_seconds(s["time_limit"]) * JOB_TIME_SHARE * gpus(stage, s)
                               * s["gpu_tokens_per_s"] / tokens_per_step(stage))
    if steps_per_job < 1:
        raise UserError(f"time_limit {s['time_limit']} is too short for one step of {stage.label}")
    return list(range(start + steps_per_job, end, steps_per_job)) + [end]


def srun_command(stage, s, extra=()):
    """What the job runs: torchrun over the job's nodes for a multi-process training stage."""
    command = [*stage.args, *extra]
    if gpus(stage, s) == 1:
        return ["srun", sys.executable, stage.script, *command]
    if s["nodes"] == 1:
        rendezvous = ["--standalone"]
    else:  # every node's torchrun meets at the job's first node
        rendezvous = ["--nnodes=$SLURM_NNODES", "--rdzv_backend=c10d", "--rdzv_id=$SLURM_JOB_ID",
                      '--rdzv_endpoint="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)":29500']
    return ["srun", "--ntasks-per-node=1", sys.executable, "-m", "torch.distributed.run", *rendezvous,
            f"--nproc_per_node={s['nproc']}", stage.script, *command]


def job_script(stage, part, parts, stop_at, s):
    """The sbatch script of one job. A requeued (preempted) job, or a later part of a stage,
    finds out_dir/ckpt.pt and continues from it with init_from=resume; only the last part of a
    stage that succeeds writes DONE. A failure leaves FAILED, for the next invocation to report."""
    d = stage.out_dir
    job_nodes = 1 if stage.script == "evaluate.py" else s["nodes"]
    options = [f"--job-name={stage.label.replace(',', '').replace(' ', '_')}",
               f"--chdir={ROOT}",  # where the stages' paths start, as for the local launcher
               f"--output={d}/stdout.txt", "--open-mode=append", f"--nodes={job_nodes}", "--ntasks-per-node=1",
               f"--gpus-per-node={gpus(stage, s) // job_nodes}", f"--time={s['time_limit']}",
               "--requeue", "--kill-on-invalid-dep=yes",
               *([f"--partition={s['partition']}"] if s["partition"] else []),
               *([f"--account={s['account']}"] if s["account"] else []), *s["sbatch_lines"]]
    extra = [f"--stop_at_iter={stop_at}"] if part < parts else []
    lines = ["#!/bin/bash", *[f"#SBATCH {o}" for o in options],
             f"# {stage.label}, part {part} of {parts}: written by sweep.py",
             "export PYTHONUNBUFFERED=1  # stdout.txt shows the progress as it happens"]
    if stage.script == "evaluate.py":
        lines.append(shell(srun_command(stage, s)))
    else:
        # without a checkpoint the job starts over, replacing what a job killed before its first one logged
        lines += [f"resume=--overwrite=True; if [ -e {shlex.quote(d)}/ckpt.pt ]; then resume=--init_from=resume; "
                  f"echo \"resuming from {d}/ckpt.pt\"; fi",
                  shell(srun_command(stage, s, extra)) + " $resume"]
    lines += ['code=$?', f'if [ $code -ne 0 ]; then echo "exit code $code" > {shlex.quote(d)}/FAILED.tmp && '
                         f'mv {shlex.quote(d)}/FAILED.tmp {shlex.quote(d)}/FAILED; exit $code; fi']
    if part == parts:
        if stage.moved_ckpt:
            lines.append(f"mv {shlex.quote(stage.moved_ckpt[0])} {shlex.quote(stage.moved_ckpt[1])} && "
                         f"rm {shlex.quote(d)}/ckpt.pt")
        lines.append(f"echo {shlex.quote(json.dumps(stage.record))} > {shlex.quote(d)}/DONE.tmp && "
                     f"mv {shlex.quote(d)}/DONE.tmp {shlex.quote(d)}/DONE")
    return "\n".join(lines) + "\n"


def queued_job_ids(dry_run):
    """The ids of this user's jobs that SLURM still holds (pending, running, requeued)."""
    if shutil.which("squeue") is None:
        if dry_run:
            return set()
        raise UserError("launcher = 'slurm' needs SLURM's squeue and sbatch on PATH; squeue is not there")
    out = subprocess.run(["squeue", "--noheader", f"--user={getpass.getuser()}", "--format=%i"],
                         capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def waits_for(stage, needed, needed_parts):
    """The job of `needed` that `stage` waits for: an image phase starts as soon as the part of
    the text run that writes its checkpoint is done, anything else when all of `needed` is."""
    if needed.kind == "text run" and stage.kind == "image phase":
        return next(job for stop, job in needed_parts if stop >= stage.iters[0])
    return needed_parts[-1][1]


def submit_to_slurm(stages, s):
    """Submits (or with dry_run prints) a job for every stage that must run and is not queued
    already, each after the jobs of the stages it needs. Returns {stage.cell: status} for the
    stages queued, the first stage's status for stages alike in `cell`."""
    dry_run = s["dry_run"]
    queued = queued_job_ids(dry_run)
    parts = {}  # stage label -> [(step its job stops at, job id)], for the stages waiting on it
    status, submitted = {}, 0
    for stage in stages:
        if not stage.run:
            say(f"reused   {stage.label}")
            continue
        marker = read_json(os.path.join(stage.out_dir, "SUBMITTED"))
        same = marker is not None and marker["record"] == stage.record
        if same and marker["jobs"][-1] in queued:
            parts[stage.label] = list(zip(marker["stops"], marker["jobs"]))
            say(f"queued   {stage.label}: job {', '.join(marker['jobs'])}")
            status.setdefault(stage.cell, f"queued as job {marker['jobs'][-1]}")
            continue
        # Keep a stage's partial work (a timed-out or failed job's checkpoint) only when the same
        # command made it from inputs that are done; otherwise start clean.
        keep = same and not any(n.run for n in stage.needs) and stage.moved_ckpt is None
        failed = read_text(os.path.join(stage.out_dir, "FAILED"))
        first_iter = stage.iters[0] if stage.iters else None
        if keep and stage.iters and os.path.exists(os.path.join(stage.out_dir, "ckpt.pt")):  # mmap: not the weights
            first_iter = torch.load(os.path.join(stage.out_dir, "ckpt.pt"), map_location="cpu", mmap=True,
                                    weights_only=False)["iter_num"]
        if not dry_run:
            if not keep:
                shutil.rmtree(stage.out_dir, ignore_errors=True)
            os.makedirs(stage.out_dir, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(stage.out_dir, "FAILED"))
        stops = job_parts(stage, first_iter, s) if stage.iters else [None]
        jobs = []
        for part, stop_at in enumerate(stops, 1):
            after = [waits_for(stage, n, parts[n.label]) for n in stage.needs if n.label in parts] if part == 1 \
                else jobs[-1:]
            dependency = [f"--dependency=afterok:{':'.join(after)}"] if after else []
            script = job_script(stage, part, len(stops), stop_at, s)
            if dry_run:
                jobs.append(f"#{submitted + len(jobs) + 1}")
                print(f"  job {jobs[-1]}: {stage.label}, part {part} of {len(stops)}"
                      + (f", after {', '.join(after)}" if after else "") + "\n    "
                      + shell(srun_command(stage, s, [f"--stop_at_iter={stop_at}"] if part < len(stops) else [])))
                continue
            path = os.path.join(stage.out_dir, f"job{part}.sh")
            write_text(path, script)
            out = subprocess.run(["sbatch", "--parsable", *dependency, path], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"sbatch {path} failed (exit code {out.returncode}): {out.stderr.strip()}")
            jobs.append(out.stdout.strip().split(";")[0])  # "id" or "id;cluster"
        if not dry_run:
            write_text(os.path.join(stage.out_dir, "SUBMITTED"),
                       json.dumps({"record": stage.record, "jobs": jobs, "stops": stops}))
            say(f"submitted {stage.label}: job{'s' * (len(jobs) > 1)} {', '.join(jobs)}"
                + (f" (it failed before: {failed})" if failed else ""))
        parts[stage.label] = list(zip(stops, jobs))
        submitted += len(jobs)
        status.setdefault(stage.cell, f"queued as job {jobs[-1]}" + (f" (failed before: {failed})" if failed else ""))
    if not dry_run:
        say(f"{submitted} job(s) submitted" +
            ("; run the same command again when they are done, for the results" if submitted else ""))
    return status


# -----------------------------------------------------------------------------
# the plan's estimates: GPU-hours from gpu_tokens_per_s, disk from the checkpoints kept

def checkpoint_bytes(p):
    """A checkpoint of the pretraining model with its AdamW state, from the model's size."""
    from data.tokenizer import load_tokenizer
    from model import VLM, model_config_from_settings
    # The SigLIP tower's shape from its folder when it is local, else SigLIP-B/16's (nothing is
    # downloaded for a plan).
    siglip_dir = p["vision_weights"] if os.path.isdir(p["vision_weights"]) else None
    tokenizer = load_tokenizer(p["data_dir"])
    model_config = model_config_from_settings(p, tokenizer.vocab_size, tokenizer.image_id, siglip_dir)
    with torch.device("meta"):  # shapes only, no memory
        model = VLM(model_config)
    model.vision.encoder.requires_grad_(not p["freeze_vision"])  # as pretrain.py: no AdamW state when frozen
    weights = sum(w.numel() for w in model.parameters())
    trained = sum(w.numel() for w in model.parameters() if w.requires_grad)
    return weights * WEIGHT_BYTES + trained * ADAMW_BYTES


def finetune_steps_and_tokens(stage, s, p):
    from data.shards import read_shard
    settings = script_settings("finetune.py", stage.args)
    conversations = s["sft_conversations"]
    if not conversations:
        pattern = os.path.join(settings["data_dir"], settings["train_chat"])
        paths = sorted(glob.glob(os.path.join(ROOT, pattern)))
        if not paths:
            raise UserError(f"sft_conversations is 0 and no shards match {pattern}: set sft_conversations "
                            "(conversations per epoch) for the estimate")
        conversations = sum(read_shard(path).num_samples for path in paths)
    seq_len = settings["seq_len"] or p["seq_len"]  # 0: the pretrained model's context
    # one conversation a row (packed rows, pack_conversations, take fewer steps: an upper bound)
    steps = finetune_steps(settings, settings["epochs"] * conversations)
    return steps, settings["batch_size"] * settings["grad_accum"] * seq_len


def estimate(stage, ckpt_bytes, s, p):
    """(GPU-hours, bytes on disk) of one stage."""
    if stage.script == "evaluate.py":
        return s["eval_gpu_hours"], 0
    if stage.script == "finetune.py":
        steps, tokens = finetune_steps_and_tokens(stage, s, p)
        return steps * tokens / s["gpu_tokens_per_s"] / 3600, ckpt_bytes
    hours = (stage.iters[1] - stage.iters[0]) * tokens_per_step(stage) / s["gpu_tokens_per_s"] / 3600
    # its save_fracs checkpoints and its last, ckpt.pt, unless it hands a checkpoint over and deletes ckpt.pt
    kept = len(script_settings(stage.script, stage.args)["save_fracs"]) + (stage.moved_ckpt is None)
    return hours, kept * ckpt_bytes


def print_estimates(stages, s, p):
    ckpt_bytes = checkpoint_bytes(p)
    kinds = {}  # kind of stage -> [GPU-hours, bytes, of which still to run: GPU-hours, bytes]
    hours_alone, finish = {}, {}  # stage -> its wall hours; when it ends if every cell runs at once
    print(f"\nestimates at {s['gpu_tokens_per_s']:,.0f} tokens/s per GPU, {ckpt_bytes / 1e9:.2f} GB per checkpoint:")
    for stage in stages:
        hours, size = estimate(stage, ckpt_bytes, s, p)
        total = kinds.setdefault(stage.kind, [0.0, 0, 0.0, 0])
        total[0] += hours
        total[1] += size
        if stage.run:
            total[2] += hours
            total[3] += size
        hours_alone[stage.label] = hours / gpus(stage, s) if stage.run else 0.0
        finish[stage.label] = hours_alone[stage.label] + max((finish[n.label] for n in stage.needs), default=0.0)
        # Only pretrain.py stages are split at time limits (their steps are known before they run)
        too_long = (s["launcher"] == "slurm" and not stage.iters
                    and hours / gpus(stage, s) * 3600 > limit_seconds(s["time_limit"]) * JOB_TIME_SHARE)
        print(f"  {stage.label}: {hours:,.1f} GPU-h, {size / 1e9:,.1f} GB" + ("" if stage.run else " (done)")
              + (f" (more than time_limit {s['time_limit']} allows: raise it)" if too_long else ""))
    print("per kind of stage, all / still to run:")
    for kind, (hours, size, run_hours, run_size) in kinds.items():
        print(f"  {kind}: {hours:,.1f} / {run_hours:,.1f} GPU-h, {size / 1e9:,.1f} / {run_size / 1e9:,.1f} GB")
    # On SLURM every cell runs at once: at most the longest chain of stages still to run (an image
    # phase may start before the whole text run is done). Locally, one stage after another.
    wall = (f"at most {max(finish.values()):,.1f} hours with every cell running at once"
            if s["launcher"] == "slurm" else f"{sum(hours_alone.values()):,.1f} hours one stage after another")
    total = [sum(k[i] for k in kinds.values()) for i in range(4)]
    print(f"total: {total[0]:,.1f} GPU-h, {total[1] / 1e9:,.1f} GB; still to run {total[2]:,.1f} GPU-h, "
          f"{total[3] / 1e9:,.1f} GB; {wall}")
