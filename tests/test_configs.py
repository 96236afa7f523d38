"""The study's own configs, each exercised: config/79m.py, config/1b.py, config/1b_sft.py and
config/1b_sweep.py (the toy configs run in test_pipeline.py and test_sweep.py).

- At full size on the meta device: every config's parameter counts equal the README's table.
- At reduced size on the CPU: the same config files, overridden only in sizes, step counts,
  where the data lies and compile (a CPU compile costs about a minute and changes nothing
  here), over shards that the Hub preparers wrote from fixture files in the real formats, with
  a small random SigLIP tower in the Hub's layout: pretraining, fine-tuning from its
  checkpoint, evaluation on benchmark fixtures.
- The 1B sweep's plan with both launchers, whose totals the README quotes.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from configurator import script_settings
from data.cauldron import prepare as cauldron
from data.cc3m import prepare as cc3m
from data.dclm import prepare as dclm
from data.tokenizer import Tokenizer
from data.toyworld.prepare import compact_vocab
from model import VLM, model_config_from_settings
from tests.test_benchmarks import make_hub, run_prepare
from tests.test_realdata import caption_samples, cauldron_rows, docs_of, write_cauldron_parquet, write_tar, \
    write_text_parquet
from tests.tiny_data import ROOT

transformers = pytest.importorskip("transformers")  # the random SigLIP folder is saved by the reference
from tests.test_siglip import TINY_VISION, save_full_siglip  # noqa: E402

README = os.path.join(ROOT, "docs", "gpu_study.md")  # the model-size and FSDP tables, the sweep cost
SIZE = 16  # the tiny SigLIP tower's image size (patches of 8: 4 image tokens)
# Overrides of sizes and step counts only, for every pretraining config.
SMALL_PRETRAIN = ["--n_layer=2", "--n_head=4", "--n_kv_head=4", "--n_embd=64", "--ffn_hidden=128", "--seq_len=64",
                  "--caption_len=16", f"--image_size={SIZE}", "--patch_size=8", "--batch_size=4", "--grad_accum=2",
                  "--max_iters=6", "--warmup_iters=2", "--image_iters=4", "--rewarm_iters=2", "--log_interval=1",
                  "--eval_interval=3", "--eval_batches=2", "--ckpt_interval=3", "--compile=False"]
SMALL_FINETUNE = ["--batch_size=2", "--grad_accum=2", "--seq_len=64", "--epochs=1", "--log_interval=1",
                  "--eval_interval=2", "--eval_batches=2", "--compile=False"]


def run(*cmd):
    result = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


# -----------------------------------------------------------------------------
# full size: the README's table

def readme_row(config):
    """The cells of the README's model table row for `config/<name>.py`."""
    for line in open(README):
        if line.startswith(f"| `{config}` |"):
            return [cell.strip() for cell in line.strip().strip("|").split("|")]
    raise AssertionError(f"README.md has no table row for {config}")


def assert_millions(cell, count, what):
    """The first number of a README cell, in millions at its printed precision, is `count`."""
    text = re.match(r"([\d,]+(?:\.(\d+))?)M", cell)
    assert text, f"{what}: no count in README cell {cell!r}"
    decimals = len(text.group(2) or "")
    assert round(count / 1e6, decimals) == float(text.group(1).replace(",", "")), \
        f"{what}: README says {text.group(1)}M, the config builds {count / 1e6:,.{decimals + 1}f}M"


@pytest.mark.parametrize("config, vocab_size", [("config/toy.py", Tokenizer(compact_vocab()).vocab_size),
                                                ("config/79m.py", None), ("config/1b.py", None)])
def test_parameter_counts_equal_the_readme_table(config, vocab_size):
    settings = script_settings("pretrain.py", [config])
    tokenizer = Tokenizer(compact_vocab()) if vocab_size else Tokenizer()
    model_config = model_config_from_settings(settings, tokenizer.vocab_size, tokenizer.image_id)
    with torch.device("meta"):
        model = VLM(model_config)
    decoder = model.num_params("decoder")
    blocks = sum(p.numel() for p in model.blocks.parameters())
    encoder = sum(p.numel() for p in model.vision.encoder.parameters())
    projector = sum(p.numel() for p in model.vision.projector.parameters())
    row = readme_row(config)
    assert [int(x) for x in row[1:5]] == [settings["n_layer"], settings["n_embd"], settings["n_head"],
                                          settings["seq_len"]]
    assert_millions(row[5], decoder, f"{config} decoder")
    if "in blocks" in row[5]:
        assert_millions(row[5].split("(")[1], blocks, f"{config} blocks")
    assert_millions(row[6], encoder, f"{config} vision encoder")
    assert_millions(row[7], projector, f"{config} projector")
    assert int(row[8]) == model_config.tokens_per_image
    if vocab_size:
        assert f"vocab {vocab_size}" in row[5]


def test_memory_per_gpu_equals_the_readme_table():
    """Weights, gradients and AdamW per GPU: 16 bytes a trained parameter, 4 a frozen one; FSDP
    divides them by the number of GPUs."""
    readme = open(README).read()
    for configs in (["config/1b.py"], ["config/1b.py", "config/3b.py"]):
        settings = script_settings("pretrain.py", configs)
        tokenizer = Tokenizer()
        with torch.device("meta"):
            model = VLM(model_config_from_settings(settings, tokenizer.vocab_size, tokenizer.image_id))
        model.set_trainable(encoder=not settings["freeze_vision"])
        weights = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ddp = (4 * weights + 12 * trained) / 1e9
        row = f"| `{' '.join(configs)}` | {weights / 1e9:.2f}B ({trained / 1e9:.2f}B) | {ddp:.1f} GB | {ddp / 8:.1f} GB |"
        assert row in readme, row


# -----------------------------------------------------------------------------
# reduced size: the configs on the CPU, over data in the real formats

@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    """data/ as the README's real-data commands lay it out (dclm, cc3m, cc12m, cauldron,
    benchmarks), written by the preparers from fixture files; and a SigLIP folder."""
    root = tmp_path_factory.mktemp("study")
    hub, data = root / "hub", root / "data"
    for i in range(3):
        write_text_parquet(str(hub / "dclm" / "global-shard_01_of_10" / f"shard_{i:08d}_processed.parquet"),
                           docs_of(i) * 6)
    dclm.main([f"--local_dir={hub / 'dclm'}", f"--out_dir={data / 'dclm'}", "--num_proc=1"])
    for name in ("cc3m", "cc12m"):
        for i in range(3):
            split = "validation" if name == "cc3m" and i == 2 else "train"
            write_tar(str(hub / name / f"{name}-{split}-{i:04d}.tar"), caption_samples(i) * 3)
        cc3m.main([f"--dataset={name}", f"--local_dir={hub / name}", f"--out_dir={data / name}",
                   f"--image_size={SIZE}", "--num_proc=1"])
    for i in range(2):
        write_cauldron_parquet(str(hub / "cauldron" / "vqav2" / f"train-{i:05d}-of-00002.parquet"),
                               cauldron_rows("vqav2", i) * 3)
    cauldron.main([f"--local_dir={hub / 'cauldron'}", f"--out_dir={data / 'cauldron'}", "--subsets=vqav2",
                   f"--image_size={SIZE}", "--val_every=4", "--num_proc=1"])
    run_prepare(make_hub(hub / "benchmarks"), data / "benchmarks")
    siglip = root / "siglip"
    save_full_siglip(siglip, dict(TINY_VISION, image_size=SIZE, patch_size=8))
    return data, siglip


@pytest.fixture(scope="module")
def pretrained_1b(study_data, tmp_path_factory):
    data, siglip = study_data
    out = tmp_path_factory.mktemp("1b")
    log = run("pretrain.py", "config/1b.py", *SMALL_PRETRAIN, f"--data_dir={data / 'dclm'}",
              f"--vision_weights={siglip}", f"--out_dir={out}")
    return out, log


def test_config_1b_pretrains_with_its_siglip_tower_frozen(pretrained_1b):
    out, log = pretrained_1b
    checkpoint = torch.load(out / "ckpt.pt", weights_only=False)
    assert checkpoint["iter_num"] == round(0.8 * 6) + 4  # config/1b.py's start fraction, then the image phase
    c = checkpoint["model_config"]
    assert (c["vision_encoder"], c["qk_norm"], c["vocab_size"], c["siglip_feature_layer"]) == ("siglip", True,
                                                                                                 100352, -2)
    assert checkpoint["config"]["freeze_vision"] and checkpoint["config"]["image_ratio"] == 0.1
    assert "caption" in log  # the image phase read the cc12m shards


def test_config_79m_pretrains(study_data, tmp_path):
    data, siglip = study_data
    run("pretrain.py", "config/79m.py", *SMALL_PRETRAIN, f"--data_dir={data / 'dclm'}", f"--vision_weights={siglip}",
        f"--out_dir={tmp_path}")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert checkpoint["config"]["learning_rate"] == 3e-3 and checkpoint["model_config"]["vision_encoder"] == "siglip"


def test_config_1b_sft_finetunes_and_the_benchmarks_evaluate(study_data, pretrained_1b, tmp_path):
    data, _ = study_data
    out, _ = pretrained_1b
    run("finetune.py", "config/1b_sft.py", *SMALL_FINETUNE, f"--data_dir={data / 'cauldron'}",
        f"--init_from={out / 'ckpt.pt'}", f"--out_dir={tmp_path / 'sft'}")
    checkpoint = torch.load(tmp_path / "sft" / "ckpt.pt", weights_only=False)
    assert checkpoint["config"]["freeze_vision"] and checkpoint["config"]["text_rows"] == 0
    pretrained = torch.load(out / "ckpt.pt", weights_only=False)["model"]
    for name, tensor in checkpoint["model"].items():  # the tower stays as loaded, as config/1b_sft.py says
        if name.startswith("vision.encoder."):
            assert torch.equal(tensor, pretrained[name]), name
    # config/1b_sweep.py's evaluation arguments, on the benchmark fixtures
    table = run("evaluate.py", f"--ckpt={tmp_path / 'sft' / 'ckpt.pt'}", f"--data_dir={data / 'benchmarks'}",
                "--val_text=", "--max_new_tokens=2")
    for task in ("vqav2", "gqa", "pope", "arc_easy", "hellaswag"):
        assert f"| {task} |" in table


# -----------------------------------------------------------------------------
# the 1B sweep's plan

def plan_totals(output):
    match = re.search(r"^total: ([\d,.]+) GPU-h, ([\d,.]+) GB;.* (?:at most ([\d.]+) hours|([\d,.]+) hours one)",
                      output, re.M)
    assert match, output[-2000:]
    return match.groups()


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_the_1b_sweep_plan_prints_what_the_readme_says(launcher):
    out = run("sweep.py", "config/1b_sweep.py", f"--launcher={launcher}", "--dry_run=True")
    hours, disk, slurm_wall, local_wall = plan_totals(out)
    # every stage of the grid: a text run, then 6 fractions x 2 ratios of image phase, fine-tuning, evaluation
    assert len(re.findall(r"ratio 0\.[13]0 image phase: ", out)) == 12
    assert len(re.findall(r"ratio 0\.[13]0 fine-tuning: ", out)) == 12
    assert "--nproc_per_node=8 pretrain.py config/1b.py" in out
    if launcher == "slurm":
        assert "job #37: seed 1337 frac 1.00 ratio 0.30 evaluation" in out
    readme = open(README).read()
    stated = re.search(r"prints ([\d,.]+) GPU-hours and ([\d,.]+) GB per seed: at most ([\d.]+) hours", readme)
    assert stated, "README.md no longer quotes the 1B sweep's plan"
    assert (hours, disk) == stated.groups()[:2]
    if launcher == "slurm":
        assert slurm_wall == stated.group(3)
