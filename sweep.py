"""
The study in one command: when during LM pretraining should a VLM first see images?

    python data/toyworld/prepare.py && python sweep.py config/toy_sweep.py
    python sweep.py config/toy_sweep.py --seeds="(1337, 1338, 1339)"
    python sweep.py config/1b_sweep.py --dry_run=True       # the plan: jobs, commands, GPU-hours, disk
    python sweep.py config/1b_sweep.py --launcher=slurm     # every stage an sbatch job

The grid is `axes`: settings of pretrain.py or finetune.py, each with the values to try; a cell
is one combination of values (and one seed). vision_start_frac, where images start as a fraction
of the text schedule, is always an axis. For each seed the sweep trains the text-only run once,
keeping a checkpoint at every start fraction f. Each cell then branches from the checkpoint at
its f, trains the image phase (pretrain.py with the cell's pretraining values), fine-tunes
(finetune.py with the cell's fine-tuning values, settings otherwise identical for every cell)
and evaluates (evaluate.py). Cells that differ only in fine-tuning values share their image
phase. The table, the plots and the raw numbers go to sweep_dir: results.md, results.csv,
results.json, results.png (every average against f, one line per combination of the other
axes) and lr_schedule.png (the learning rate of every branch against the text run's).

Folders: sweep_dir/seed1337/text is the text run; a cell's stages are in the folder its values
name, e.g. seed1337/frac0.80_ratio0.50/{pretrain,finetune,evaluate}. With fine-tuning axes the
image phase stays in the folder named by the pretraining axes alone (frac0.80_ratio0.50/pretrain)
and each cell fine-tunes and evaluates in its own (frac0.80_ratio0.50_epochs2/finetune, ...).

Every stage has its own out_dir, where its output goes to stdout.txt. A stage that succeeds
leaves a DONE file holding its command; running the sweep again reuses every stage whose DONE
matches the command it would run now (and whose inputs were not rebuilt), so an interrupted
sweep continues where it stopped, and a changed grid reuses the cells it shares with the old one.
A failed stage fails only its cells.

Launchers. "local" (the default) runs the stages here as subprocesses, `cells_at_once` cells at
a time, and writes the results at the end. "slurm" (sweep_slurm.py) submits every stage that is
not done as an sbatch job with --dependency=afterok on the stage it reads from, and returns:
running the same command again later submits only what is neither done nor queued, and writes
the results of the cells that are done.
"""

import ast
import concurrent.futures
import csv
import dataclasses
import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import matplotlib
import numpy as np

from common import lock_folder
from configurator import apply_overrides, script_settings
from data.atomic import atomic_write, write_text
from data.errors import UserError, report_user_errors
from schedule import image_start_step, text_checkpoint_name, total_steps
from sweep_slurm import Stage, limit_seconds, print_estimates, read_json, say, shell, submit_to_slurm

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# -----------------------------------------------------------------------------
# defaults (config/toy_sweep.py and config/1b_sweep.py override them)
sweep_dir = "out/sweep"
data_dir = ""  # given to every stage when set (the toy world holds all their data); "" = each config's own
pretrain_config = "config/toy.py"
sft_config = "config/toy_sft.py"
# The grid: a setting of pretrain.py or finetune.py -> the values to try; one cell per
# combination, per seed. A name that both scripts have (batch_size, learning_rate, ...) takes a
# "pretrain." or "finetune." prefix. vision_start_frac (where images start, as a fraction of the
# text schedule) must be an axis. The text run is shared by every cell, so a pretraining axis must
# be a setting of the image phase (pretrain.py's IMAGE_PHASE_SETTINGS); a fine-tuning axis, e.g.
# "finetune.epochs": (2, 4), changes only fine-tuning, and its cells share their image phase.
axes = {"vision_start_frac": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        "image_ratio": (0.5,)}  # share of image-caption rows in the image phase: the toy's (docs/toy_notes.md)
seeds = (1337,)
# Extra "--key=value" arguments for every call of a stage, e.g. a smaller model. The sweep's own
# arguments (out_dir, init_from, seed, the cell's values) come after them and win.
pretrain_args = ()
finetune_args = ()
evaluate_args = ()
nproc = 1  # processes (GPUs) per pretraining/fine-tuning run, per node under SLURM (> 1: torchrun)
cells_at_once = 1  # local launcher: cells run at once; for CPU machines, where the runs split the cores
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
SHORT_NAMES = {"vision_start_frac": "frac", "image_ratio": "ratio", "instruct_ratio": "instruct"}  # frac0.80_ratio0.50
SET_BY_THE_SWEEP = ("seed", "out_dir", "init_from")  # what it gives every fine-tuning itself


class StageFailed(Exception):
    pass


# -----------------------------------------------------------------------------
# the grid: its axes, cells and folders

@dataclasses.dataclass(frozen=True)
class Axis:
    name: str  # the setting, "pretrain." or "finetune." before it when both scripts have one so named
    script: str  # "pretrain.py" (the image phase) or "finetune.py"
    setting: str
    values: tuple


def setting_names(script):
    """A training script's settings: the literal assignments before its `config =
    apply_overrides(...)`; those after it (iter_num, ...) are its state."""
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "apply_overrides":
                break
            names.add(node.targets[0].id)
    return names & set(script_settings(script, []))


def value_text(axis, value):
    """A value as folders, labels and tables write it: the start fraction and the image ratio with
    two decimals (as the text run's checkpoints name fractions), others as Python prints them."""
    if axis.name in SHORT_NAMES:
        return f"{value:.2f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def read_axes(grid):
    """The Axis of every entry of `grid` (the setting `axes`), vision_start_frac first as in the
    folder names; a UserError names the first entry that is wrong."""
    names = {script: setting_names(script) for script in ("pretrain.py", "finetune.py")}
    branchable = script_settings("pretrain.py", [])["IMAGE_PHASE_SETTINGS"]
    result = []
    for key, values in grid.items():
        prefix, _, setting = key.rpartition(".")
        if prefix:
            script = f"{prefix}.py"
            if script not in names:
                raise UserError(f"axes: {key!r} must be a setting, or 'pretrain.' or 'finetune.' and a setting")
            if setting not in names[script]:
                raise UserError(f"axes: {script} has no setting {setting!r}")
        else:
            scripts = [s for s in names if setting in names[s]]
            if not scripts:
                raise UserError(f"axes: unknown setting {key!r}: neither pretrain.py nor finetune.py has it")
            if len(scripts) > 1:
                raise UserError(f"axes: pretrain.py and finetune.py both have {key!r}: "
                                f"write 'pretrain.{key}' or 'finetune.{key}'")
            script = scripts[0]
        name = setting if sum(setting in n for n in names.values()) == 1 else f"{script[:-3]}.{setting}"
        if any(a.name == name for a in result):
            raise UserError(f"axes: {name} is given twice")
        if script == "pretrain.py" and setting not in branchable:
            raise UserError(f"axes: {name} cannot be an axis: every cell branches from the same text run, so "
                            f"a pretraining axis must be a setting of the image phase ({', '.join(branchable)})")
        if script == "finetune.py" and setting in SET_BY_THE_SWEEP:
            raise UserError(f"axes: {name} cannot be an axis: the sweep sets it (the seeds are `seeds`)")
        if not isinstance(values, (tuple, list)) or not values:
            raise UserError(f"axes: {name} must have a non-empty tuple of values, got {values!r}")
        for value in values:  # the script's own type check, on the argument that the stage will get
            try:
                script_settings(script, [f"--{setting}={value}"])
            except UserError as e:
                raise UserError(f"axes: {e}") from None
        axis = Axis(name, script, setting, tuple(values))
        texts = [value_text(axis, v) for v in values]
        if any(not re.fullmatch(r"[\w.+-]+", t) for t in texts):
            raise UserError(f"axes: {name} {values!r}: every value must write as a folder name (letters, "
                            "digits, '.', '+', '-', '_')")
        if len(set(texts)) < len(texts):
            raise UserError(f"axes: {name} {values!r}: values that read alike would share a folder "
                            f"({', '.join(sorted({t for t in texts if texts.count(t) > 1}))})")
        result.append(axis)
    if not any(a.name == "vision_start_frac" for a in result):
        raise UserError("axes must include vision_start_frac: every cell branches from the text run at its "
                        "start fraction")
    result.sort(key=lambda a: a.name != "vision_start_frac")  # stable: the others in the order given
    if not all(0.0 <= v <= 1.0 for v in result[0].values):
        raise UserError(f"axes: vision_start_frac must lie in [0, 1], got {result[0].values!r}")
    return result


@functools.cache
def grid_axes():
    return read_axes(axes)


def grid_cells():
    """Every cell's key: (seed, value of each axis in grid_axes() order)."""
    return [(seed, *values) for seed in seeds for values in itertools.product(*(a.values for a in grid_axes()))]


def axis_values(key, script=None):
    """[(axis, value)] of a cell's key; of one script's axes only when `script` is given."""
    return [(a, v) for a, v in zip(grid_axes(), key[1:]) if script in (None, a.script)]


def image_phase_key(key):
    """The key of a cell's image phase, which the cells alike in every pretraining value share."""
    return (key[0], *[v for _, v in axis_values(key, "pretrain.py")])


def folder_name(pairs):
    return "_".join(f"{SHORT_NAMES.get(a.name, a.name)}{value_text(a, v)}" for a, v in pairs)


def cell_label(key, script=None):
    return f"seed {key[0]} " + " ".join(f"{SHORT_NAMES.get(a.name, a.name)} {value_text(a, v)}"
                                        for a, v in axis_values(key, script))


def seed_dir(seed):
    return os.path.join(sweep_dir, f"seed{seed}")


def text_checkpoint(seed, frac):
    """The text run's checkpoint at `frac`, where the image phases at `frac` branch off."""
    return os.path.join(seed_dir(seed), "text", text_checkpoint_name(frac))


def cell_dir(key):
    """Where a cell fine-tunes and evaluates."""
    return os.path.join(seed_dir(key[0]), folder_name(axis_values(key)))


def image_phase_dir(key):
    return os.path.join(seed_dir(key[0]), folder_name(axis_values(key, "pretrain.py")), "pretrain")


def pretrain_settings():
    """What pretrain_config and pretrain_args make of pretrain.py's settings, before the sweep's own."""
    return script_settings("pretrain.py", [pretrain_config, *pretrain_args, *DATA])


# -----------------------------------------------------------------------------
# the plan: every stage of every cell, and which of them must run

def plan():
    """Every stage in an order where a stage comes after the stages it needs. A stage runs if
    its DONE file does not hold its record, or if a stage it needs runs (its output would have
    been built on something else)."""
    settings = pretrain_settings()
    fracs = grid_axes()[0].values

    def text_step(frac):  # where a branch at frac leaves the text run
        return image_start_step({**settings, "vision_start_frac": frac})

    stages = []
    for seed in seeds:
        text_dir = os.path.join(seed_dir(seed), "text")
        common = [pretrain_config, *pretrain_args, *DATA, f"--seed={seed}",
                  "--vision_start_frac=1.0", "--image_iters=0"]
        # The DONE record leaves save_fracs out, so that a run made for another grid still counts.
        text = Stage(f"seed {seed} text run", "text run", text_dir, "pretrain.py",
                     common + [f"--out_dir={text_dir}", f"--save_fracs={tuple(fracs)}"],
                     ["pretrain.py", *common, f"--out_dir={text_dir}"], [], (seed,), (0, settings["max_iters"]))
        stages.append(text)
        made_by = {frac: text for frac in fracs}  # the stage that writes the checkpoint at frac
        if is_done(text):
            # A reused text run may lack checkpoints that a new grid needs: continue the text
            # schedule from the nearest earlier checkpoint (resume is exact) up to each missing one.
            # Checkpoint names tell fractions apart to two decimals: these 101 are all it can hold.
            have = {f: None for f in (i / 100 for i in range(101)) if os.path.exists(text_checkpoint(seed, f))}
            for frac in sorted(f for f in fracs if not os.path.exists(text_checkpoint(seed, f))):
                earlier = [f for f in have if f < frac]
                init = text_checkpoint(seed, max(earlier)) if earlier else "scratch"
                extend_dir = os.path.join(text_dir, f"extend_frac{frac:.2f}")
                args = common + [f"--out_dir={extend_dir}", f"--init_from={init}", f"--save_fracs=({frac},)",
                                 f"--stop_at_iter={text_step(frac)}"]
                needs = [have[max(earlier)]] if earlier and have[max(earlier)] else []
                made_by[frac] = have[frac] = Stage(
                    f"seed {seed} text run, extended to {frac:.2f}", "text run extension", extend_dir,
                    "pretrain.py", args, ["pretrain.py", *args], needs, (seed,),
                    (text_step(max(earlier, default=0.0)), text_step(frac)),
                    moved_ckpt=(os.path.join(extend_dir, text_checkpoint_name(frac)), text_checkpoint(seed, frac)))
                stages.append(made_by[frac])
        image_phases = {}  # image_phase_key -> its stage
        for values in itertools.product(*(a.values for a in grid_axes())):
            key = (seed, *values)
            if image_phase_key(key) not in image_phases:
                image_phases[image_phase_key(key)] = image_phase(key, made_by[key[1]])
                stages.append(image_phases[image_phase_key(key)])
            stages += finetune_and_evaluate(key, image_phases[image_phase_key(key)])
    for stage in stages:
        stage.run = stage.moved_ckpt is not None or not is_done(stage) or any(s.run for s in stage.needs)
    return stages


def is_done(stage):
    return read_json(os.path.join(stage.out_dir, "DONE")) == stage.record


def image_phase(key, text_stage):
    """A cell's image phase (shared by the cells that differ from it only in fine-tuning values):
    pretrain.py from the text run's checkpoint at the cell's start fraction, with its pretraining values."""
    seed, frac = key[0], key[1]
    out_dir = image_phase_dir(key)
    # Same pretrain_config and pretrain_args as the text run: pretrain.py refuses a branch whose
    # past settings differ. save_fracs=(frac,) keeps the weights at the branch point, which
    # must equal the text run's (tests/test_sweep.py checks it).
    args = [pretrain_config, *pretrain_args, *DATA, f"--seed={seed}", f"--out_dir={out_dir}",
            f"--init_from={text_checkpoint(seed, frac)}",
            *[f"--{a.setting}={v}" for a, v in axis_values(key, "pretrain.py")],
            *([f"--save_fracs=({frac},)"] if branch_point_ckpt else [])]
    settings = script_settings("pretrain.py", args)
    return Stage(f"{cell_label(key, 'pretrain.py')} image phase", "image phase", out_dir, "pretrain.py", args,
                 ["pretrain.py", *args], [text_stage], image_phase_key(key),
                 (image_start_step(settings), total_steps(settings)))


def finetune_and_evaluate(key, image):
    """A cell's fine-tuning, from its image phase, with its fine-tuning values, and its evaluation."""
    finetune_dir = os.path.join(cell_dir(key), "finetune")
    label = cell_label(key)
    args = [sft_config, *finetune_args, *DATA, f"--seed={key[0]}", f"--out_dir={finetune_dir}",
            f"--init_from={os.path.join(image.out_dir, 'ckpt.pt')}",
            *[f"--{a.setting}={v}" for a, v in axis_values(key, "finetune.py")]]
    finetune = Stage(f"{label} fine-tuning", "fine-tuning", finetune_dir, "finetune.py", args,
                     ["finetune.py", *args], [image], key)
    evaluate_args_ = [f"--ckpt={os.path.join(finetune_dir, 'ckpt.pt')}", *DATA, *evaluate_args]
    evaluate = Stage(f"{label} evaluation", "evaluation", os.path.join(cell_dir(key), "evaluate"), "evaluate.py",
                     evaluate_args_, ["evaluate.py", *evaluate_args_], [finetune], key)
    return [finetune, evaluate]


def eval_report(key):
    return read_json(os.path.join(cell_dir(key), "finetune", "ckpt.pt.eval.json"))


def caption_grounding(key):
    """How much the image phase taught the captions to read their pictures, before any
    fine-tuning: the held-out caption loss with each picture swapped for another's minus the
    loss with its own, at the phase's last evaluation (pretrain.py logs both); about 0 when the
    model ignores its pictures."""
    path = os.path.join(image_phase_dir(key), "log.jsonl")
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
    """Runs every seed's text stages, then the cells, `cells_at_once` at a time; an image phase
    runs once, in the first of its cells to start. Returns (reports, failures), both keyed by cell."""
    # Every run gets an equal share of the cores, even a lone text run: more OpenMP threads than
    # free cores (another run starting, anything else on the machine) slow a run down many times.
    threads = max(1, CORES // (cells_at_once * nproc))
    text_stages, cell_stages = {}, {}  # seed -> its text run (and extensions); cell -> fine-tuning, evaluation
    for stage in stages:
        if stage.kind in ("text run", "text run extension"):
            text_stages.setdefault(stage.cell[0], []).append(stage)
        elif stage.kind != "image phase":
            cell_stages.setdefault(stage.cell, []).append(stage)
    image_locks = {stage.label: threading.Lock() for stage in stages if stage.kind == "image phase"}
    image_failures = {}  # image phase label -> why it failed; None: it succeeded

    def run_image_phase(stage):
        with image_locks[stage.label]:  # its other cells wait here until it is done
            if stage.label not in image_failures:
                try:
                    run_stage(stage, threads)
                    image_failures[stage.label] = None
                except StageFailed as e:
                    image_failures[stage.label] = str(e)
        if image_failures[stage.label] is not None:
            raise StageFailed(image_failures[stage.label])

    def run_text(seed):
        for stage in text_stages[seed]:
            run_stage(stage, threads)

    def run_cell(key):
        run_image_phase(cell_stages[key][0].needs[0])
        for stage in cell_stages[key]:
            run_stage(stage, threads)
        return eval_report(key)

    reports, failures = {}, {}
    # One cell of every image phase first, so that no cell idles waiting for another's image phase
    # while some image phase has not started.
    grid = sorted(cell_stages, key=lambda key: [a.values.index(v) for a, v in axis_values(key, "finetune.py")])
    with concurrent.futures.ThreadPoolExecutor(cells_at_once) as pool:
        try:
            jobs = {seed: pool.submit(run_text, seed) for seed in seeds}
            for seed, job in jobs.items():
                try:
                    job.result()
                except StageFailed as e:
                    failures.update({key: f"text run: {e}" for key in grid if key[0] == seed})
            jobs = {key: pool.submit(run_cell, key) for key in grid if key not in failures}
            for key, job in jobs.items():
                try:
                    reports[key] = job.result()
                except StageFailed as e:
                    failures[key] = str(e)
        except KeyboardInterrupt:  # Ctrl-C has stopped the running stages; start no others
            pool.shutdown(cancel_futures=True)
            sys.exit("interrupted: the same command continues the sweep")
    return reports, failures


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


def averages_of(summary):
    """The averages that evaluate.py reported (vision_avg, text_avg, overall_avg, ...), in its order."""
    return [m for m in summary[0] if m.endswith("_avg")]


def other_axes_combinations(axis=None):
    """[(axis, value)] for every combination of the axes other than `axis` (vision_start_frac)."""
    others = [a for a in grid_axes() if a is not (axis or grid_axes()[0])]
    return [list(zip(others, values)) for values in itertools.product(*(a.values for a in others))]


def describe(pairs):
    return ", ".join(f"{a.name} {value_text(a, v)}" for a, v in pairs)


def write_results(grid, reports, not_ok):
    """results.json, .csv and .md; `not_ok` says why each cell without a report has none.
    Returns the summary over seeds."""
    any_report = next(iter(reports.values()), {"tasks": []})
    task_names = [t["name"] for t in sorted(any_report["tasks"], key=lambda t: (t["modality"] != "vision", t["name"]))]
    averages = list(dict.fromkeys(m for report in reports.values() for m in report if m.endswith("_avg")))
    metrics = task_names + averages + ["caption_grounding", "val_text_bpb"]
    names = [a.name for a in grid_axes()]
    rows = []
    for key in grid:
        row = {**dict(zip(names, key[1:])), "seed": key[0], "status": "ok" if key in reports else not_ok[key]}
        if key in reports:
            stable = {t["name"]: t["stable"] for t in reports[key]["tasks"]}
            row.update({name: stable.get(name) for name in task_names})
            row.update({m: reports[key].get(m) for m in averages + ["val_text_bpb"]})
            row["caption_grounding"] = caption_grounding(key)  # from the image phase's log, not the evaluation
        rows.append(row)

    summary = []  # per combination of the axes' values
    for values in itertools.product(*(a.values for a in grid_axes())):
        done = [r for r in rows if tuple(r[n] for n in names) == values and r["status"] == "ok"]
        entry = {**dict(zip(names, values)), "seeds": [r["seed"] for r in done]}
        for m in metrics:
            numbers = np.array([r[m] for r in done if r.get(m) is not None], dtype=float)
            entry[m] = {"mean": numbers.mean(), "std": numbers.std(ddof=1) if len(numbers) > 1 else 0.0,
                        "min": numbers.min(), "max": numbers.max()} if len(numbers) else None
        summary.append(entry)

    write_text(os.path.join(sweep_dir, "results.json"), json.dumps(
        {"settings": config, "runs": rows, "over_seeds": summary}, indent=1))

    # CSV: the runs, then per combination one row each for the mean, std, min and max over its seeds
    columns = names + ["seed", "status"] + metrics
    with atomic_write(os.path.join(sweep_dir, "results.csv"), newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        for entry in summary:
            for stat in ("mean", "std", "min", "max"):
                writer.writerow({**{n: entry[n] for n in names}, "seed": stat,
                                 "status": f"{len(entry['seeds'])} of {len(seeds)} seeds",
                                 **{m: entry[m][stat] for m in metrics if entry[m] is not None}})

    def axis_cells(entry):
        return [value_text(a, entry[a.name]) for a in grid_axes()]

    header = task_names + [m[:-len("_avg")] + " avg" for m in averages] + ["caption grounding", "text bpb"]
    lines = ["# Sweep results", "",
             "Stable scores after fine-tuning: accuracy minus chance, in points (evaluate.py); text bpb is "
             "the text validation loss in bits per byte. The first columns are the sweep's axes, settings "
             "of pretrain.py and finetune.py; vision_start_frac is where images start in the text schedule "
             "(0 = from the first step, 1 = after text pretraining). Caption grounding: at the end of the "
             "image phase, before fine-tuning, the held-out caption loss (nats per token) with every picture "
             "swapped for another's minus with its own; about 0 means the captions did not read their pictures.",
             "", "| " + " | ".join(names + ["seed"] + header) + " |", "|" + "---:|" * (len(names) + 1 + len(header))]
    for r in rows:
        values = [number(m, r.get(m)) for m in metrics]
        if r["status"] != "ok":
            values = [r["status"]] + [""] * (len(values) - 1)
        lines.append("| " + " | ".join(axis_cells(r) + [str(r["seed"])] + values) + " |")
    if len(seeds) > 1:
        lines += ["", "## Over seeds: mean (min .. max)", "",
                  "| " + " | ".join(names + ["seeds"] + header[:-1]) + " |",
                  "|" + "---:|" * (len(names) + len(header))]
        for e in summary:
            cells = [f"{number(m, e[m]['mean'])} ({number(m, e[m]['min'])} .. {number(m, e[m]['max'])})"
                     if e[m] else "" for m in metrics[:-1]]
            lines.append("| " + " | ".join(axis_cells(e) + [str(len(e["seeds"]))] + cells) + " |")
        lines += ["", "Values of an axis that differ by more than the seed spread (one's lowest seed above the "
                  "other's highest), with the other axes alike:"]
        for axis in (a for a in grid_axes() if len(a.values) > 1):
            for metric in averages + ["caption_grounding"]:
                for pairs in other_axes_combinations(axis):
                    alike = [e for e in summary if all(e[a.name] == v for a, v in pairs)]
                    said = ", ".join(f"{value_text(axis, hi)} > {value_text(axis, lo)}"
                                     for hi, lo in beyond_spread(alike, metric, axis.name))
                    lines.append(f"- {metric_title(metric)}, {axis.name}" + (f" ({describe(pairs)})" if pairs else "")
                                 + f": {said or 'none: every difference is within it'}")
    write_text(os.path.join(sweep_dir, "results.md"), "\n".join(lines) + "\n")
    return summary


def metric_title(metric):
    return metric[:-len("_avg")] + " average" if metric.endswith("_avg") else metric.replace("_", " ")


def beyond_spread(entries, metric, axis="vision_start_frac"):
    """(higher, lower) pairs of the axis' values whose min..max ranges over seeds do not overlap on
    `metric`: with three seeds, the one claim about a difference that this table supports."""
    scored = [e for e in entries if e[metric] and len(e["seeds"]) > 1]
    return [(a[axis], b[axis]) for a in scored for b in scored if a[metric]["min"] > b[metric]["max"]]


def plot_results(summary):
    """results.png: every average after fine-tuning and the caption grounding after the image
    phase against the start fraction, one line per combination of the other axes; the bars span
    the lowest to the highest seed."""
    panels = [(m, f"{metric_title(m)} after fine-tuning", "accuracy - chance (points)") for m in averages_of(summary)]
    panels.append(("caption_grounding", "caption grounding after the image phase",
                   "caption loss, swapped - own (nats)"))
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axs = plt.subplots(rows, columns, figsize=(5 * columns, 4.2 * rows), squeeze=False)
    for ax in axs.flat[len(panels):]:
        ax.set_axis_off()
    for ax, (metric, title, ylabel) in zip(axs.flat, panels):
        for pairs in other_axes_combinations():
            points = [e for e in summary if e[metric] and all(e[a.name] == v for a, v in pairs)]
            x = [e["vision_start_frac"] for e in points]
            mean = np.array([e[metric]["mean"] for e in points])
            spread = [mean - [e[metric]["min"] for e in points], [e[metric]["max"] for e in points] - mean]
            ax.errorbar(x, mean, yerr=spread, marker="o", capsize=3, label=describe(pairs) or None)
        ax.axhline(0.0, color="gray", linestyle=":", linewidth=1)  # chance; pictures ignored
        ax.set(title=title, xlabel="images start at (fraction of text pretraining)", ylabel=ylabel,
               xticks=grid_axes()[0].values)
        if len(grid_axes()) > 1:
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
    """lr_schedule.png: the text run and the image phase of every start fraction (first seed, and
    the first value of every other axis)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*lr_records(os.path.join(seed_dir(seeds[0]), "text")), color="black", linewidth=3, alpha=0.3,
            label="text only")
    others = [a.values[0] for a in grid_axes()[1:]]
    for frac in grid_axes()[0].values:
        ax.plot(*lr_records(image_phase_dir((seeds[0], frac, *others))), label=f"images from {frac:g}")
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate: text run and image phases")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(os.path.join(sweep_dir, "lr_schedule.png"), "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------

def check_settings():
    """The grid and the launcher's settings, before any plan: every value of an axis names a
    folder (frac0.50, epochs2, ...) and every seed one, so two values that read alike would
    share one. A start fraction outside [0, 1] would fail the text run and so every cell; a value
    of the right type that pretrain.py or finetune.py refuses fails only its own cells, with the
    script's message."""
    grid_axes()
    if not seeds or any(isinstance(v, bool) or not isinstance(v, int) for v in seeds) or len(set(seeds)) < len(seeds):
        raise UserError(f"seeds must be a non-empty tuple of distinct integers, got {seeds!r}")
    for name in ("nproc", "cells_at_once", "nodes"):
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
    grid = grid_cells()
    if dry_run:
        print(f"plan for {sweep_dir} ({launcher} launcher):")
        if launcher == "slurm":
            submit_to_slurm(stages, config)
        else:
            print_local_plan(stages)
        print_estimates(stages, config, pretrain_settings())
        return
    os.makedirs(sweep_dir, exist_ok=True)
    if launcher == "local":
        reports, failures = run_locally(stages)
        not_ok = {key: f"failed: {why}" for key, why in failures.items()}
    else:
        status = submit_to_slurm(stages, config)  # by Stage.cell
        # a queued cell's status is its image phase's when that is queued (it may say it failed before)
        not_ok = {key: status.get(image_phase_key(key), status.get(key)) for key in grid if key in status}
        reports = {key: eval_report(key) for key in grid if key not in not_ok}
        failures = {}
    summary = write_results(grid, reports, not_ok)
    plot_results(summary)
    plot_lr_schedule()
    say(f"sweep {'finished' if launcher == 'local' else 'submitted'} in {time.time() - t_start:.0f}s: "
        f"{len(reports)} of {len(grid)} cells done; results in {os.path.join(sweep_dir, 'results.md')}")
    if failures:
        for key, why in failures.items():
            say(f"failed cell: {cell_label(key)}: {why}")
        sys.exit(1)


if __name__ == "__main__":
    main()
