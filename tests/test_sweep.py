"""sweep.py end to end on a miniature study: a tiny toy world, a tiny model, a 2 x 2 grid, with
the local launcher and, against stand-in sbatch, squeue and srun, with the SLURM launcher.
The tests run in file order: the later ones continue the sweeps of the earlier ones."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

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


def sweep(data_dir, sweep_dir, fracs, ratios, *more, env=None, epochs=None):
    """Runs sweep.py on the grid of start fractions x image ratios (x fine-tuning epochs); returns
    (exit code, its output without the settings it echoes)."""
    axes = {"vision_start_frac": fracs, "image_ratio": ratios, **({"finetune.epochs": epochs} if epochs else {})}
    result = subprocess.run(
        [sys.executable, "sweep.py", f"--sweep_dir={sweep_dir}", f"--data_dir={data_dir}", f"--axes={axes}",
         "--cells_at_once=2", f"--pretrain_args={TINY_PRETRAIN}",
         f"--finetune_args={TINY_FINETUNE}", "--evaluate_args=('--max_items=8',)", *more],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
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
    """Modification times of every file under root but the results, which each run rewrites, and
    the lock, where each run writes who holds it."""
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files if f not in RESULTS + (".lock",)}


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
    assert sorted((r["vision_start_frac"], r["image_ratio"]) for r in runs) == [
        (0.0, 0.2), (0.0, 0.5), (0.5, 0.2), (0.5, 0.5)]
    for r in runs:
        assert r["status"] == "ok" and r["seed"] == 1337
        for key in ("color_qa", "count_mc", "exists_yn", "arith_mc", "facts_mc", "story_mc", "vision_avg",
                    "text_avg", "overall_avg", "caption_grounding", "val_text_bpb"):
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


def test_a_second_seed_adds_its_runs_and_the_spread_over_seeds(first_run, local_results, data_dir, sweep_dir):
    # local_results is requested so that it holds the first run's results before this run rewrites them
    assert first_run[0] == 0, first_run[1]
    code, output = sweep(data_dir, sweep_dir, (0.0, 0.5), (0.5,), "--seeds=(1337, 1338)")
    assert code == 0, output
    assert "reused   seed 1337 text run" in output and "finished seed 1338 text run" in output
    with open(os.path.join(sweep_dir, "results.json")) as f:
        results = json.load(f)
    for e in results["over_seeds"]:
        runs = [r for r in results["runs"] if r["vision_start_frac"] == e["vision_start_frac"]]
        assert e["seeds"] == [1337, 1338] and len(runs) == 2
        values = [r["vision_avg"] for r in runs]
        assert e["vision_avg"]["min"] == min(values) and e["vision_avg"]["max"] == max(values)
        assert e["vision_avg"]["mean"] == pytest.approx(sum(values) / 2)
    with open(os.path.join(sweep_dir, "results.md")) as f:
        text = f.read()
    assert "## Over seeds: mean (min .. max)" in text
    assert re.search(r"\| 0\.50 \| 0\.50 \| 2 \| [+-]\d+\.\d \([+-]\d+\.\d \.\. [+-]\d+\.\d\) \|", text)
    assert "- vision average, vision_start_frac (image_ratio 0.50): " in text
    assert "- text average, vision_start_frac (image_ratio 0.50): " in text


def test_a_fine_tuning_axis_shares_the_image_phase(first_run, data_dir, sweep_dir):
    assert first_run[0] == 0, first_run[1]
    code, output = sweep(data_dir, sweep_dir, (0.5,), (0.3,), epochs=(1, 2))
    assert code == 0, output
    assert "reused   seed 1337 text run" in output
    # one image phase, in the folder its pretraining values name, for both fine-tunings
    assert output.count("start    seed 1337 frac 0.50 ratio 0.30 image phase") == 1
    image_dir = os.path.join(cell(sweep_dir, 0.5, 0.3), "pretrain")
    assert os.listdir(cell(sweep_dir, 0.5, 0.3)) == ["pretrain"]
    steps = {}
    for epochs in (1, 2):
        directory = cell(sweep_dir, 0.5, 0.3) + f"_epochs{epochs}"
        assert sorted(os.listdir(directory)) == ["evaluate", "finetune"]
        checkpoint = torch.load(os.path.join(directory, "finetune", "ckpt.pt"), map_location="cpu", weights_only=False)
        assert checkpoint["config"]["init_from"] == os.path.join(image_dir, "ckpt.pt")
        assert checkpoint["config"]["epochs"] == epochs  # the axis, over finetune_args' --epochs=1
        steps[epochs] = checkpoint["iter_num"]
    # packed rows run across the end of an epoch, so two epochs take up to one row fewer than twice one
    assert 2 * steps[1] - 1 <= steps[2] <= 2 * steps[1] and steps[1] > 0
    with open(os.path.join(sweep_dir, "results.json")) as f:
        runs = json.load(f)["runs"]
    assert [(r["vision_start_frac"], r["image_ratio"], r["epochs"], r["seed"], r["status"]) for r in runs] == [
        (0.5, 0.3, 1, 1337, "ok"), (0.5, 0.3, 2, 1337, "ok")]
    assert isinstance(runs[0]["caption_grounding"], float)
    assert runs[0]["caption_grounding"] == runs[1]["caption_grounding"]  # read from the one image phase
    with open(os.path.join(sweep_dir, "results.csv")) as f:
        assert next(csv.reader(f))[:5] == ["vision_start_frac", "image_ratio", "epochs", "seed", "status"]
    with open(os.path.join(sweep_dir, "results.md")) as f:
        assert re.search(r"^\| 0\.50 \| 0\.30 \| 1 \| 1337 \| [+-]\d", f.read(), re.M)


@pytest.fixture
def sweep_module(monkeypatch):
    """sweep.py as a module, its grid read afresh from its `axes`."""
    monkeypatch.setattr(sys, "argv", ["sweep.py"])
    import sweep
    sweep.grid_axes.cache_clear()
    yield sweep
    sweep.grid_axes.cache_clear()


def test_an_axis_takes_a_prefix_where_both_scripts_have_its_name(sweep_module):
    axes = sweep_module.read_axes({"finetune.epochs": (1, 2), "image_ratio": (0.5,),
                                   "pretrain.vision_start_frac": (0.0,), "finetune.learning_rate": (1e-3,),
                                   "pretrain.image_iters": (300,)})
    # vision_start_frac first, as in the folder names; a name is bare where it is one script's alone
    assert [(a.name, a.script, a.setting) for a in axes] == [
        ("vision_start_frac", "pretrain.py", "vision_start_frac"), ("epochs", "finetune.py", "epochs"),
        ("image_ratio", "pretrain.py", "image_ratio"), ("finetune.learning_rate", "finetune.py", "learning_rate"),
        ("image_iters", "pretrain.py", "image_iters")]
    assert axes[1].values == (1, 2)
    # the refusals (ambiguous, unknown, not an image-phase setting, ...) are in tests/test_user_errors.py


def test_folders_are_named_by_the_axes_and_the_image_phase_by_its_own(sweep_module, monkeypatch):
    monkeypatch.setattr(sweep_module, "sweep_dir", "S")
    monkeypatch.setattr(sweep_module, "axes", {"image_ratio": (0.5,), "vision_start_frac": (0.8,)})
    key = (1337, 0.8, 0.5)
    assert sweep_module.cell_dir(key) == "S/seed1337/frac0.80_ratio0.50"  # the names sweeps always had
    assert sweep_module.image_phase_dir(key) == "S/seed1337/frac0.80_ratio0.50/pretrain"
    assert sweep_module.cell_label(key) == "seed 1337 frac 0.80 ratio 0.50"
    monkeypatch.setattr(sweep_module, "axes", {"vision_start_frac": (0.8,), "image_ratio": (0.5,),
                                               "finetune.epochs": (4,), "image_iters": (600,)})
    sweep_module.grid_axes.cache_clear()
    key = (1337, 0.8, 0.5, 4, 600)
    assert sweep_module.cell_dir(key) == "S/seed1337/frac0.80_ratio0.50_epochs4_image_iters600"
    assert sweep_module.image_phase_dir(key) == "S/seed1337/frac0.80_ratio0.50_image_iters600/pretrain"
    assert sweep_module.cell_label(key, "pretrain.py") == "seed 1337 frac 0.80 ratio 0.50 image_iters 600"
    assert sweep_module.image_phase_key(key) == (1337, 0.8, 0.5, 600)


def test_only_ranges_that_do_not_overlap_count_as_a_difference(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sweep.py"])
    import sweep

    def entry(frac, low, high):
        return {"vision_start_frac": frac, "seeds": [1, 2, 3], "vision_avg": {"min": low, "max": high}}
    entries = [entry(0.0, 10.0, 14.0), entry(0.4, 13.0, 18.0), entry(0.8, 15.0, 20.0)]
    assert sweep.beyond_spread(entries, "vision_avg") == [(0.8, 0.0)]  # 0.4 overlaps both
    one_seed = [dict(entry(0.0, 1.0, 1.0), seeds=[1]), dict(entry(0.8, 9.0, 9.0), seeds=[1])]
    assert sweep.beyond_spread(one_seed, "vision_avg") == []  # one seed has no spread to beat
    # along another axis, the start fraction held: the same rule
    shares = [dict(entry(0.8, low, high), instruct_ratio=share) for share, low, high in ((0.0, 37.3, 37.9),
                                                                                          (0.2, 34.1, 37.0))]
    assert sweep.beyond_spread(shares, "vision_avg", "instruct_ratio") == [(0.0, 0.2)]


# -----------------------------------------------------------------------------
# The SLURM launcher, against stand-in sbatch, squeue and srun: sbatch records each job in a
# folder, squeue lists the jobs not yet run, srun runs its command here. run_queue() then plays
# the scheduler: it runs the jobs in dependency order (afterok), cancels the jobs after a failed
# one (--kill-on-invalid-dep), and can preempt a job (kill it) and requeue it.

SBATCH = """
import json, os, re, sys
queue = os.environ["STANDIN_QUEUE"]
args, script = sys.argv[1:-1], sys.argv[-1]
after = [a.split(":")[1:] for a in args if a.startswith("--dependency=afterok:")]
job = str(len(os.listdir(queue)) + 1)
text = open(script).read()
options = dict(re.findall(r"^#SBATCH --([\\w-]+)=?(.*)$", text, re.M))
with open(os.path.join(queue, job), "w") as f:
    json.dump({"id": job, "after": after[0] if after else [], "script": text, "options": options,
               "state": "PENDING", "runs": 0}, f)
print(job)
"""
SQUEUE = """
import json, os
queue = os.environ["STANDIN_QUEUE"]
for name in sorted(os.listdir(queue), key=int):
    job = json.load(open(os.path.join(queue, name)))
    if job["state"] in ("PENDING", "RUNNING"):
        print(job["id"])
"""
SRUN = """
import os, sys
command = sys.argv[1:]
while command[0].startswith("-"):  # srun's own options
    command.pop(0)
os.execvp(command[0], command)
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment for sweep.py and the jobs: the stand-ins first on PATH."""
    root = tmp_path_factory.mktemp("slurm")
    (root / "bin").mkdir()
    (root / "queue").mkdir()
    for name, code in (("sbatch", SBATCH), ("squeue", SQUEUE), ("srun", SRUN)):
        path = root / "bin" / name
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)
    return dict(os.environ, PATH=f"{root / 'bin'}:{os.environ['PATH']}", STANDIN_QUEUE=str(root / "queue"))


def jobs(env):
    queue = env["STANDIN_QUEUE"]
    return [json.load(open(os.path.join(queue, n))) for n in sorted(os.listdir(queue), key=int)]


def run_job(job, env, preempt_at=None):
    """Runs a job's script as SLURM would: in --chdir, output appended to --output. With
    preempt_at, kills the job once its output shows that line. Returns the exit code."""
    log_path = os.path.join(job["options"]["chdir"], job["options"]["output"])
    with open(log_path, "a") as log:
        start = log.tell()
        process = subprocess.Popen(["bash", "-c", job["script"]], cwd=job["options"]["chdir"], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(env, SLURM_JOB_ID=job["id"], SLURM_NNODES="1",
                                            SLURM_RESTART_COUNT=str(job["runs"]), OMP_NUM_THREADS="1"))
        while preempt_at is not None and process.poll() is None:
            with open(log_path) as f:
                f.seek(start)
                if preempt_at in f.read():
                    os.killpg(process.pid, signal.SIGKILL)  # no warning, like a node lost
                    break
            time.sleep(0.01)
        return process.wait()


def run_queue(env, preempt=None):
    """Runs every pending job whose dependencies completed, until none is left. preempt: (part
    of a job's script, line of its output) kills that job when the line appears, once; SLURM
    then requeues it (--requeue) and it runs again."""
    while True:
        states = {j["id"]: j["state"] for j in jobs(env)}
        ready = [j for j in jobs(env) if j["state"] == "PENDING" and
                 all(states[a] in ("COMPLETED", "FAILED", "CANCELLED") for a in j["after"])]
        if not ready:
            return {j["id"]: j for j in jobs(env)}
        job = ready[0]
        if any(states[a] != "COMPLETED" for a in job["after"]):
            job["state"] = "CANCELLED"
        else:
            hit = preempt is not None and preempt[0] in job["script"] and job["runs"] == 0
            code = run_job(job, env, preempt[1] if hit else None)
            job["runs"] += 1
            job["state"] = "PENDING" if hit else "COMPLETED" if code == 0 else "FAILED"
        with open(os.path.join(env["STANDIN_QUEUE"], job["id"]), "w") as f:
            json.dump(job, f)


# Jobs sized so that the 10-step text run needs three: a "1:00" time limit at 20 tokens/s per
# GPU fits floor(60 s x 0.9 x 20 / 256 tokens per step) = 4 steps.
SLURM_ARGS = ("--launcher=slurm", "--time_limit=1:00", "--gpu_tokens_per_s=20.0")


@pytest.fixture(scope="module")
def local_results(first_run, sweep_dir):
    assert first_run[0] == 0, first_run[1]
    with open(os.path.join(sweep_dir, "results.json")) as f:
        return json.load(f)["runs"]


@pytest.fixture(scope="module")
def slurm_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("slurm_sweep"))


def test_slurm_dry_run_prints_every_job_and_submits_nothing(data_dir, slurm_dir, slurm):
    code, output = sweep(data_dir, slurm_dir, (0.0, 0.5), (0.2, 0.5), *SLURM_ARGS, "--dry_run=True", env=slurm)
    assert code == 0, output
    assert jobs(slurm) == [] and os.listdir(slurm_dir) == []
    lines = output.splitlines()
    assert "job #1: seed 1337 text run, part 1 of 3" in output
    assert "job #3: seed 1337 text run, part 3 of 3, after #2" in output
    # an image phase waits only for the text run's job that writes its checkpoint (step 0 and step 5)
    assert "job #4: seed 1337 frac 0.00 ratio 0.20 image phase, part 1 of 1, after #1" in output
    assert "job #10: seed 1337 frac 0.50 ratio 0.20 image phase, part 1 of 1, after #2" in output
    assert "job #15: seed 1337 frac 0.50 ratio 0.50 evaluation, part 1 of 1, after #14" in output
    # the arguments in the order they always had, so that earlier sweeps' DONE records still match
    image_command = lines[lines.index(next(line for line in lines if "job #4:" in line)) + 1]
    assert image_command.endswith(f"--init_from={slurm_dir}/seed1337/text/ckpt_frac0.00.pt --vision_start_frac=0.0 "
                                  "--image_ratio=0.2 '--save_fracs=(0.0,)'")
    command = lines[lines.index(next(line for line in lines if "job #1:" in line)) + 1]
    assert command.strip().startswith("srun ") and "pretrain.py" in command and "--stop_at_iter=4" in command
    # the estimate is computed: 10 text steps of 256 tokens at 20 tokens/s = 0.036 GPU-hours
    assert "seed 1337 text run: 0.0 GPU-h" in output
    total = re.search(r"total: ([\d.,]+) GPU-h, ([\d.]+) GB", output)
    assert total is not None, output
    _, slower = sweep(data_dir, slurm_dir, (0.0, 0.5), (0.2, 0.5), *SLURM_ARGS, "--dry_run=True",
                      "--gpu_tokens_per_s=10.0", "--eval_gpu_hours=0.5", env=slurm)
    slower_total = re.search(r"total: ([\d.,]+) GPU-h, ([\d.]+) GB", slower)
    # 4 evaluations at 1 and then 0.5 GPU-hours; the training stages take twice as long at half the rate
    training = float(total[1]) - 4 * 1.0
    assert float(slower_total[1]) == pytest.approx(2 * training + 4 * 0.5, abs=0.15)
    assert slower_total[2] == total[2]  # the same checkpoints
    # several nodes: torchrun on each, meeting at the first; evaluation stays one process. And a
    # fine-tuning axis: one image phase, which both fine-tunings wait for.
    code, output = sweep(data_dir, slurm_dir, (0.0,), (0.2,), *SLURM_ARGS, "--dry_run=True", "--nodes=2",
                         "--nproc=4", epochs=(1, 2), env=slurm)
    assert code == 0, output
    lines = output.splitlines()
    text_command, eval_command = (lines[i + 1] for i, line in enumerate(lines) if "part 1 of" in line
                                  and ("text run" in line or "epochs 1 evaluation" in line))
    for word in ("-m torch.distributed.run", "--nnodes=$SLURM_NNODES", "--rdzv_backend=c10d", "--nproc_per_node=4"):
        assert word in text_command
    assert "torch.distributed.run" not in eval_command and "evaluate.py" in eval_command
    assert output.count("image phase, part 1 of 1") == 1
    assert "job #2: seed 1337 frac 0.00 ratio 0.20 image phase, part 1 of 1, after #1" in output
    assert "job #3: seed 1337 frac 0.00 ratio 0.20 epochs 1 fine-tuning, part 1 of 1, after #2" in output
    assert "job #5: seed 1337 frac 0.00 ratio 0.20 epochs 2 fine-tuning, part 1 of 1, after #2" in output
    code, output = sweep(data_dir, slurm_dir, (0.0,), (0.2,), *SLURM_ARGS, "--dry_run=True", "--time_limit=soon",
                         env=slurm)
    assert code != 0 and "time_limit 'soon' is not a SLURM time" in output


@pytest.fixture(scope="module")
def slurm_run(data_dir, slurm_dir, slurm):
    """Submits the grid, submits again while it is queued, runs the queue with the text run's
    second job preempted, then invokes the sweep a third time."""
    first = sweep(data_dir, slurm_dir, (0.0, 0.5), (0.2, 0.5), *SLURM_ARGS, env=slurm)
    submitted = jobs(slurm)
    second = sweep(data_dir, slurm_dir, (0.0, 0.5), (0.2, 0.5), *SLURM_ARGS, env=slurm)
    queue = run_queue(slurm, preempt=("seed 1337 text run, part 2 of 3", "iter 4:"))
    third = sweep(data_dir, slurm_dir, (0.0, 0.5), (0.2, 0.5), *SLURM_ARGS, env=slurm)
    return first, submitted, second, queue, third


def test_slurm_submits_each_stage_once_after_the_stage_it_reads(slurm_run):
    (code, output), submitted, (code2, output2), _, _ = slurm_run
    assert code == 0 and code2 == 0, output + output2
    names = [j["options"]["job-name"] for j in submitted]
    assert names[:3] == ["seed_1337_text_run"] * 3  # 10 steps in jobs of 4
    assert len(submitted) == 3 + 4 * 3
    by_name = {}
    for j in submitted:
        by_name.setdefault(j["options"]["job-name"], []).append(j)
    assert [j["after"] for j in by_name["seed_1337_text_run"]] == [[], ["1"], ["2"]]
    for frac in ("0.00", "0.50"):
        for ratio in ("0.20", "0.50"):
            image, finetune, evaluate = (by_name[f"seed_1337_frac_{frac}_ratio_{ratio}_{stage}"][0]
                                         for stage in ("image_phase", "fine-tuning", "evaluation"))
            assert image["after"] == (["1"] if frac == "0.00" else ["2"])  # the part that writes its checkpoint
            assert finetune["after"] == [image["id"]]
            assert evaluate["after"] == [finetune["id"]]
    assert "--stop_at_iter=4" in submitted[0]["script"] and "--stop_at_iter=8" in submitted[1]["script"]
    assert "--stop_at_iter" not in submitted[2]["script"]
    # while they are queued, the same command submits nothing
    assert "0 job(s) submitted" in output2 and output2.count("queued   ") == 1 + 4 * 3


def test_slurm_runs_the_grid_to_the_local_launchers_results(slurm_run, local_results, sweep_dir, slurm_dir):
    _, submitted, _, queue, (code, output) = slurm_run
    assert all(j["state"] == "COMPLETED" for j in queue.values()), {i: j["state"] for i, j in queue.items()}
    assert len(queue) == len(submitted)  # the third invocation submitted nothing new
    assert code == 0 and "0 job(s) submitted" in output and output.count("reused   ") == 1 + 4 * 3
    with open(os.path.join(slurm_dir, "results.json")) as f:
        runs = json.load(f)["runs"]
    assert runs == local_results
    # the text run, in three jobs and preempted once, ends with the local run's weights
    assert_same_weights(weights(os.path.join(slurm_dir, "seed1337", "text", "ckpt.pt")),
                        weights(os.path.join(sweep_dir, "seed1337", "text", "ckpt.pt")))


def test_a_preempted_slurm_job_resumes_from_its_checkpoint(slurm_run, slurm_dir):
    _, _, _, queue, _ = slurm_run
    second_part = queue["2"]
    assert second_part["runs"] == 2 and second_part["state"] == "COMPLETED"
    with open(os.path.join(slurm_dir, "seed1337", "text", "stdout.txt")) as f:
        log = f.read()
    # parts 2 and 3 continue from ckpt.pt, and so does part 2's requeued run
    assert log.count("resuming from") == 3
    after_preemption = log.split("resuming from")[2]
    assert "iter 4:" in after_preemption and "iter 3:" not in after_preemption


def test_a_failed_slurm_job_fails_only_its_cell(slurm_run, data_dir, slurm_dir, slurm):
    assert slurm_run[4][0] == 0
    before = len(jobs(slurm))
    # as the local test below: 0.75 extends the text run, ratio 1.5 fails in pretrain.py
    code, output = sweep(data_dir, slurm_dir, (0.5, 0.75), (0.2, 1.5), *SLURM_ARGS, env=slurm)
    assert code == 0, output
    assert "reused   seed 1337 text run" in output and "reused   seed 1337 frac 0.50 ratio 0.20 evaluation" in output
    queue = run_queue(slurm)
    new = {j["options"]["job-name"]: j["state"] for j in list(queue.values())[before:]}
    assert new == {"seed_1337_text_run_extended_to_0.75": "COMPLETED",
                   **{f"seed_1337_frac_0.75_ratio_0.20_{s}": "COMPLETED"
                      for s in ("image_phase", "fine-tuning", "evaluation")},
                   **{f"seed_1337_frac_{f}_ratio_1.50_image_phase": "FAILED" for f in ("0.50", "0.75")},
                   **{f"seed_1337_frac_{f}_ratio_1.50_{s}": "CANCELLED" for f in ("0.50", "0.75")
                      for s in ("fine-tuning", "evaluation")}}
    log = os.path.join(cell(slurm_dir, 0.75, 1.5), "pretrain", "stdout.txt")
    assert "image_ratio must lie in [0, 1]" in open(log).read()
    # the next invocation reports them and submits the failed cells again, nothing else
    code, output = sweep(data_dir, slurm_dir, (0.5, 0.75), (0.2, 1.5), *SLURM_ARGS, env=slurm)
    assert code == 0, output
    assert "6 job(s) submitted" in output
    with open(os.path.join(slurm_dir, "results.json")) as f:
        status = {(r["vision_start_frac"], r["image_ratio"]): r["status"] for r in json.load(f)["runs"]}
    assert status[(0.5, 0.2)] == status[(0.75, 0.2)] == "ok"
    for frac in (0.5, 0.75):
        assert status[(frac, 1.5)].startswith("queued as job") and "failed before: exit code 1" in status[(frac, 1.5)]


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
        status = {(r["vision_start_frac"], r["image_ratio"]): r["status"] for r in json.load(f)["runs"]}
    assert status[(0.5, 0.2)] == status[(0.75, 0.2)] == "ok"
    assert status[(0.5, 1.5)].startswith("failed") and status[(0.75, 1.5)].startswith("failed")
    # the continued text run is the prefix of the new branch
    text_dir = os.path.join(sweep_dir, "seed1337", "text")
    assert_same_weights(weights(os.path.join(cell(sweep_dir, 0.75, 0.2), "pretrain", "ckpt_frac0.75.pt")),
                        weights(os.path.join(text_dir, "ckpt_frac0.75.pt")))
