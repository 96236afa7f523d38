"""
The study in one command: when during LM pretraining should a VLM first see images?

    python data/toyworld/prepare.py && python sweep.py config/toy_sweep.py
    python sweep.py config/toy_sweep.py --seeds="(1337, 1338, 1339)"
    python sweep.py config/1b_sweep.py --dry_run=True       # the plan: jobs, commands, GPU-hours, disk
    python sweep.py config/1b_sweep.py --launcher=slurm     # every stage an sbatch job

For each seed it trains the text-only run once, keeping a checkpoint at every start fraction f
of the grid. Each (f, image ratio) cell then branches from the checkpoint at f, trains the image
phase (pretrain.py --vision_start_frac=f), fine-tunes (finetune.py, identical settings for every
cell) and evaluates (evaluate.py). The table, the plots and the raw numbers go to sweep_dir:
results.md, results.csv, results.json, results.png (vision and text averages against f) and
lr_schedule.png (the learning rate of every branch against the text run's).

Every stage has its own out_dir, where its output goes to stdout.txt. A stage that succeeds
leaves a DONE file holding its command; running the sweep again reuses every stage whose DONE
matches the command it would run now (and whose inputs were not rebuilt), so an interrupted
sweep continues where it stopped, and a changed grid reuses the cells it shares with the old one.
A failed stage fails only its cell.

Launchers. "local" (the default) runs the stages here as subprocesses, `parallel` cells at a
time, and writes the results at the end. "slurm" submits every stage that is not done as an
sbatch job with --dependency=afterok on the stage it reads from, and returns: running the same
command again later submits only what is neither done nor queued, and writes the results of
the cells that are done. A training stage longer than the time limit is split into jobs that
end at stop_at_iter and continue with init_from=resume; a preempted job is requeued by SLURM
and continues from its out_dir/ckpt.pt.
"""

import concurrent.futures
import contextlib
import csv
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

import matplotlib
import numpy as np
import torch

from common import lock_folder
from configurator import apply_overrides, script_settings
from data.atomic import atomic_write, write_text
from data.errors import UserError, report_user_errors

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# -----------------------------------------------------------------------------
# defaults (config/toy_sweep.py and config/1b_sweep.py override them)
sweep_dir = "out/sweep"
data_dir = ""  # given to every stage when set (the toy world holds all their data); "" = each config's own
pretrain_config = "config/toy.py"
sft_config = "config/toy_sft.py"
fracs = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # where images start, as a fraction of the text schedule
ratios = (0.1, 0.3)  # share of image-caption rows in the image phase
seeds = (1337,)
# Extra "--key=value" arguments for every call of a stage, e.g. a smaller model. The sweep's own
# arguments (out_dir, init_from, seed, the grid's values) come after them and win.
pretrain_args = ()
finetune_args = ()
evaluate_args = ()
nproc = 1  # processes (GPUs) per pretraining/fine-tuning run, per node under SLURM (> 1: torchrun)
parallel = 1  # local launcher: cells run at once; for CPU machines, where the runs split the cores
branch_point_ckpt = True  # each branch also keeps its weights at the branch point (a check, see below)
launcher = "local"  # "local": subprocesses on this machine; "slurm": one sbatch job per stage
dry_run = False  # print the plan (jobs, dependencies, commands, GPU-hours, disk) and run nothing
# SLURM (launcher = "slurm"): a training job gets `nodes` nodes of `nproc` GPUs, evaluation one GPU
nodes = 1
partition = ""  # "" = the cluster's default
account = ""
time_limit = "24:00:00"  # per job (sbatch --time); longer training stages are split into several jobs
sbatch_lines = ()  # more sbatch options, one per entry, e.g. ("--qos=high", "--constraint=h100")
# The plan's estimates, and how many steps fit into one job
# training tokens per second per GPU: a plain compiled Llama-style decoder of config/1b.py's shape
# (1.64B parameters) on one H200 with torch 2.11; our own model's rate awaits bench.py on a GPU
gpu_tokens_per_s = 52_200.0
sft_conversations = 0  # fine-tuning conversations per epoch; 0 = count them in the fine-tuning shards
eval_gpu_hours = 1.0  # per evaluation
# -----------------------------------------------------------------------------
report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
config = apply_overrides(globals(), sys.argv[1:])
ROOT = os.path.dirname(os.path.abspath(__file__))
CORES = len(os.sched_getaffinity(0))
DATA = [f"--data_dir={data_dir}"] if data_dir else []
JOB_TIME_SHARE = 0.9  # plan a job's steps for 90% of its time limit: start-up, compile and checkpoints take the rest
WEIGHT_BYTES, ADAMW_BYTES = 4, 8  # per parameter in a checkpoint: float32 weights; AdamW's two float32 moments
print_lock = threading.Lock()


class StageFailed(Exception):
    pass


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
    cell: tuple  # (seed,) for a seed's text run, (seed, frac, ratio) for a cell's stages
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


def seed_dir(seed):
    return os.path.join(sweep_dir, f"seed{seed}")


def cell_dir(seed, frac, ratio):
    return os.path.join(seed_dir(seed), f"frac{frac:.2f}_ratio{ratio:.2f}")


def frac_ckpt(directory, frac):
    return os.path.join(directory, f"ckpt_frac{frac:.2f}.pt")  # pretrain.py's name for it


# -----------------------------------------------------------------------------
# the plan: every stage of every cell, and which of them must run

def plan():
    """Every stage in an order where a stage comes after the stages it needs. A stage runs if
    its DONE file does not hold its record, or if a stage it needs runs (its output would have
    been built on something else)."""
    max_iters = script_settings("pretrain.py", [pretrain_config, *pretrain_args, *DATA])["max_iters"]
    stages = []
    for seed in seeds:
        text_dir = os.path.join(seed_dir(seed), "text")
        common = [pretrain_config, *pretrain_args, *DATA, f"--seed={seed}",
                  "--vision_start_frac=1.0", "--image_iters=0"]
        # The DONE record leaves save_fracs out, so that a run made for another grid still counts.
        text = Stage(f"seed {seed} text run", "text run", text_dir, "pretrain.py",
                     common + [f"--out_dir={text_dir}", f"--save_fracs={tuple(fracs)}"],
                     ["pretrain.py", *common, f"--out_dir={text_dir}"], [], (seed,), (0, max_iters))
        stages.append(text)
        made_by = {frac: text for frac in fracs}  # the stage that writes the checkpoint at frac
        if is_done(text):
            # A reused text run may lack checkpoints that a new grid needs: continue the text
            # schedule from the nearest earlier checkpoint (resume is exact) up to each missing one.
            have = {float(os.path.basename(p)[len("ckpt_frac"):-len(".pt")]): None
                    for p in glob.glob(os.path.join(text_dir, "ckpt_frac*.pt"))}
            for frac in sorted(f for f in fracs if not os.path.exists(frac_ckpt(text_dir, f))):
                earlier = [f for f in have if f < frac]
                init = frac_ckpt(text_dir, max(earlier)) if earlier else "scratch"
                extend_dir = os.path.join(text_dir, f"extend_frac{frac:.2f}")
                args = common + [f"--out_dir={extend_dir}", f"--init_from={init}", f"--save_fracs=({frac},)",
                                 f"--stop_at_iter={round(frac * max_iters)}"]
                needs = [have[max(earlier)]] if earlier and have[max(earlier)] else []
                made_by[frac] = have[frac] = Stage(
                    f"seed {seed} text run, extended to {frac:.2f}", "text run extension", extend_dir,
                    "pretrain.py", args, ["pretrain.py", *args], needs, (seed,),
                    (round(max(earlier, default=0.0) * max_iters), round(frac * max_iters)),
                    moved_ckpt=(frac_ckpt(extend_dir, frac), frac_ckpt(text_dir, frac)))
                stages.append(made_by[frac])
        for frac in fracs:
            for ratio in ratios:
                stages += cell_stages(seed, frac, ratio, made_by[frac], max_iters)
    for stage in stages:
        stage.run = stage.moved_ckpt is not None or not is_done(stage) or any(s.run for s in stage.needs)
    return stages


def is_done(stage):
    return read_json(os.path.join(stage.out_dir, "DONE")) == stage.record


def cell_stages(seed, frac, ratio, text_stage, max_iters):
    """Image phase, fine-tuning and evaluation of one cell."""
    directory = cell_dir(seed, frac, ratio)
    pretrain_dir, finetune_dir = os.path.join(directory, "pretrain"), os.path.join(directory, "finetune")
    label = f"seed {seed} frac {frac:.2f} ratio {ratio:.2f}"
    # Same pretrain_config and pretrain_args as the text run: pretrain.py refuses a branch whose
    # past settings differ. save_fracs=(frac,) keeps the weights at the branch point, which
    # must equal the text run's (tests/test_sweep.py checks it).
    image_args = [pretrain_config, *pretrain_args, *DATA, f"--seed={seed}", f"--out_dir={pretrain_dir}",
                  f"--init_from={frac_ckpt(os.path.join(seed_dir(seed), 'text'), frac)}",
                  f"--vision_start_frac={frac}", f"--image_ratio={ratio}",
                  *([f"--save_fracs=({frac},)"] if branch_point_ckpt else [])]
    image_iters = script_settings("pretrain.py", image_args)["image_iters"]
    start = round(frac * max_iters)
    image = Stage(f"{label} image phase", "image phase", pretrain_dir, "pretrain.py", image_args,
                  ["pretrain.py", *image_args], [text_stage], (seed, frac, ratio), (start, start + image_iters))
    finetune_args_ = [sft_config, *finetune_args, *DATA, f"--seed={seed}", f"--out_dir={finetune_dir}",
                      f"--init_from={os.path.join(pretrain_dir, 'ckpt.pt')}"]
    finetune = Stage(f"{label} fine-tuning", "fine-tuning", finetune_dir, "finetune.py", finetune_args_,
                     ["finetune.py", *finetune_args_], [image], (seed, frac, ratio))
    evaluate_args_ = [f"--ckpt={os.path.join(finetune_dir, 'ckpt.pt')}", *DATA, *evaluate_args]
    evaluate = Stage(f"{label} evaluation", "evaluation", os.path.join(directory, "evaluate"), "evaluate.py",
                     evaluate_args_, ["evaluate.py", *evaluate_args_], [finetune], (seed, frac, ratio))
    return [image, finetune, evaluate]


def eval_report(seed, frac, ratio):
    return read_json(os.path.join(cell_dir(seed, frac, ratio), "finetune", "ckpt.pt.eval.json"))


def caption_grounding(seed, frac, ratio):
    """How much the image phase taught the captions to read their pictures, before any
    fine-tuning: the held-out caption loss with each picture swapped for another's minus the
    loss with its own, at the phase's last evaluation (pretrain.py logs both); about 0 when the
    model ignores its pictures."""
    path = os.path.join(cell_dir(seed, frac, ratio), "pretrain", "log.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        records = [r for r in map(json.loads, f) if "val_caption_loss_swapped" in r]
    return records[-1]["val_caption_loss_swapped"] - records[-1]["val_caption_loss"] if records else None


# -----------------------------------------------------------------------------
# the local launcher: subprocesses on this machine

def local_command(stage):
    """The command the local launcher runs (and the dry run prints) for a stage."""
    if nproc > 1 and stage.script != "evaluate.py":  # evaluate.py is a single process
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                stage.script, *stage.args]
    return [sys.executable, stage.script, *stage.args]


def run_stage(stage, threads):
    """Runs the stage's script with its output in out_dir/stdout.txt, unless it is reused."""
    if not stage.run:
        say(f"reused   {stage.label}")
        return
    shutil.rmtree(stage.out_dir, ignore_errors=True)  # start clean: no checkpoints of another command
    os.makedirs(stage.out_dir)
    log_path = os.path.join(stage.out_dir, "stdout.txt")
    say(f"start    {stage.label}")
    t0 = time.time()
    with open(log_path, "w") as log:
        code = subprocess.run(local_command(stage), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads))).returncode
    if code != 0:
        say(f"FAILED   {stage.label}: exit code {code} after {time.time() - t0:.0f}s, see {log_path}")
        raise StageFailed(f"exit code {code}, see {log_path}")
    if stage.moved_ckpt:
        os.replace(*stage.moved_ckpt)
        os.remove(os.path.join(stage.out_dir, "ckpt.pt"))  # the same weights again (large at 1B)
    write_text(os.path.join(stage.out_dir, "DONE"), json.dumps(stage.record))
    say(f"finished {stage.label} in {time.time() - t0:.0f}s")


def run_locally(stages):
    """Runs every seed's text stages, then the cells, `parallel` at a time. Returns (reports,
    failures), both keyed by (seed, frac, ratio)."""
    # Every run gets an equal share of the cores, even a lone text run: more OpenMP threads than
    # free cores (another run starting, anything else on the machine) slow a run down many times.
    threads = max(1, CORES // (parallel * nproc))
    groups = {}  # (seed,) or (seed, frac, ratio) -> its stages, in order
    for stage in stages:
        groups.setdefault(stage.cell, []).append(stage)

    def run_group(key):
        for stage in groups[key]:
            run_stage(stage, threads)
        return eval_report(*key) if len(key) == 3 else None

    reports, failures = {}, {}
    grid = [key for key in groups if len(key) == 3]
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        try:
            jobs = {seed: pool.submit(run_group, (seed,)) for seed in seeds}
            for seed, job in jobs.items():
                try:
                    job.result()
                except StageFailed as e:
                    failures.update({key: f"text run: {e}" for key in grid if key[0] == seed})
            jobs = {key: pool.submit(run_group, key) for key in grid if key not in failures}
            for key, job in jobs.items():
                try:
                    reports[key] = job.result()
                except StageFailed as e:
                    failures[key] = str(e)
        except KeyboardInterrupt:  # Ctrl-C has stopped the running stages; start no others
            pool.shutdown(cancel_futures=True)
            sys.exit("interrupted: the same command continues the sweep")
    return reports, failures


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


def gpus(stage):
    return 1 if stage.script == "evaluate.py" else nodes * nproc


def tokens_per_step(stage):
    s = script_settings(stage.script, stage.args)
    return s["batch_size"] * s["grad_accum"] * s["seq_len"]


def job_parts(stage, first_iter):
    """The steps at which the stage's jobs stop: one job per part that fits into time_limit."""
    start, end = first_iter, stage.iters[1]
    steps_per_job = math.floor(limit_seconds(time_limit) * JOB_TIME_SHARE * gpus(stage) * gpu_tokens_per_s
                               / tokens_per_step(stage))
    if steps_per_job < 1:
        raise UserError(f"time_limit {time_limit} is too short for one step of {stage.label}")
    return list(range(start + steps_per_job, end, steps_per_job)) + [end]


def srun_command(stage, extra=()):
    """What the job runs: torchrun over the job's nodes for a multi-process training stage."""
    command = [*stage.args, *extra]
    if gpus(stage) == 1:
        return ["srun", sys.executable, stage.script, *command]
    if nodes == 1:
        rendezvous = ["--standalone"]
    else:  # every node's torchrun meets at the job's first node
        rendezvous = ["--nnodes=$SLURM_NNODES", "--rdzv_backend=c10d", "--rdzv_id=$SLURM_JOB_ID",
                      '--rdzv_endpoint="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)":29500']
    return ["srun", "--ntasks-per-node=1", sys.executable, "-m", "torch.distributed.run", *rendezvous,
            f"--nproc_per_node={nproc}", stage.script, *command]


def shell(words):
    return " ".join(w if w.startswith(("--nnodes=$", "--rdzv_id=$", "--rdzv_endpoint=")) else shlex.quote(w)
                    for w in words)


def job_script(stage, part, parts, stop_at):
    """The sbatch script of one job. A requeued (preempted) job, or a later part of a stage,
    finds out_dir/ckpt.pt and continues from it with init_from=resume; only the last part of a
    stage that succeeds writes DONE. A failure leaves FAILED, for the next invocation to report."""
    d = stage.out_dir
    job_nodes = 1 if stage.script == "evaluate.py" else nodes
    options = [f"--job-name={stage.label.replace(',', '').replace(' ', '_')}",
               f"--chdir={ROOT}",  # where the stages' paths start, as for the local launcher
               f"--output={d}/stdout.txt", "--open-mode=append", f"--nodes={job_nodes}", "--ntasks-per-node=1",
               f"--gpus-per-node={gpus(stage) // job_nodes}", f"--time={time_limit}",
               "--requeue", "--kill-on-invalid-dep=yes",
               *([f"--partition={partition}"] if partition else []), *([f"--account={account}"] if account else []),
               *sbatch_lines]
    extra = [f"--stop_at_iter={stop_at}"] if part < parts else []
    lines = ["#!/bin/bash", *[f"#SBATCH {o}" for o in options],
             f"# {stage.label}, part {part} of {parts}: written by sweep.py",
             "export PYTHONUNBUFFERED=1  # stdout.txt shows the progress as it happens"]
    if stage.script == "evaluate.py":
        lines.append(shell(srun_command(stage)))
    else:
        # without a checkpoint the job starts over, replacing what a job killed before its first one logged
        lines += [f"resume=--overwrite=True; if [ -e {shlex.quote(d)}/ckpt.pt ]; then resume=--init_from=resume; "
                  f"echo \"resuming from {d}/ckpt.pt\"; fi",
                  shell(srun_command(stage, extra)) + " $resume"]
    lines += ['code=$?', f'if [ $code -ne 0 ]; then echo "exit code $code" > {shlex.quote(d)}/FAILED.tmp && '
                         f'mv {shlex.quote(d)}/FAILED.tmp {shlex.quote(d)}/FAILED; exit $code; fi']
    if part == parts:
        if stage.moved_ckpt:
            lines.append(f"mv {shlex.quote(stage.moved_ckpt[0])} {shlex.quote(stage.moved_ckpt[1])} && "
                         f"rm {shlex.quote(d)}/ckpt.pt")
        lines.append(f"echo {shlex.quote(json.dumps(stage.record))} > {shlex.quote(d)}/DONE.tmp && "
                     f"mv {shlex.quote(d)}/DONE.tmp {shlex.quote(d)}/DONE")
    return "\n".join(lines) + "\n"


def queued_job_ids():
    """The ids of this user's jobs that SLURM still holds (pending, running, requeued)."""
    if shutil.which("squeue") is None:
        if dry_run:
            return set()
        raise UserError("launcher = 'slurm' needs SLURM's squeue and sbatch on PATH; squeue is not there")
    out = subprocess.run(["squeue", "--noheader", f"--user={getpass.getuser()}", "--format=%i"],
                         capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def read_text(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def waits_for(stage, needed, needed_parts):
    """The job of `needed` that `stage` waits for: an image phase starts as soon as the part of
    the text run that writes its checkpoint is done, anything else when all of `needed` is."""
    if needed.kind == "text run" and stage.kind == "image phase":
        return next(job for stop, job in needed_parts if stop >= stage.iters[0])
    return needed_parts[-1][1]


def submit_to_slurm(stages):
    """Submits (or with dry_run prints) a job for every stage that must run and is not queued
    already, each after the jobs of the stages it needs. Returns {cell: status} for the cells
    with a stage queued."""
    queued = queued_job_ids()
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
        keep = same and not any(s.run for s in stage.needs) and stage.moved_ckpt is None
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
        stops = job_parts(stage, first_iter) if stage.iters else [None]
        jobs = []
        for part, stop_at in enumerate(stops, 1):
            after = [waits_for(stage, s, parts[s.label]) for s in stage.needs if s.label in parts] if part == 1 \
                else jobs[-1:]
            dependency = [f"--dependency=afterok:{':'.join(after)}"] if after else []
            script = job_script(stage, part, len(stops), stop_at)
            if dry_run:
                jobs.append(f"#{submitted + len(jobs) + 1}")
                print(f"  job {jobs[-1]}: {stage.label}, part {part} of {len(stops)}"
                      + (f", after {', '.join(after)}" if after else "") + "\n    "
                      + shell(srun_command(stage, [f"--stop_at_iter={stop_at}"] if part < len(stops) else [])))
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

def checkpoint_bytes():
    """A checkpoint of the pretraining model with its AdamW state, from the model's size."""
    from data.tokenizer import load_tokenizer
    from model import VLM, model_config_from_settings
    s = script_settings("pretrain.py", [pretrain_config, *pretrain_args, *DATA])
    # The SigLIP tower's shape from its folder when it is local, else SigLIP-B/16's (nothing is
    # downloaded for a plan).
    siglip_dir = s["vision_weights"] if os.path.isdir(s["vision_weights"]) else None
    tokenizer = load_tokenizer(s["data_dir"])
    model_config = model_config_from_settings(s, tokenizer.vocab_size, tokenizer.image_id, siglip_dir)
    with torch.device("meta"):  # shapes only, no memory
        model = VLM(model_config)
    model.vision.encoder.requires_grad_(not s["freeze_vision"])  # as pretrain.py: no AdamW state when frozen
    weights = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights * WEIGHT_BYTES + trained * ADAMW_BYTES


def finetune_steps_and_tokens(stage):
    from data.shards import read_shard
    s = script_settings("finetune.py", stage.args)
    conversations = sft_conversations
    if not conversations:
        pattern = os.path.join(s["data_dir"], s["train_chat"])
        paths = sorted(glob.glob(os.path.join(ROOT, pattern)))
        if not paths:
            raise UserError(f"sft_conversations is 0 and no shards match {pattern}: set sft_conversations "
                             "(conversations per epoch) for the estimate")
        conversations = sum(read_shard(p).num_samples for p in paths)
    seq_len = s["seq_len"] or script_settings("pretrain.py", [pretrain_config, *pretrain_args, *DATA])["seq_len"]
    steps = s["epochs"] * math.ceil(conversations / ((s["batch_size"] - s["text_rows"]) * s["grad_accum"]))
    return steps, s["batch_size"] * s["grad_accum"] * seq_len


def estimate(stage, ckpt_bytes):
    """(GPU-hours, bytes on disk) of one stage."""
    if stage.script == "evaluate.py":
        return eval_gpu_hours, 0
    if stage.script == "finetune.py":
        steps, tokens = finetune_steps_and_tokens(stage)
        return steps * tokens / gpu_tokens_per_s / 3600, ckpt_bytes
    hours = (stage.iters[1] - stage.iters[0]) * tokens_per_step(stage) / gpu_tokens_per_s / 3600
    kept = {"text run": len(fracs) + 1,  # a checkpoint per fraction, and its last
            "text run extension": 1, "image phase": 1 + branch_point_ckpt}[stage.kind]
    return hours, kept * ckpt_bytes


def print_estimates(stages):
    ckpt_bytes = checkpoint_bytes()
    kinds = {}  # kind of stage -> [GPU-hours, bytes, of which still to run: GPU-hours, bytes]
    hours_alone, finish = {}, {}  # stage -> its wall hours; when it ends if every cell runs at once
    print(f"\nestimates at {gpu_tokens_per_s:,.0f} tokens/s per GPU, {ckpt_bytes / 1e9:.2f} GB per checkpoint:")
    for stage in stages:
        hours, size = estimate(stage, ckpt_bytes)
        total = kinds.setdefault(stage.kind, [0.0, 0, 0.0, 0])
        total[0] += hours
        total[1] += size
        if stage.run:
            total[2] += hours
            total[3] += size
        hours_alone[stage.label] = hours / gpus(stage) if stage.run else 0.0
        finish[stage.label] = hours_alone[stage.label] + max((finish[s.label] for s in stage.needs), default=0.0)
        # Only pretrain.py stages are split at time limits (their steps are known before they run)
        too_long = (launcher == "slurm" and not stage.iters
                    and hours / gpus(stage) * 3600 > limit_seconds(time_limit) * JOB_TIME_SHARE)
        print(f"  {stage.label}: {hours:,.1f} GPU-h, {size / 1e9:,.1f} GB" + ("" if stage.run else " (done)")
              + (f" (more than time_limit {time_limit} allows: raise it)" if too_long else ""))
    print("per kind of stage, all / still to run:")
    for kind, (hours, size, run_hours, run_size) in kinds.items():
        print(f"  {kind}: {hours:,.1f} / {run_hours:,.1f} GPU-h, {size / 1e9:,.1f} / {run_size / 1e9:,.1f} GB")
    # On SLURM every cell runs at once: at most the longest chain of stages still to run (an image
    # phase may start before the whole text run is done). Locally, one stage after another.
    wall = (f"at most {max(finish.values()):,.1f} hours with every cell running at once" if launcher == "slurm" else
            f"{sum(hours_alone.values()):,.1f} hours one stage after another")
    total = [sum(k[i] for k in kinds.values()) for i in range(4)]
    print(f"total: {total[0]:,.1f} GPU-h, {total[1] / 1e9:,.1f} GB; still to run {total[2]:,.1f} GPU-h, "
          f"{total[3] / 1e9:,.1f} GB; {wall}")


def print_local_plan(stages):
    for stage in stages:
        if not stage.run:
            print(f"  reused {stage.label}")
            continue
        needs = [s.label for s in stage.needs if s.run]
        print(f"  {stage.label}" + (f", after {', '.join(needs)}" if needs else "") + "\n    "
              + shell(local_command(stage)))


# -----------------------------------------------------------------------------
# results: one row per run, then the mean, spread and extremes over seeds

def number(metric, value):
    """A table cell: scores in points with a sign and one decimal, caption grounding in nats with
    a sign and three, bits per byte with three."""
    if value is None:
        return ""
    return f"{value:.3f}" if metric == "val_text_bpb" else f"{value:+.{3 if metric == 'caption_grounding' else 1}f}"


def write_results(grid, reports, not_ok):
    """results.json, .csv and .md; `not_ok` says why each cell without a report has none.
    Returns the summary over seeds."""
    any_report = next(iter(reports.values()), {"tasks": []})
    task_names = [t["name"] for t in sorted(any_report["tasks"], key=lambda t: (t["modality"] != "vision", t["name"]))]
    metrics = task_names + ["vision_avg", "text_avg", "overall_avg", "caption_grounding", "val_text_bpb"]
    rows = []
    for key in grid:
        seed, frac, ratio = key
        row = {"fraction": frac, "ratio": ratio, "seed": seed, "status": "ok" if key in reports else not_ok[key]}
        if key in reports:
            stable = {t["name"]: t["stable"] for t in reports[key]["tasks"]}
            row.update({name: stable.get(name) for name in task_names})
            row.update({m: reports[key].get(m) for m in metrics[len(task_names):]})
            row["caption_grounding"] = caption_grounding(*key)  # from the image phase's log, not the evaluation
        rows.append(row)

    summary = []
    for frac in fracs:
        for ratio in ratios:
            done = [r for r in rows if r["fraction"] == frac and r["ratio"] == ratio and r["status"] == "ok"]
            entry = {"fraction": frac, "ratio": ratio, "seeds": [r["seed"] for r in done]}
            for m in metrics:
                values = np.array([r[m] for r in done if r.get(m) is not None], dtype=float)
                entry[m] = {"mean": values.mean(), "std": values.std(ddof=1) if len(values) > 1 else 0.0,
                            "min": values.min(), "max": values.max()} if len(values) else None
            summary.append(entry)

    write_text(os.path.join(sweep_dir, "results.json"), json.dumps(
        {"settings": config, "runs": rows, "over_seeds": summary}, indent=1))

    # CSV: the runs, then per cell one row each for the mean, std, min and max over its seeds
    columns = ["fraction", "ratio", "seed", "status"] + metrics
    with atomic_write(os.path.join(sweep_dir, "results.csv"), newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        for entry in summary:
            for stat in ("mean", "std", "min", "max"):
                writer.writerow({"fraction": entry["fraction"], "ratio": entry["ratio"], "seed": stat,
                                 "status": f"{len(entry['seeds'])} of {len(seeds)} seeds",
                                 **{m: entry[m][stat] for m in metrics if entry[m] is not None}})

    header = ["start fraction", "image ratio", "seed"] + task_names + ["vision avg", "text avg", "overall",
                                                                     "caption grounding", "text bpb"]
    lines = ["# Sweep results", "",
             "Stable scores after fine-tuning: accuracy minus chance, in points (evaluate.py); text bpb is "
             "the text validation loss in bits per byte. Start fraction: where images start in the text "
             "schedule (0 = from the first step, 1 = after text pretraining); image ratio: the share of "
             "image-caption rows in the image phase. Caption grounding: at the end of the image phase, "
             "before fine-tuning, the held-out caption loss (nats per token) with every picture swapped for "
             "another's minus with its own; about 0 means the captions did not read their pictures.", "",
             "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for r in rows:
        values = [number(m, r.get(m)) for m in metrics]
        if r["status"] != "ok":
            values = [r["status"]] + [""] * (len(values) - 1)
        lines.append(f"| {r['fraction']:.2f} | {r['ratio']:.2f} | {r['seed']} | " + " | ".join(values) + " |")
    if len(seeds) > 1:
        lines += ["", "## Over seeds: mean (min .. max)", "",
                  "| " + " | ".join(["start fraction", "image ratio", "seeds"] + header[3:-1]) + " |",
                  "|" + "---:|" * (len(header) - 1)]
        for e in summary:
            cells = [f"{number(m, e[m]['mean'])} ({number(m, e[m]['min'])} .. {number(m, e[m]['max'])})" if e[m] else ""
                     for m in metrics[:-1]]
            lines.append(f"| {e['fraction']:.2f} | {e['ratio']:.2f} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
        lines += ["", "Start fractions that differ by more than the seed spread (one's lowest seed above the "
                  "other's highest):"]
        for metric, name in (("vision_avg", "vision average"), ("text_avg", "text average"),
                             ("caption_grounding", "caption grounding")):
            for ratio in ratios:
                pairs = beyond_spread([e for e in summary if e["ratio"] == ratio], metric)
                said = ", ".join(f"{hi:g} > {lo:g}" for hi, lo in pairs) or "none: every difference is within it"
                lines.append(f"- {name}, image ratio {ratio:g}: {said}")
    write_text(os.path.join(sweep_dir, "results.md"), "\n".join(lines) + "\n")
    return summary


def beyond_spread(entries, metric):
    """(higher, lower) start-fraction pairs whose min..max ranges over seeds do not overlap on
    `metric`: with three seeds, the one claim about a difference that this table supports."""
    scored = [e for e in entries if e[metric] and len(e["seeds"]) > 1]
    return [(a["fraction"], b["fraction"]) for a in scored for b in scored
            if a[metric]["min"] > b[metric]["max"]]


def plot_results(summary):
    """results.png: the two averages after fine-tuning and the caption grounding after the image
    phase against the start fraction, one line per ratio; the bars span the lowest to the
    highest seed."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("vision_avg", "vision tasks: average stable score", "accuracy - chance (points)"),
              ("text_avg", "text tasks: average stable score", "accuracy - chance (points)"),
              ("caption_grounding", "caption grounding after the image phase", "caption loss, swapped - own (nats)"))
    for ax, (metric, title, ylabel) in zip(axes, panels):
        for ratio in ratios:
            points = [e for e in summary if e["ratio"] == ratio and e[metric]]
            x = [e["fraction"] for e in points]
            mean = np.array([e[metric]["mean"] for e in points])
            spread = [mean - [e[metric]["min"] for e in points], [e[metric]["max"] for e in points] - mean]
            ax.errorbar(x, mean, yerr=spread, marker="o", capsize=3, label=f"image ratio {ratio:g}")
        ax.axhline(0.0, color="gray", linestyle=":", linewidth=1)  # chance; pictures ignored
        ax.set(title=title, xlabel="images start at (fraction of text pretraining)", ylabel=ylabel, xticks=fracs)
        ax.legend()
    fig.suptitle(f"{sweep_dir}: {len(seeds)} seed(s)" + (", bars: min to max over seeds" if len(seeds) > 1 else ""))
    fig.tight_layout()
    with atomic_write(os.path.join(sweep_dir, "results.png"), "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def lr_records(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return [], []
    with open(path) as f:
        records = [r for r in map(json.loads, f) if "lr" in r]
    return [r["iter"] for r in records], [r["lr"] for r in records]


def plot_lr_schedule():
    """lr_schedule.png: the text run and the image phase of every start fraction (first seed and
    ratio; the schedule does not depend on the ratio)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*lr_records(os.path.join(seed_dir(seeds[0]), "text")), color="black", linewidth=3, alpha=0.3,
            label="text only")
    for frac in fracs:
        ax.plot(*lr_records(os.path.join(cell_dir(seeds[0], frac, ratios[0]), "pretrain")),
                label=f"images from {frac:g}")
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate: text run and image phases")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(os.path.join(sweep_dir, "lr_schedule.png"), "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------

def check_settings():
    """The grid and the launcher's settings, before any plan: every start fraction, ratio and
    seed names one folder (frac0.50, ...) and one cell, so two that round alike would share it. A
    fraction outside [0, 1] would fail the text run and so every cell; a ratio that pretrain.py
    refuses fails only its own cells, with pretrain.py's message."""
    for name, values in (("fracs", fracs), ("ratios", ratios)):
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise UserError(f"{name} must be a non-empty tuple of numbers, got {values!r}")
        if name == "fracs" and not all(0.0 <= v <= 1.0 for v in values):
            raise UserError(f"fracs must lie in [0, 1], got {values!r}")
        folders = [f"{v:.2f}" for v in values]
        if len(set(folders)) < len(folders):
            raise UserError(f"{name} {values!r}: values that round to the same two decimals would share a folder "
                            f"({', '.join(sorted({f for f in folders if folders.count(f) > 1}))})")
    if not seeds or any(isinstance(v, bool) or not isinstance(v, int) for v in seeds) or len(set(seeds)) < len(seeds):
        raise UserError(f"seeds must be a non-empty tuple of distinct integers, got {seeds!r}")
    for name in ("nproc", "parallel", "nodes"):
        if config[name] < 1:
            raise UserError(f"{name} must be at least 1, got {config[name]}")
    if launcher not in ("local", "slurm"):
        raise UserError(f"launcher must be 'local' or 'slurm', got {launcher!r}")
    if gpu_tokens_per_s <= 0 or eval_gpu_hours < 0 or sft_conversations < 0:
        raise UserError("gpu_tokens_per_s must be positive, eval_gpu_hours and sft_conversations not negative")
    limit_seconds(time_limit)


def main():
    check_settings()
    if not dry_run:  # one sweep per folder: a second would run every stage again beside the first
        sweep_lock = lock_folder(sweep_dir, "sweep_dir")  # noqa: F841 (held until main returns)
    t_start = time.time()
    stages = plan()
    grid = [(seed, frac, ratio) for seed in seeds for frac in fracs for ratio in ratios]
    if dry_run:
        print(f"plan for {sweep_dir} ({launcher} launcher):")
        if launcher == "slurm":
            submit_to_slurm(stages)
        else:
            print_local_plan(stages)
        print_estimates(stages)
        return
    os.makedirs(sweep_dir, exist_ok=True)
    if launcher == "local":
        reports, failures = run_locally(stages)
        not_ok = {key: f"failed: {why}" for key, why in failures.items()}
    else:
        not_ok = submit_to_slurm(stages)
        done = {key for key in grid if key not in not_ok}
        reports = {key: eval_report(*key) for key in done}
        failures = {}
    summary = write_results(grid, reports, not_ok)
    plot_results(summary)
    plot_lr_schedule()
    say(f"sweep {'finished' if launcher == 'local' else 'submitted'} in {time.time() - t_start:.0f}s: "
        f"{len(reports)} of {len(grid)} cells done; results in {os.path.join(sweep_dir, 'results.md')}")
    if failures:
        for (seed, frac, ratio), why in failures.items():
            say(f"failed cell: seed {seed} frac {frac:.2f} ratio {ratio:.2f}: {why}")
        sys.exit(1)


if __name__ == "__main__":
    main()
