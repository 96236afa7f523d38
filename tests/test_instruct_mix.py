"""Instruction-tuning conversations in the image phase (pretrain.py's instruct_ratio): their
share of rows, answer-only targets built as fine-tuning builds them, resume and branch."""

import numpy as np
import pytest
import torch

from common import load_checkpoint, save_checkpoint
from data.loader import ConversationLoader, MixedLoader, rows_for_slot
from data.shards import find_shards
from data.tokenizer import load_tokenizer
from tests.test_faults import assert_one_error_line
from tests.test_pretrain import assert_same_weights, pretrain, read_log, weights
from tests.tiny_data import make_tiny_dataset, write_tiny_chat_shards

# text steps 0..4, image steps 5..10 (4 rows each); log records at steps 0, 3, 6, 9 and 10, each
# averaging the steps since the one before: a resume at step 8 and a branch at step 5 land mid window
MIX = ["--vision_start_frac=0.5", "--image_iters=6", "--image_ratio=0.4", "--instruct_ratio=0.3", "--log_interval=3"]
ROWS_PER_STEP = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_tiny_chat_shards(make_tiny_dataset(tmp_path_factory.mktemp("data"))))


@pytest.fixture(scope="module")
def continuous_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("continuous")
    pretrain(data_dir, out, *MIX)
    return out


def test_conversation_share_follows_instruct_ratio(continuous_run):
    log = [r for r in read_log(continuous_run) if "loss" in r]
    assert [r["iter"] for r in log] == [0, 3, 6, 9, 10]
    assert all(r["instruct_share"] == r["image_share"] == 0 and r["chat_loss"] is None for r in log[:2])
    assert all(r["instruct_ratio"] == 0.3 and r["chat_loss"] is not None for r in log[2:])
    # the rows of each kind so far, at every record: within half a row of what the ratio asks
    rows = {"instruct_share": 0.0, "image_share": 0.0}
    for previous, r in zip([-1] + [r["iter"] for r in log], log):
        image_steps = max(0, r["iter"] - 4)
        for key, ratio in (("instruct_share", 0.3), ("image_share", 0.4)):
            rows[key] += r[key] * ROWS_PER_STEP * (r["iter"] - previous)
            assert abs(rows[key] - ratio * ROWS_PER_STEP * image_steps) <= 0.5 + 1e-9, (key, r["iter"], rows)
    loader = torch.load(continuous_run / "ckpt.pt", weights_only=False)["loader"]
    assert loader["chat_sample"] == round(0.3 * ROWS_PER_STEP * 6)  # conversations handed out


def test_credit_counters_never_overfill_a_micro_batch():
    # 1.5 + 2.5 rows a slot round up to 2 + 3 > 4: the conversations wait for room
    for ratios, batch_size in (((0.375, 0.625), 4), ((0.5, 0.5), 3), ((0.2, 0.7), 5), ((0.0, 1.0), 4)):
        credits, totals = (0.0, 0.0), np.zeros(2)
        for slot in range(1, 200):
            counts, credits = rows_for_slot(credits, ratios, batch_size)
            assert min(counts) >= 0 and sum(counts) <= batch_size
            totals += counts
            earned = np.array(ratios) * batch_size * slot
            assert abs(totals[0] - earned[0]) <= 0.5 + 1e-9  # image-caption rows come first
            assert abs(totals[1] - earned[1]) <= 1.5 + 1e-9, (ratios, slot)


def mixed_loader(data_dir, rank=0, world_size=1):
    return MixedLoader(text_files=find_shards(data_dir, "train_text*.bin"),
                             caption_files=find_shards(data_dir, "train_caption*.bin"),
                             chat_files=find_shards(data_dir, "train_chat*.bin"), seed=7,
                             tokenizer=load_tokenizer(data_dir), batch_size=4, seq_len=64, tokens_per_image=16,
                             caption_len=20, rank=rank, world_size=world_size)


def test_conversation_rows_are_finetunings_rows_with_answer_only_targets(data_dir):
    tokenizer = load_tokenizer(data_dir)
    chat_files = find_shards(data_dir, "train_chat*.bin")
    mixed = mixed_loader(data_dir)
    finetuning = ConversationLoader(files=chat_files, tokenizer=tokenizer, batch_size=1, seq_len=64,
                                    tokens_per_image=16, seed=7)
    chat_rows = 0
    for _ in range(30):  # past the end of the 40 conversations: the second epoch's order too
        x, y, images = mixed.next_batch(0.25, 0.5)
        n_image, n_chat = mixed.layout
        assert images.shape[0] == n_image * mixed.samples_per_row + n_chat
        for j in range(n_chat):
            row, image = n_image + j, n_image * mixed.samples_per_row + j  # caption images come first
            expected_x, expected_y, expected_image = finetuning.next_batch()
            assert torch.equal(x[row], expected_x[0]) and torch.equal(y[row], expected_y[0])
            assert torch.equal(images[image], expected_image[0])
            # targets: the answer's words and its <|end|>, nothing of the image or the question
            tokens = x[row].tolist()
            in_answer, answer = False, []
            for t in tokens:
                answer.append(in_answer)
                if t == tokenizer.assistant_id:
                    in_answer = True
                elif t == tokenizer.end_id:
                    in_answer = False
            trained = (y[row, :-1] != -1).tolist()
            assert trained == answer[1:] and any(trained)
            assert torch.equal(y[row, :-1][y[row, :-1] != -1], x[row, 1:][y[row, :-1] != -1])
            chat_rows += 1
        # the rest are text rows: no image placeholders, every position trained
        assert not (x[n_image + n_chat:] == tokenizer.image_id).any() and (y[n_image + n_chat:] != -1).all()
    assert chat_rows == 60 and mixed.state["chat_sample"] == 60


def test_ranks_split_the_single_process_stream_and_resume_it(data_dir):
    single = mixed_loader(data_dir)
    ranks = [mixed_loader(data_dir, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):  # two ranks, one micro-batch each = one rank, two micro-batches
        for loader in ranks:
            for a, b in zip(loader.next_batch(0.3, 0.4), single.next_batch(0.3, 0.4)):
                assert torch.equal(a, b)
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    assert single.state["chat_sample"] > 0
    resumed = mixed_loader(data_dir)
    resumed.load_state_dict(single.state_dict())
    for _ in range(12):
        for a, b in zip(resumed.next_batch(0.3, 0.4), single.next_batch(0.3, 0.4)):
            assert torch.equal(a, b)


def test_resume_and_branch_with_conversations_equal_uninterrupted(data_dir, continuous_run, tmp_path):
    resumed = tmp_path / "resumed"
    pretrain(data_dir, resumed, *MIX, "--stop_at_iter=8")
    pretrain(data_dir, resumed, *MIX, "--init_from=resume")
    assert read_log(resumed) == read_log(continuous_run)  # every loss and share, bit for bit
    assert_same_weights(weights(resumed / "ckpt.pt"), weights(continuous_run / "ckpt.pt"))

    # a text-only run (no conversations) branches into the mix
    text_run = tmp_path / "text"
    pretrain(data_dir, text_run, "--vision_start_frac=1.0", "--image_iters=0", "--save_fracs=(0.5,)",
             "--log_interval=3", "--stop_at_iter=5")
    branch = tmp_path / "branch"
    pretrain(data_dir, branch, *MIX, f"--init_from={text_run / 'ckpt_frac0.50.pt'}")
    assert read_log(branch) == read_log(continuous_run, from_iter=5)
    assert_same_weights(weights(branch / "ckpt.pt"), weights(continuous_run / "ckpt.pt"))

    # a text checkpoint written before conversation rows existed branches the same way
    old = load_checkpoint(text_run / "ckpt_frac0.50.pt")
    for key in ("chat_sample", "chat_credit"):
        del old["loader"][key]
    del old["log_window"]["chat_rows"]
    old["log_window"]["stats"] = old["log_window"]["stats"][:4]
    for key in ("instruct_ratio", "train_chat"):
        del old["config"][key]
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in old.items() if k != "sha256"})
    old_branch = tmp_path / "old_branch"
    pretrain(data_dir, old_branch, *MIX, f"--init_from={tmp_path / 'old.pt'}")
    assert read_log(old_branch) == read_log(continuous_run, from_iter=5)


def test_bad_instruct_settings_are_one_error_line(data_dir, tmp_path):
    for args, message in [(["--image_ratio=0.6", "--instruct_ratio=0.5"],
                           "image_ratio + instruct_ratio must not exceed 1 (they are shares of the same rows), got "
                           "image_ratio 0.6 and instruct_ratio 0.5"),
                          (["--instruct_ratio=0.2", "--train_chat=missing*.bin"],
                           "missing*.bin (instruct_ratio=0.2 mixes conversation rows")]:
        result = pretrain(data_dir, tmp_path, *args, check=False)
        assert_one_error_line(result, message)
