"""The README's "Fork it" encoder example, exactly as printed: its diff applies to model.py in a
copy of the repository, and pretrain.py trains the new encoder there at toy size."""

import json
import os
import re
import subprocess
import sys

import torch

from tests.test_pretrain import TINY
from tests.test_readme_commands import copy_of_repository
from tests.tiny_data import ROOT, make_tiny_dataset


def readme_diff():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Fork it"):]
    blocks = re.findall(r"```diff\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Fork it section should hold one diff (the encoder example)"
    return blocks[0]


def test_the_readme_encoder_diff_applies_and_trains(tmp_path):
    repo = tmp_path / "repo"
    copy_of_repository(repo)
    (tmp_path / "encoder.diff").write_text(readme_diff())
    subprocess.run(["git", "apply", str(tmp_path / "encoder.diff")], cwd=repo, check=True,
                   capture_output=True)
    touched = {line[len("+++ b/"):] for line in readme_diff().splitlines() if line.startswith("+++ b/")}
    assert touched == {"model.py"}

    (tmp_path / "data").mkdir()
    data = make_tiny_dataset(tmp_path / "data")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "pretrain.py", *TINY, f"--data_dir={data}", f"--out_dir={out}",
                             "--vision_encoder=conv", "--vision_start_frac=0.5", "--image_iters=6"],
                            cwd=repo, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    weights = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
    assert any(name.startswith("vision.encoder.stem.") for name in weights)  # the new encoder was trained
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    captions = [r["caption_loss"] for r in log if r.get("caption_loss") is not None]
    assert len(captions) >= 5 and captions[-1] < captions[0]
