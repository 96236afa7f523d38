"""
The study in one command: when during LM pretraining should a VLM first see images?

    python data/toyworld/prepare.py && python sweep.py config/toy_sweep.py
    python sweep.py config/toy_sweep.py --seeds="(1337, 1338, 1339)"
    python sweep.py config/1b_sweep.py

For each seed it trains the text-only run once, keeping a checkpoint at every start fraction f
of the grid. Each (f, image ratio) cell then branches from the checkpoint at f, trains the image
phase (pretrain.py --vision_start_frac=f), fine-tunes (finetune.py, identical settings for every
cell) and evaluates (evaluate.py). The table, the plots and the raw numbers go to sweep_dir:
results.md, results.csv, results.json, results.png (vision and text averages against f) and
lr_schedule.png (the learning rate of every branch against the text run's).

Every stage is a subprocess with its own out_dir, where its output goes to stdout.txt. A stage
that exits 0 leaves a DONE file holding its command; running the sweep again reuses every stage
whose DONE matches the command it would run now, so an interrupted sweep continues where it
stopped, and a changed grid reuses the cells it shares with the old one. A failed stage fails
only its cell: the others finish, and the sweep exits non-zero at the end.
"""

import concurrent.futures
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import matplotlib
import numpy as np
import torch

from configurator import apply_overrides

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
nproc = 1  # processes per pretraining/fine-tuning run (> 1: torch.distributed.run)
parallel = 1  # cells run at once; for CPU machines, where the runs split the cores between them
branch_point_ckpt = True  # each branch also keeps its weights at the branch point (a check, see below)
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])
ROOT = os.path.dirname(os.path.abspath(__file__))
CORES = len(os.sched_getaffinity(0))
print_lock = threading.Lock()
DATA = [f"--data_dir={data_dir}"] if data_dir else []


class StageFailed(Exception):
    pass


def say(message):
    with print_lock:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_atomically(path, text):
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def run_stage(label, out_dir, script, args, threads, fresh, record=None):
    """Runs `script args` with its output in out_dir/stdout.txt. Skipped when out_dir/DONE holds
    `record` (default: the command) from an earlier run, unless `fresh`: an upstream stage has
    just run, so whatever is here was built on something else. Returns whether it ran."""
    command = [script, *args]
    record = command if record is None else record
    done = os.path.join(out_dir, "DONE")
    if not fresh and os.path.exists(done):
        with open(done) as f:
            if json.load(f) == record:
                say(f"reused   {label}")
                return False
    shutil.rmtree(out_dir, ignore_errors=True)  # start clean: no checkpoints of another command
    os.makedirs(out_dir)
    if nproc > 1 and script != "evaluate.py":  # evaluate.py is a single process
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        launcher = [sys.executable]
    log_path = os.path.join(out_dir, "stdout.txt")
    say(f"start    {label}")
    t0 = time.time()
    with open(log_path, "w") as log:
        code = subprocess.run(launcher + command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads))).returncode
    if code != 0:
        say(f"FAILED   {label}: exit code {code} after {time.time() - t0:.0f}s, see {log_path}")
        raise StageFailed(f"exit code {code}, see {log_path}")
    write_atomically(done, json.dumps(record))
    say(f"finished {label} in {time.time() - t0:.0f}s")
    return True


def seed_dir(seed):
    return os.path.join(sweep_dir, f"seed{seed}")


def cell_dir(seed, frac, ratio):
    return os.path.join(seed_dir(seed), f"frac{frac:.2f}_ratio{ratio:.2f}")


def frac_ckpt(directory, frac):
    return os.path.join(directory, f"ckpt_frac{frac:.2f}.pt")  # pretrain.py's name for it


def text_run(seed, threads):
    """Trains the text-only run of a seed, keeping a checkpoint at every fraction of the grid, and
    returns the fractions whose checkpoint is new (their cells must be rebuilt)."""
    text_dir = os.path.join(seed_dir(seed), "text")
    common = [pretrain_config, *pretrain_args, *DATA, f"--seed={seed}",
              "--vision_start_frac=1.0", "--image_iters=0"]
    # The DONE record leaves save_fracs out, so that a run made for another grid still counts.
    ran = run_stage(f"seed {seed} text run", text_dir, "pretrain.py",
                    common + [f"--out_dir={text_dir}", f"--save_fracs={tuple(fracs)}"], threads, fresh=False,
                    record=["pretrain.py", *common, f"--out_dir={text_dir}"])
    if ran:
        return set(fracs)
    # A reused text run may lack checkpoints that a new grid needs: continue the text schedule
    # from the nearest earlier checkpoint (resume is exact) up to each missing fraction.
    new = set()
    missing = sorted(f for f in fracs if not os.path.exists(frac_ckpt(text_dir, f)))
    if missing:  # mmap: reads the settings, not the weights
        max_iters = torch.load(os.path.join(text_dir, "ckpt.pt"), map_location="cpu", mmap=True,
                               weights_only=False)["config"]["max_iters"]
    for frac in missing:
        have = sorted(float(os.path.basename(p)[len("ckpt_frac"):-len(".pt")])
                      for p in glob.glob(os.path.join(text_dir, "ckpt_frac*.pt")))
        earlier = [f for f in have if f < frac]
        init = frac_ckpt(text_dir, earlier[-1]) if earlier else "scratch"
        extend_dir = os.path.join(text_dir, f"extend_frac{frac:.2f}")
        run_stage(f"seed {seed} text run, extended to {frac:.2f}", extend_dir, "pretrain.py",
                  common + [f"--out_dir={extend_dir}", f"--init_from={init}", f"--save_fracs=({frac},)",
                            f"--stop_at_iter={round(frac * max_iters)}"], threads, fresh=True)
        os.replace(frac_ckpt(extend_dir, frac), frac_ckpt(text_dir, frac))
        os.remove(os.path.join(extend_dir, "ckpt.pt"))  # the same weights again (large at 1B)
        new.add(frac)
    return new


def cell(seed, frac, ratio, fresh, threads):
    """Image phase, fine-tuning and evaluation of one cell; returns evaluate.py's report."""
    directory = cell_dir(seed, frac, ratio)
    pretrain_dir, finetune_dir = os.path.join(directory, "pretrain"), os.path.join(directory, "finetune")
    label = f"seed {seed} frac {frac:.2f} ratio {ratio:.2f}"
    # Same pretrain_config and pretrain_args as the text run: pretrain.py refuses a branch whose
    # past settings differ. save_fracs=(frac,) keeps the weights at the branch point, which
    # must equal the text run's (tests/test_sweep.py checks it).
    fresh = run_stage(f"{label} image phase", pretrain_dir, "pretrain.py", [
        pretrain_config, *pretrain_args, *DATA, f"--seed={seed}", f"--out_dir={pretrain_dir}",
        f"--init_from={frac_ckpt(os.path.join(seed_dir(seed), 'text'), frac)}", f"--vision_start_frac={frac}",
        f"--image_ratio={ratio}", *([f"--save_fracs=({frac},)"] if branch_point_ckpt else [])], threads, fresh)
    fresh = run_stage(f"{label} fine-tuning", finetune_dir, "finetune.py", [
        sft_config, *finetune_args, *DATA, f"--seed={seed}", f"--out_dir={finetune_dir}",
        f"--init_from={os.path.join(pretrain_dir, 'ckpt.pt')}"], threads, fresh)
    ckpt = os.path.join(finetune_dir, "ckpt.pt")
    run_stage(f"{label} evaluation", os.path.join(directory, "evaluate"), "evaluate.py", [
        f"--ckpt={ckpt}", *DATA, *evaluate_args], threads, fresh)
    with open(f"{ckpt}.eval.json") as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# run everything: the text runs first, then the cells, `parallel` at a time
t_start = time.time()
os.makedirs(sweep_dir, exist_ok=True)
grid = [(seed, frac, ratio) for seed in seeds for frac in fracs for ratio in ratios]
failures = {}  # (seed, frac, ratio) -> why
new_fracs = {}  # seed -> fractions whose text checkpoint is new
# Every run gets an equal share of the cores, even a lone text run: more OpenMP threads than
# free cores (another run starting, anything else on the machine) slow a run down many times.
threads = max(1, CORES // (parallel * nproc))
reports = {}  # (seed, frac, ratio) -> evaluate.py's report
with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    try:
        jobs = {seed: pool.submit(text_run, seed, threads) for seed in seeds}
        for seed, job in jobs.items():
            try:
                new_fracs[seed] = job.result()
            except StageFailed as e:
                failures.update({key: f"text run: {e}" for key in grid if key[0] == seed})

        jobs = {key: pool.submit(cell, *key, key[1] in new_fracs[key[0]], threads)
                for key in grid if key not in failures}
        for key, job in jobs.items():
            try:
                reports[key] = job.result()
            except StageFailed as e:
                failures[key] = str(e)
    except KeyboardInterrupt:  # Ctrl-C has stopped the running stages; start no others
        pool.shutdown(cancel_futures=True)
        sys.exit("interrupted: the same command continues the sweep")

# -----------------------------------------------------------------------------
# results: one row per run, then the mean, spread and extremes over seeds
any_report = next(iter(reports.values()), {"tasks": []})
task_names = [t["name"] for t in sorted(any_report["tasks"], key=lambda t: (t["modality"] != "vision", t["name"]))]
metrics = task_names + ["vision_avg", "text_avg", "overall_avg", "val_text_bpb"]
rows = []
for key in grid:
    seed, frac, ratio = key
    status = "ok" if key in reports else f"failed: {failures[key]}"
    row = {"fraction": frac, "ratio": ratio, "seed": seed, "status": status}
    if key in reports:
        stable = {t["name"]: t["stable"] for t in reports[key]["tasks"]}
        row.update({name: stable.get(name) for name in task_names})
        row.update({m: reports[key][m] for m in metrics[len(task_names):]})
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

write_atomically(os.path.join(sweep_dir, "results.json"), json.dumps(
    {"settings": config, "runs": rows, "over_seeds": summary}, indent=1))

# CSV: the runs, then per cell one row each for the mean, std, min and max over its seeds
columns = ["fraction", "ratio", "seed", "status"] + metrics
with open(os.path.join(sweep_dir, "results.csv.tmp"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    for entry in summary:
        for stat in ("mean", "std", "min", "max"):
            writer.writerow({"fraction": entry["fraction"], "ratio": entry["ratio"], "seed": stat,
                             "status": f"{len(entry['seeds'])} of {len(seeds)} seeds",
                             **{m: entry[m][stat] for m in metrics if entry[m] is not None}})
os.replace(os.path.join(sweep_dir, "results.csv.tmp"), os.path.join(sweep_dir, "results.csv"))


def number(value, digits=1, sign="+"):
    return "" if value is None else f"{value:{sign}.{digits}f}"


header = ["start fraction", "image ratio", "seed"] + task_names + ["vision avg", "text avg", "overall", "text bpb"]
lines = ["# Sweep results", "",
         "Stable scores after fine-tuning: accuracy minus chance, in points (evaluate.py); text bpb is "
         "the text validation loss in bits per byte. Start fraction: where images start in the text "
         "schedule (0 = from the first step, 1 = after text pretraining); image ratio: the share of "
         "image-caption rows in the image phase.", "",
         "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
for r in rows:
    values = [number(r.get(m)) for m in metrics[:-1]] + [number(r.get("val_text_bpb"), 3, "")]
    if r["status"] != "ok":
        values = [r["status"]] + [""] * (len(values) - 1)
    lines.append(f"| {r['fraction']:.2f} | {r['ratio']:.2f} | {r['seed']} | " + " | ".join(values) + " |")
if len(seeds) > 1:
    lines += ["", "## Over seeds: mean (min .. max)", "",
              "| start fraction | image ratio | seeds | vision avg | text avg | overall |",
              "|---:|---:|---:|---:|---:|---:|"]
    for e in summary:
        cells = [f"{number(e[m]['mean'])} ({number(e[m]['min'])} .. {number(e[m]['max'])})" if e[m] else ""
                 for m in ("vision_avg", "text_avg", "overall_avg")]
        lines.append(f"| {e['fraction']:.2f} | {e['ratio']:.2f} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
write_atomically(os.path.join(sweep_dir, "results.md"), "\n".join(lines) + "\n")

# results.png: the two averages against the start fraction, one line per ratio; the bars span
# the lowest to the highest seed
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for ax, metric, title in zip(axes, ("vision_avg", "text_avg"), ("vision tasks", "text tasks")):
    for ratio in ratios:
        points = [e for e in summary if e["ratio"] == ratio and e[metric]]
        x = [e["fraction"] for e in points]
        mean = np.array([e[metric]["mean"] for e in points])
        spread = [mean - [e[metric]["min"] for e in points], [e[metric]["max"] for e in points] - mean]
        ax.errorbar(x, mean, yerr=spread, marker="o", capsize=3, label=f"image ratio {ratio:g}")
    ax.axhline(0.0, color="gray", linestyle=":", linewidth=1)  # chance
    ax.set(title=f"{title}: average stable score", xlabel="images start at (fraction of text pretraining)",
           ylabel="accuracy - chance (points)", xticks=fracs)
    ax.legend()
fig.suptitle(f"{sweep_dir}: {len(seeds)} seed(s)" + (", bars: min to max over seeds" if len(seeds) > 1 else ""))
fig.tight_layout()
fig.savefig(os.path.join(sweep_dir, "results.png"), dpi=120)
plt.close(fig)


def lr_records(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return [], []
    with open(path) as f:
        records = [r for r in map(json.loads, f) if "lr" in r]
    return [r["iter"] for r in records], [r["lr"] for r in records]


# lr_schedule.png: the text run and the image phase of every start fraction (first seed and
# ratio; the schedule does not depend on the ratio)
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(*lr_records(os.path.join(seed_dir(seeds[0]), "text")), color="black", linewidth=3, alpha=0.3,
        label="text only")
for frac in fracs:
    ax.plot(*lr_records(os.path.join(cell_dir(seeds[0], frac, ratios[0]), "pretrain")), label=f"images from {frac:g}")
ax.set(xlabel="step", ylabel="learning rate", title="learning rate: text run and image phases")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(sweep_dir, "lr_schedule.png"), dpi=120)
plt.close(fig)

say(f"sweep finished in {time.time() - t_start:.0f}s: {len(reports)} of {len(grid)} cells done; "
    f"results in {os.path.join(sweep_dir, 'results.md')}")
if failures:
    for (seed, frac, ratio), why in failures.items():
        say(f"failed cell: seed {seed} frac {frac:.2f} ratio {ratio:.2f}: {why}")
    sys.exit(1)
