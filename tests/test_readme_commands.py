"""Every shell command in a code block of the README, and of the docs/ pages it links (directly or
through another page), runs here: in a copy of the repository, the README's first, then each
page's in the order of the pages' names, at small sizes, with --dry_run, or on local files where
it would download. COMMANDS below says, for each command, what runs, or why it cannot run here.
A command that the pages gain and COMMANDS does not know, or one that COMMANDS knows and the
pages lost, fails the test: the list and the pages move together.
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.own_data import make_own_dataset
from tests.tiny_data import ROOT

SMALL_DATA = "--scale=0.02"
SMALL_PRETRAIN = ("--max_iters=8 --warmup_iters=2 --image_iters=4 --rewarm_iters=2 --eval_interval=4 "
                  "--eval_batches=2 --log_interval=2")
SMALL_FINETUNE = "--epochs=1 --eval_interval=5 --eval_batches=2 --log_interval=2"
SETUP = "sets up the environment that this test runs in; .ci/run makes it the same way"

# README command -> the command that runs here, or ("not run", why).
COMMANDS = {
    # README, "The two commands": the main job at small sizes
    "python3 -m venv .venv": ("not run", SETUP),
    ". .venv/bin/activate": ("not run", SETUP),
    "pip install -r requirements.txt": ("not run", SETUP + " (requirements-test.txt includes requirements.txt)"),
    "python data/toyworld/prepare.py": f"python data/toyworld/prepare.py {SMALL_DATA}",
    "python pretrain.py config/toy.py": f"python pretrain.py config/toy.py {SMALL_PRETRAIN}",
    "python finetune.py config/toy_sft.py": f"python finetune.py config/toy_sft.py {SMALL_FINETUNE}",
    "python evaluate.py --ckpt=out/toy_sft/ckpt.pt": "python evaluate.py --ckpt=out/toy_sft/ckpt.pt",
    "pip install -r requirements-test.txt": ("not run", SETUP),
    "pip install --no-deps lmms-eval==0.7.3": ("not run", SETUP),
    "python -m pytest": ("not run", "the test suite itself (.ci/run runs it, test_ci_runs_the_readme_test_command)"),
    # README, "Fork it": the cosine ramp at small sizes; the encoder needs the README's diff applied
    "python pretrain.py config/toy.py --image_ratio_ramp=cosine --image_ratio_ramp_iters=300 --out_dir=out/toy_cosine":
        f"python pretrain.py config/toy.py --image_ratio_ramp=cosine --image_ratio_ramp_iters=3 "
        f"--out_dir=out/toy_cosine {SMALL_PRETRAIN}",
    "python sweep.py config/toy_sweep.py --axes=\"{'vision_start_frac': (0.4, 0.8), 'image_ratio': (0.5,), "
    "'finetune.epochs': (2, 6)}\" --sweep_dir=out/toy_epochs":
        "python sweep.py config/toy_sweep.py --axes=\"{'vision_start_frac': (0.4, 0.8), 'image_ratio': (0.5,), "
        "'finetune.epochs': (2, 6)}\" --sweep_dir=out/toy_epochs --dry_run=True",
    # README, "The third question": conversations in the image phase, one run and the toy study's plan
    "python pretrain.py config/toy.py --instruct_ratio=0.1 --out_dir=out/toy_instruct":
        f"python pretrain.py config/toy.py --instruct_ratio=0.1 --out_dir=out/toy_instruct {SMALL_PRETRAIN}",
    "python sweep.py config/toy_sweep.py config/toy_instruct_sweep.py":
        "python sweep.py config/toy_sweep.py config/toy_instruct_sweep.py --dry_run=True",
    # docs/toy_notes.md: the knowledge task's control, a toy world without the facts it needs
    "python data/toyworld/prepare.py --without_knowledge_facts":
        f"python data/toyworld/prepare.py --without_knowledge_facts {SMALL_DATA}",
    "python pretrain.py config/toy.py --data_dir=data/toyworld/without_knowledge_facts --out_dir=out/toy_control":
        f"python pretrain.py config/toy.py --data_dir=data/toyworld/without_knowledge_facts --out_dir=out/toy_control "
        f"{SMALL_PRETRAIN}",
    "python finetune.py config/toy_sft.py --data_dir=data/toyworld/without_knowledge_facts "
    "--init_from=out/toy_control/ckpt.pt --out_dir=out/toy_control_sft":
        f"python finetune.py config/toy_sft.py --data_dir=data/toyworld/without_knowledge_facts "
        f"--init_from=out/toy_control/ckpt.pt --out_dir=out/toy_control_sft {SMALL_FINETUNE}",
    "python evaluate.py --ckpt=out/toy_control_sft/ckpt.pt --data_dir=data/toyworld/without_knowledge_facts":
        "python evaluate.py --ckpt=out/toy_control_sft/ckpt.pt --data_dir=data/toyworld/without_knowledge_facts",
    "python pretrain.py config/toy.py --vision_encoder=conv --out_dir=out/toy_conv":
        ("not run", "needs the README's diff to model.py: tests/test_fork.py applies it and runs this at toy size"),
    # docs/stages.md, then docs/ask.md: sample.py in a terminal
    "python -m data.shards inspect data/toyworld/*.bin": "python -m data.shards inspect data/toyworld/*.bin",
    'python sample.py --ckpt=out/toy_sft/ckpt.pt --image=photo.png --prompt="what color is the circle?"':
        'python sample.py --ckpt=out/toy_sft/ckpt.pt --image=photo.png --prompt="what color is the circle?"',
    "python sample.py --ckpt=out/toy_sft/ckpt.pt --toy_scene=3":
        "printf 'what color is the circle?\\n' | python sample.py --ckpt=out/toy_sft/ckpt.pt --toy_scene=3",
    'python sample.py --ckpt=out/toy/ckpt.pt --prompt="three plus four is"':
        'python sample.py --ckpt=out/toy/ckpt.pt --prompt="three plus four is"',
    "printf 'what color is the square?\\nhow many shapes are there?\\nwhere is the square?\\nis there a red circle?\\n"
    "describe the picture.\\n' | python sample.py --ckpt=out/toy_sft/ckpt.pt --toy_scene=3":
        "printf 'what color is the square?\\nhow many shapes are there?\\nwhere is the square?\\nis there a red circle?\\n"
        "describe the picture.\\n' | python sample.py --ckpt=out/toy_sft/ckpt.pt --toy_scene=3",
    "echo | python sample.py --ckpt=out/toy/ckpt.pt --toy_scene=3": "echo | python sample.py --ckpt=out/toy/ckpt.pt --toy_scene=3",
    # docs/own_data.md: on a small data set of one's own (tests/own_data.py writes it as shapes/)
    "python data/own/prepare.py --out_dir=data/own/shapes --vocab=out/toy/ckpt.pt --conversations=shapes/train.json "
    "--eval=shapes/test.jsonl":
        "python data/own/prepare.py --out_dir=data/own/shapes --vocab=out/toy/ckpt.pt "
        "--conversations=shapes/train.json --eval=shapes/test.jsonl",
    "python finetune.py config/toy_sft.py --data_dir=data/own/shapes --out_dir=out/shapes --text_rows=0":
        f"python finetune.py config/toy_sft.py --data_dir=data/own/shapes --out_dir=out/shapes --text_rows=0 "
        f"{SMALL_FINETUNE}",
    "python evaluate.py --ckpt=out/shapes/ckpt.pt --data_dir=data/own/shapes --val_text=":
        "python evaluate.py --ckpt=out/shapes/ckpt.pt --data_dir=data/own/shapes --val_text=",
    # docs/ask.md: serve.py in the browser
    "python serve.py --ckpt=out/toy_f0.0_sft/ckpt.pt --ckpt_b=out/toy_sft/ckpt.pt":
        ("not run", "a server that runs until stopped: tests/test_serve.py starts it and drives its page in Chromium"),
    # README, "The answer so far": the plan only (tests/test_sweep.py runs this grid at toy sizes)
    "python sweep.py config/toy_sweep.py": "python sweep.py config/toy_sweep.py --dry_run=True",
    # docs/gpu_study.md, "The study on a SLURM cluster": plans, since this machine has no SLURM
    "python sweep.py config/1b_sweep.py --launcher=slurm --dry_run=True":
        "python sweep.py config/1b_sweep.py --launcher=slurm --dry_run=True",
    "python sweep.py config/1b_sweep.py --launcher=slurm --partition=gpu --account=myproject":
        "python sweep.py config/1b_sweep.py --launcher=slurm --partition=gpu --account=myproject --dry_run=True",
    "python sweep.py config/1b_sweep.py --launcher=slurm":
        "python sweep.py config/1b_sweep.py --launcher=slurm --dry_run=True",
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node0:29500 --rdzv_id=text1337 "
    "pretrain.py config/1b.py --out_dir=out/1b":
        ("not run", "needs two machines of 8 GPUs (tests/test_configs.py runs config/1b.py on the CPU)"),
    # docs/scores.md
    "pip install -r harness/requirements.txt":
        ("not run", SETUP + " (requirements-test.txt and .ci/run install the same pins)"),
    "python -m harness.lm_eval_model --ckpt=out/toy_sft/ckpt.pt --tasks=arc_easy,hellaswag,piqa":
        ("not run", "lm-eval downloads these tasks' data from the Hub; the next command runs the same adapter on a "
                    "local task"),
    "python -m harness.lm_eval_model --ckpt=PATH --tasks=my_task --include_path=folder_with_my_yaml":
        "python -m harness.lm_eval_model --ckpt=out/toy_sft/ckpt.pt --tasks=my_task "
        "--include_path=folder_with_my_yaml --num_fewshot=0 --device=cpu",
    # docs/toy_notes.md: D is the data, O an output folder; then D is a sweep folder
    "python pretrain.py config/toy.py --data_dir=D --out_dir=O/pt --n_layer=2 --n_embd=128 --ffn_hidden=352 "
    "--seq_len=128 --max_iters=300 --warmup_iters=30 --image_iters=200 --rewarm_iters=20 --image_ratio=0.3":
        "python pretrain.py config/toy.py --data_dir=data/toyworld --out_dir=out/notes/pt --n_layer=2 --n_embd=128 "
        f"--ffn_hidden=352 --seq_len=128 --max_iters=300 --warmup_iters=30 --image_iters=200 --rewarm_iters=20 "
        f"--image_ratio=0.3 {SMALL_PRETRAIN}",
    "python finetune.py config/toy_sft.py --data_dir=D --init_from=O/pt/ckpt.pt --out_dir=O/sft --epochs=2 "
    "--learning_rate=2e-3 --min_lr=2e-4":
        "python finetune.py config/toy_sft.py --data_dir=data/toyworld --init_from=out/notes/pt/ckpt.pt "
        f"--out_dir=out/notes/sft --epochs=2 --learning_rate=2e-3 --min_lr=2e-4 {SMALL_FINETUNE}",
    "python evaluate.py --ckpt=O/sft/ckpt.pt --data_dir=D":
        "python evaluate.py --ckpt=out/notes/sft/ckpt.pt --data_dir=data/toyworld",
    "python pretrain.py config/toy.py --init_from=D/seed1337/text/ckpt_frac0.80.pt --vision_start_frac=0.8 "
    "--image_ratio=R --image_iters=N --out_dir=O":
        f"python pretrain.py config/toy.py {SMALL_PRETRAIN} --vision_start_frac=1.0 --image_iters=0 "
        "--out_dir=out/sweep/seed1337/text --save_fracs='(0.8,)' && "  # the sweep's text run it branches from
        "python pretrain.py config/toy.py --init_from=out/sweep/seed1337/text/ckpt_frac0.80.pt --vision_start_frac=0.8 "
        f"--image_ratio=0.3 --image_iters=4 --out_dir=out/notes/branch {SMALL_PRETRAIN}",
}


def pages():
    """README.md, then the docs/ pages it names or links, and those they link, by name."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    linked, todo = set(), set(re.findall(r"\(?(docs/[\w.-]+\.md)", readme))
    while todo:
        page = todo.pop()
        linked.add(page)
        text = open(os.path.join(ROOT, page)).read()
        for link in re.findall(r"\]\(([\w./-]+\.md)", text):  # links between pages are relative to docs/
            target = os.path.normpath(os.path.join("docs", link))
            if target.startswith("docs" + os.sep) and target not in linked:
                todo.add(target)
    return ["README.md", *sorted(linked)]


def shell_commands(text):
    """The commands of a page's shell code blocks: ```bash / ```sh blocks line by line, and in
    unlabelled blocks the lines after a `$ ` prompt (a session transcript); continuation lines
    joined, comments dropped, `a && b` split."""
    commands = []
    for language, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if language not in ("bash", "sh", ""):
            continue
        lines = body.replace("\\\n", " ").splitlines()
        if language == "":
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        for line in lines:
            line = re.sub(r"\s+#\s.*$", "", line).strip()  # a trailing comment
            if line and not line.startswith("#"):
                commands += [" ".join(part.split()) for part in line.split(" && ")]
    return commands


def copy_of_repository(target):
    """The project's files (tracked, or new and not ignored), without outputs or generated data."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, names):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):
            os.makedirs(os.path.join(target, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(source, os.path.join(target, name))


def test_every_readme_command_runs(tmp_path):
    documented = [(page, command) for page in pages() for command in shell_commands(
        open(os.path.join(ROOT, page)).read())]
    unknown = [f"{page}: {command}" for page, command in documented if command not in COMMANDS]
    assert not unknown, "commands this test does not know; add each to COMMANDS:\n" + "\n".join(unknown)
    gone = set(COMMANDS) - {command for _, command in documented}
    assert not gone, f"COMMANDS lists commands no page has any more: {sorted(gone)}"

    repo = tmp_path / "repo"
    copy_of_repository(repo)
    # what the pages assume a user has: a picture, a data set and an lm-eval task of their own
    files = make_own_dataset(repo / "shapes")
    shutil.copy(files["eval_open"], repo / "shapes" / "test.jsonl")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(repo / "photo.png")
    (repo / "folder_with_my_yaml").mkdir()
    (repo / "folder_with_my_yaml" / "items.jsonl").write_text(
        '{"prompt": "two plus two is", "options": ["four", "five"], "answer": 0}\n' * 4)
    (repo / "folder_with_my_yaml" / "my_task.yaml").write_text(
        f"task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {repo / 'folder_with_my_yaml' / 'items.jsonl'}\n  cache_dir: {tmp_path / 'cache'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: prompt\ndoc_to_choice: options\n"
        "doc_to_target: answer\ntarget_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
    # `python` is this interpreter, whichever environment runs the tests
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a link would lose the venv
    (bin_dir / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    for page, command in documented:
        what = COMMANDS[command]
        if isinstance(what, tuple):
            continue
        result = subprocess.run(["bash", "-c", f"set -eo pipefail; {what}"], cwd=repo, env=env, capture_output=True,
                                text=True, timeout=900, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"{page}: {command}\nran: {what}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_command = next(c for c in re.findall(r"```bash\n(.*?)```", readme, re.S) if "pytest" in c).strip()
    for step in test_command.split(" && "):
        if step not in ("python3 -m venv .venv", ". .venv/bin/activate"):
            assert re.search(re.escape(step).replace(r"\ ", r"\s+(?:-q\s+)?"), ci), f".ci/run lacks `{step}`"


def test_the_readme_stays_a_front_door():
    """Reference material lives in docs/; the README keeps to what a newcomer needs first."""
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 350, f"README.md has {len(lines)} lines: move reference material to a docs/ page"
    assert "## Fork it: three ablations" in lines
