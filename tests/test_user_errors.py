"""Every user error of every script is one `error:` line and exit status 1, found at start-up.

One table of bad settings and bad inputs for pretrain.py, finetune.py, export_hf.py, sweep.py
and the Hub preparers; each case names the words its error line must hold. The cases run in
forked copies of one process that imported torch once (tests/script_cases.py), so the whole
table costs seconds. A new setting or input check belongs in this table."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from common import load_checkpoint, save_checkpoint
from data import shards
from data.tokenizer import Tokenizer
from tests.test_pretrain import TINY
from tests.tiny_data import ROOT, WORDS, make_tiny_dataset


def write_chat_shards(data_dir, trained=True):
    tok = Tokenizer(Tokenizer.cl100k_ids_of(WORDS + [" " + w for w in WORDS]))
    rng = np.random.default_rng(1)
    for split, n in (("train", 16), ("val", 4)):
        turns = [tok.encode_conversation([("user", " ".join(rng.choice(WORDS, 4))),
                                          ("assistant", " ".join(rng.choice(WORDS, 3)))]) for _ in range(n)]
        masks = [m if trained else np.zeros_like(m) for _, m in turns]
        shards.write_conversation_shard(os.path.join(data_dir, f"{split}_chat.bin"),
                                        rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                        [t for t, _ in turns], masks, tok.vocab_size)


def parquet(path, **columns):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path)


def garbage(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"this is not what its name says" * 10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny data, a tiny finished run, and the bad inputs the cases point at."""
    root = tmp_path_factory.mktemp("errors")
    (root / "data").mkdir()
    data = str(make_tiny_dataset(root / "data"))
    write_chat_shards(data)
    untrained = str(shutil.copytree(data, root / "untrained"))
    write_chat_shards(untrained, trained=False)
    run = root / "run"
    args = [*TINY, "--max_iters=2", "--vision_start_frac=1.0", "--image_iters=0", "--eval_interval=100",
            f"--data_dir={data}", f"--out_dir={run}"]
    subprocess.run([sys.executable, "pretrain.py", *args], cwd=ROOT, check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    checkpoint = load_checkpoint(str(run / "ckpt.pt"))
    checkpoint["model_config"]["qk_norm"] = True
    save_checkpoint(str(root / "qk_norm.pt"), checkpoint)
    # a run whose log has a record without "iter"
    shutil.copytree(run, root / "bad_log")
    with open(root / "bad_log" / "log.jsonl", "a") as f:
        f.write('{"loss": 1.0}\n')
    (root / "a_file").write_text("not a folder")
    (root / "read_only").mkdir(mode=0o555)
    (root / "empty").mkdir()
    # Hub layouts with garbage, wrong columns, too few files
    for name in ("a", "b"):
        garbage(str(root / "garbage" / f"{name}.parquet"))
        garbage(str(root / "garbage" / "sample" / "10BT" / f"{name}.parquet"))
        garbage(str(root / "garbage" / "vqav2" / f"train-{name}.parquet"))
        garbage(str(root / "garbage" / f"cc3m-train-{name}.tar"))
        garbage(str(root / "garbage" / "allenai" / "ai2_arc" / "ARC-Easy" / f"test-{name}.parquet"))
        parquet(str(root / "columns" / f"{name}.parquet"), content=["some text"])
        parquet(str(root / "columns" / "vqav2" / f"train-{name}.parquet"), content=["some text"])
        parquet(str(root / "columns" / "allenai" / "ai2_arc" / "ARC-Easy" / f"test-{name}.parquet"), content=["x"])
    garbage(str(root / "garbage" / "cc3m-validation-0.tar"))
    parquet(str(root / "one_file" / "a.parquet"), text=["a document"])
    return {"data": data, "untrained": untrained, "run": str(run), "root": str(root)}


def cases(w):
    """(script, args, words the one error line must hold)."""
    root, data, ckpt = w["root"], w["data"], os.path.join(w["run"], "ckpt.pt")
    fresh = iter(range(1000))

    def pretrain(*args):
        return "pretrain.py", [*TINY, f"--data_dir={data}", f"--out_dir={root}/pretrain{next(fresh)}", *args]

    def finetune(*args, data_dir=data):
        return "finetune.py", ["--batch_size=4", "--text_rows=0", "--seq_len=0", f"--data_dir={data_dir}",
                               f"--init_from={ckpt}", f"--out_dir={root}/finetune{next(fresh)}", *args]

    def sweep(*args):
        return "sweep.py", [f"--sweep_dir={root}/sweep", "--dry_run=True", *args]

    def axes(entries):
        return f"--axes={{{entries}}}"

    def prepare(source, *args):
        return f"data/{source}/prepare.py", [f"--out_dir={root}/prepared{next(fresh)}", "--num_proc=2", *args]

    cuda_missing = [] if torch.cuda.is_available() else [
        (*pretrain("--device=cuda"), "sees no CUDA GPU"), (*finetune("--device=cuda"), "sees no CUDA GPU")]
    read_only = [] if os.geteuid() == 0 else [  # root writes anywhere; the a_file cases below stand in
        (*pretrain(f"--out_dir={root}/read_only/run"), "cannot write to out_dir"),
        (*finetune(f"--out_dir={root}/read_only/sft"), "cannot write to out_dir"),
        ("export_hf.py", [f"--ckpt={ckpt}", f"--out_dir={root}/read_only/hf"], "cannot create out_dir")]
    return cuda_missing + read_only + [
        (*pretrain("--patch_size=5"), "patch_size (5) must divide image_size (32)"),
        (*pretrain("--learning_rate=-0.001"), "learning_rate must not be negative"),
        (*pretrain("--beta1=-0.5"), "beta1 and beta2 must lie in [0, 1)"),
        (*pretrain("--beta2=1.0"), "beta1 and beta2 must lie in [0, 1)"),
        (*pretrain("--device=gpu"), "device must be 'auto', 'cuda' or 'cpu'"),
        (*pretrain("--vision_encoder=foo"), "vision_encoder must be one of ('patches', 'siglip'), got 'foo'"),
        (*pretrain("--vision_encoder=siglip", "--vision_weights=not a repo"), "vision_weights 'not a repo' is neither"),
        (*pretrain("--out_dir="), "out_dir must not be empty"),
        (*pretrain(f"--out_dir={root}/a_file/run"), f"cannot write to out_dir {root}/a_file/run"),
        (*pretrain("--n_embd=12", "--n_head=4"), "the head size n_embd / n_head (3) must be even"),
        (*pretrain("--vit_width=0"), "vit_width must be positive"),
        (*pretrain("--save_fracs=(0.001, 0.004)"), "name one checkpoint twice: ckpt_frac0.00.pt"),
        ("pretrain.py", [*TINY, "--max_iters=2", "--vision_start_frac=1.0", "--image_iters=0", "--eval_interval=100",
                         f"--data_dir={data}", f"--out_dir={root}/bad_log", "--init_from=resume"],
         "log.jsonl: line 5 has no \"iter\""),
        (*finetune("--seq_len=8"), "seq_len 8 leaves no room for text after the 16 image tokens"),
        (*finetune(data_dir=w["untrained"]), "fine-tuning would train on nothing"),
        (*finetune("--learning_rate=-1.0"), "learning_rate must not be negative"),
        (*finetune("--warmup_frac=2.0"), "warmup_frac in [0, 1]"),
        (*finetune(f"--out_dir={root}/a_file/sft"), "cannot write to out_dir"),
        ("export_hf.py", [f"--ckpt={ckpt}", "--dtype=float16"], "dtype must be 'float32' or 'bfloat16'"),
        ("export_hf.py", [f"--ckpt={root}/qk_norm.pt", f"--out_dir={root}/hf"], "this model uses qk_norm"),
        ("export_hf.py", [f"--ckpt={ckpt}", f"--out_dir={root}/a_file/hf"], f"cannot create out_dir {root}/a_file/hf"),
        (*sweep("--fracz=(0.5,)"), "unknown setting 'fracz'"),
        (*sweep("--axes=0.5"), "axes must be of type dict"),
        (*sweep("--nproc=0"), "nproc must be at least 1"),
        (*sweep("--cells_at_once=0"), "cells_at_once must be at least 1"),
        (*sweep("--seeds=(1337, 1337)"), "seeds must be a non-empty tuple of distinct integers"),
        (*sweep(axes("'vision_start_frac': (0.2, 0.2)")), "would share a folder (0.20)"),
        (*sweep(axes("'vision_start_frac': (0.501, 0.504)")), "would share a folder (0.50)"),
        (*sweep(axes("'vision_start_frac': (0.5,), 'image_ratio': (0.1, 0.1)")),
         "axes: image_ratio (0.1, 0.1): values that read alike would share a folder (0.10)"),
        (*sweep(axes("'vision_start_frac': (0.5,), 'image_ratio': ()")),
         "axes: image_ratio must have a non-empty tuple of values"),
        (*sweep(axes("'vision_start_frac': (-0.2, 0.5)")), "axes: vision_start_frac must lie in [0, 1]"),
        (*sweep(axes("'vision_start_frac': (0.5, 1.01)")), "axes: vision_start_frac must lie in [0, 1]"),
        (*sweep(axes("'image_ratio': (0.5,)")), "axes must include vision_start_frac"),
        (*sweep(axes("'vision_start_frac': (0.5,), 'learning_rate': (0.1,)")),
         "pretrain.py and finetune.py both have 'learning_rate': write 'pretrain.learning_rate' or "
         "'finetune.learning_rate'"),
        (*sweep(axes("'vision_start_frac': (0.5,), 'epoch': (1,)")), "axes: unknown setting 'epoch'"),
        (*sweep(axes("'vision_start_frac': (0.5,), 'finetune.epoch': (1,)")),
         "axes: finetune.py has no setting 'epoch'"),
        (*sweep(axes("'vision_start_frac': (0.5,), 'evaluate.max_items': (8,)")),
         "'evaluate.max_items' must be a setting, or 'pretrain.' or 'finetune.' and a setting"),
        (*sweep(axes("'vision_start_frac': (0.5,), 'pretrain.learning_rate': (0.1,)")),
         "pretrain.learning_rate cannot be an axis: every cell branches from the same text run"),
        (*sweep(axes("'vision_start_frac': (0.5,), 'finetune.seed': (1,)")), "finetune.seed cannot be an axis"),
        (*sweep(axes("'vision_start_frac': (0.5,), 'epochs': (2,), 'finetune.epochs': (4,)")),
         "axes: epochs is given twice"),
        (*sweep(axes("'vision_start_frac': (0.5,), 'epochs': (1.5,)")),
         "axes: --epochs=1.5: epochs must be of type int"),
        (*sweep(axes("'vision_start_frac': (0.5,), 'image_ratio_ramp': ('a b',)")),
         "axes: image_ratio_ramp ('a b',): every value must write as a folder name"),
        (*sweep("--launcher=pbs"), "launcher must be 'local' or 'slurm'"),
        (*sweep("--time_limit=soon"), "time_limit 'soon' is not a SLURM time"),
    ] + [
        (*prepare(source, f"--local_dir={root}/missing"), f"--local_dir {root}/missing: no such folder")
        for source in ("dclm", "fineweb_edu", "cc3m", "cauldron")
    ] + [
        (*prepare(source, f"--local_dir={root}/empty"), f"{root}/empty: no files match")
        for source in ("dclm", "fineweb_edu", "cc3m", "cauldron")
    ] + [
        (*prepare("dclm", f"--local_dir={root}/garbage"), ".parquet: not a readable parquet file (ArrowInvalid"),
        (*prepare("fineweb_edu", f"--local_dir={root}/garbage"), "b.parquet: not a readable parquet file"),
        (*prepare("cc3m", f"--local_dir={root}/garbage"), "cc3m-validation-0.tar: not a readable tar file (ReadError)"),
        (*prepare("cauldron", f"--local_dir={root}/garbage", "--subsets=vqav2"), "not a readable parquet file"),
        (*prepare("dclm", f"--local_dir={root}/columns"), ".parquet: no column 'text' (its columns: content)"),
        (*prepare("cauldron", f"--local_dir={root}/columns", "--subsets=vqav2"), "no column 'images', 'texts'"),
        (*prepare("dclm", f"--local_dir={root}/one_file"), "need at least 2 parquet files"),
        (*prepare("dclm", f"--out_dir={root}/a_file/out", f"--local_dir={root}/columns"), "cannot create --out_dir"),
        (*prepare("cc3m", "--image_size=4"), "--image_size must be at least 8"),
        (*prepare("cauldron", "--image_size=4"), "--image_size must be at least 8"),
        ("data/benchmarks/prepare.py", ["--tasks=foo"], "--tasks: unknown task foo"),
        ("data/benchmarks/prepare.py", ["--image_size=4"], "--image_size must be at least 8"),
        ("data/benchmarks/prepare.py", [f"--local_dir={root}/missing", f"--out_dir={root}/bench"],
         f"--local_dir: {root}/missing/"),
        ("data/benchmarks/prepare.py", ["--tasks=arc_easy", f"--local_dir={root}/garbage", f"--out_dir={root}/bench"],
         "test-a.parquet: not a readable parquet file"),
        ("data/benchmarks/prepare.py", ["--tasks=arc_easy", f"--local_dir={root}/columns", f"--out_dir={root}/bench"],
         "test-a.parquet: no column 'id', 'question', 'choices', 'answerKey'"),
    ]


def test_every_user_error_is_one_line_and_exit_status_1(world, tmp_path):
    table = cases(world)
    with open(tmp_path / "cases.json", "w") as f:
        json.dump([[script, args] for script, args, _ in table], f)
    subprocess.run([sys.executable, "tests/script_cases.py", str(tmp_path / "cases.json"),
                    str(tmp_path / "results.json")], cwd=ROOT, check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    wrong = []
    for (script, args, words), result in zip(table, results):
        lines = result["stderr"].strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        if (result["code"] != 1 or "Traceback" in result["stderr"] or len(errors) != 1
                or not lines[-1].startswith("error: ") or words not in lines[-1]):
            wrong.append(f"{script} {' '.join(args[-2:])}: exit {result['code']}, expected an error line with "
                         f"{words!r}; stderr ends:\n{result['stderr'][-600:]}")
    assert not wrong, f"{len(wrong)} of {len(table)} cases:\n" + "\n".join(wrong)
    # nothing was trained or written on the way to those errors
    assert not [p for p in os.listdir(world["root"]) if p.startswith(("pretrain", "finetune"))
                and os.path.exists(os.path.join(world["root"], p, "ckpt.pt"))]
