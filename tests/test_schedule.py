"""schedule.py: the start step, the learning rate, the image and conversation ratios and their
ramps, the batch layouts (against the loader that makes them), and a toy run of the cosine ramp."""

import math

import pytest
import torch

from configurator import script_settings
from data.loader import MixedLoader
from data.shards import find_shards
from data.tokenizer import load_tokenizer
from schedule import (batch_layouts, finetune_steps, image_ratio_at, image_start_step, instruct_ratio_at,
                      learning_rate_at, total_steps)
from tests.test_pretrain import data_dir, pretrain, read_log  # noqa: F401 (data_dir: the fixture)
from tests.tiny_data import write_tiny_chat_shards


def settings(*args):
    return script_settings("pretrain.py", ["config/toy.py", *args])


def test_start_step_and_length():
    s = settings("--vision_start_frac=0.4", "--max_iters=300", "--image_iters=600")
    assert image_start_step(s) == 120 and total_steps(s) == 720
    assert image_start_step(settings("--vision_start_frac=0.333", "--max_iters=10")) == 3  # rounded


def test_learning_rate_replays_the_text_schedule_stretched_or_rewarms():
    s = settings("--vision_start_frac=0.5", "--max_iters=100", "--image_iters=200", "--warmup_iters=10")
    assert learning_rate_at(s, 0) == pytest.approx(s["learning_rate"] / 10)
    assert learning_rate_at(s, 9) == pytest.approx(s["learning_rate"])
    # the image phase's step k is the text schedule's step 50 + 50 k / 200
    text_only = settings("--vision_start_frac=1.0", "--max_iters=100", "--warmup_iters=10")
    assert learning_rate_at(s, 50 + 100) == pytest.approx(learning_rate_at(text_only, 75))
    assert learning_rate_at(s, 50 + 199) > s["min_lr"]
    assert learning_rate_at(s, 250) == pytest.approx(s["min_lr"])
    late = settings("--vision_start_frac=1.0", "--max_iters=100", "--image_iters=50", "--rewarm_iters=5")
    assert learning_rate_at(late, 99) == pytest.approx(late["min_lr"], rel=1e-2)  # the text run's last step
    assert learning_rate_at(late, 104) == pytest.approx(late["rewarm_lr"])  # warmed up again


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_ratio_ramps_climb_from_zero_to_the_ratio(shape):
    s = settings("--vision_start_frac=0.5", "--max_iters=100", "--image_ratio=0.4", "--image_ratio_ramp_iters=20",
                 f"--image_ratio_ramp={shape}")
    ratios = [image_ratio_at(s, it) for it in range(40, 90)]
    assert ratios[:10] == [0.0] * 10  # text steps
    ramp = ratios[10:30]
    assert 0 < ramp[0] < 0.05 and ramp == sorted(ramp) and ramp[-1] == pytest.approx(0.4)
    assert ratios[30:] == [0.4] * 20
    assert ramp[9] == pytest.approx(0.2)  # halfway through the ramp, both shapes are at half the ratio
    if shape == "cosine":  # slower than the line at first: fewer image rows early in the phase
        assert ramp[2] < 0.4 * 3 / 20
    # conversations start and ramp with the images, at their own ratio
    with_chats = {**s, "instruct_ratio": 0.1}
    assert [instruct_ratio_at(with_chats, it) for it in range(40, 90)] == pytest.approx([r / 4 for r in ratios])
    assert [image_ratio_at(with_chats, it) for it in range(40, 90)] == ratios


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return str(write_tiny_chat_shards(tmp_path_factory.mktemp("chat")))


@pytest.mark.parametrize("instruct_ratio", ["--instruct_ratio=0.0", "--instruct_ratio=0.2"])
@pytest.mark.parametrize("ramp", ["--image_ratio_ramp_iters=0", "--image_ratio_ramp_iters=7",
                                  "--image_ratio_ramp=cosine"])
def test_batch_layouts_are_the_row_counts_the_loader_makes(data_dir, chat_dir, ramp, instruct_ratio):  # noqa: F811
    s = settings("--vision_start_frac=0.5", "--max_iters=8", "--image_iters=12", "--image_ratio=0.3",
                 "--batch_size=4", "--grad_accum=2", "--image_ratio_ramp_iters=5", ramp, instruct_ratio,
                 "--seq_len=64", "--caption_len=20")
    tokenizer = load_tokenizer(data_dir)
    loader = MixedLoader(text_files=find_shards(data_dir, "train_text*.bin"),
                               caption_files=find_shards(data_dir, "train_caption*.bin"),
                               chat_files=find_shards(chat_dir, "train_chat*.bin"), tokenizer=tokenizer,
                               batch_size=4, seq_len=64, tokens_per_image=16, caption_len=20)
    seen = set()
    for it in range(total_steps(s)):
        for _ in range(s["grad_accum"]):
            x, _, _ = loader.next_batch(image_ratio_at(s, it), instruct_ratio_at(s, it))
            # conversation rows hold the chat template's <|assistant|>, captions and text never do
            is_chat_row = (x == tokenizer.assistant_id).any(dim=1)
            is_image_row = (x == tokenizer.image_id).any(dim=1) & ~is_chat_row
            seen.add((int(is_image_row.sum()), int(is_chat_row.sum())))
    assert batch_layouts(s) == sorted(seen)
    assert len({n_image for n_image, _ in seen}) >= 2
    assert len({n_chat for _, n_chat in seen}) >= (2 if s["instruct_ratio"] > 0 else 1)


def test_finetune_steps():
    s = script_settings("finetune.py", ["config/toy_sft.py", "--epochs=3", "--batch_size=10", "--text_rows=2",
                                        "--grad_accum=2"])
    assert finetune_steps(s, 3 * 100) == math.ceil(300 / 16)  # 3 epochs of 100 conversations, one a row


def test_a_cosine_ramp_run_logs_the_schedules_ratios(data_dir, tmp_path):  # noqa: F811
    """The README's first fork example: a cosine ramp of the image ratio, run at toy size."""
    args = ["--vision_start_frac=0.5", "--image_iters=6", "--image_ratio_ramp=cosine", "--image_ratio_ramp_iters=4"]
    pretrain(data_dir, tmp_path, *args)
    s = settings(*args, "--max_iters=10", "--image_ratio=0.5")
    log = [r for r in read_log(tmp_path) if "image_ratio" in r]
    assert [r["image_ratio"] for r in log] == [image_ratio_at(s, r["iter"]) for r in log]
    assert [r["iter"] for r in log if 0 < r["image_ratio"] < 0.5] == [5, 6, 7]
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert checkpoint["image_start_step"] == 5 and checkpoint["stage"] == "pretrain"
