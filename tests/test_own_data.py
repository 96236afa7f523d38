"""data/own/prepare.py on a small data set of a user's own in every format it accepts, awkward rows
included, then what the README's "Your own data" runs: fine-tuning a toy checkpoint on it with its
vocabulary extended by the new words, and evaluating it."""

import json
import os
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch

from common import save_checkpoint
from data.errors import UserError
from data.images import load_image
from data.own import prepare
from data.shards import CONVERSATION, IMAGE_CAPTION, read_shard
from data.tokenizer import Tokenizer, vocab_growth
from data.toyworld.prepare import compact_vocab
from model import VLM, ModelConfig
from tests.own_data import make_own_dataset, scene_facts
from tests.test_pipeline import run


def test_vocab_growth_moves_old_rows_and_refuses_to_lose_tokens():
    # ids are positions in the sorted list: 7 and 30 push the old tokens after them along
    assert vocab_growth([5, 10, 20], [5, 7, 10, 20, 30]) == [0, -1, 1, 2, -1]
    assert vocab_growth([5, 10], [5, 10]) == [0, 1]
    grown = vocab_growth([0, 100257], None)  # to the full vocabulary: each old row at its cl100k id
    assert grown[0] == 0 and grown[100257] == 1 and grown.count(-1) == len(grown) - 2
    with pytest.raises(ValueError, match="lacks 1 of the 3 tokens"):
        vocab_growth([5, 10, 20], [5, 20, 30])


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    """A toy-sized checkpoint in the toy world's compact vocabulary, as pretrain.py writes one."""
    vocab = compact_vocab()
    tok = Tokenizer(vocab)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                         ffn_hidden=64, vit_width=16, vit_heads=2, image_size=32, patch_size=8,
                         image_token_id=tok.image_id)
    path = tmp_path_factory.mktemp("toy") / "ckpt.pt"
    save_checkpoint(str(path), {"config": {}, "model_config": asdict(config), "model": VLM(config).state_dict(),
                                "compact_vocab": vocab})
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, toy_checkpoint):
    """The data set, prepared as a user would, in the toy checkpoint's vocabulary extended."""
    root = tmp_path_factory.mktemp("own")
    files = make_own_dataset(str(root / "files"))
    out = root / "prepared"
    result = run("data/own/prepare.py", f"--out_dir={out}", f"--vocab={toy_checkpoint}", "--val_every=5",
                 "--num_proc=2", f"--conversations={files['chat']}", f"--captions={files['captions_jsonl']}",
                 f"--captions={files['captions_csv']}", f"--captions={files['captions_folder']}",
                 f"--eval={files['eval_open']}", f"--eval={files['eval_mc']}", f"--eval={files['eval_yn']}")
    return files, out, result.stdout


def test_every_format_is_prepared_and_awkward_rows_are_counted(prepared, toy_checkpoint):
    files, out, printed = prepared
    meta = json.loads((out / "meta.json").read_text())
    old = compact_vocab()
    assert set(old) < set(meta["compact_vocab"]) and meta["image_size"] == [32, 32]  # the checkpoint's size
    tok = Tokenizer(meta["compact_vocab"])
    for word in (" colour", " contains", " teal"):  # the new words now have ids of their own
        assert len(tok.encode(word)) == 1 and tok.compact_vocab[tok.encode(word)[0]] not in old

    # conversations: 30 good rows (every 5th one to validation), 7 awkward ones, each counted
    train = read_shard(out / "train_chat_train_00000.bin", CONVERSATION, tok.vocab_size)
    val = read_shard(out / "val_chat_train_00000.bin", CONVERSATION, tok.vocab_size)
    assert (train.num_samples, val.num_samples) == (24, 6)
    chats = json.load(open(files["chat"]))
    _, color, shape = scene_facts(1)
    turns = [("user", "What colour is the shape it contains?"), ("assistant", color),
             ("user", f"Which shape is teal or {color}?"), ("assistant", shape)]
    ids, mask = tok.encode_conversation(turns)
    assert train.sample_tokens(0).tolist() == ids and train.loss_mask[:len(mask)].tolist() == mask
    assert np.array_equal(train.images[0], load_image(os.path.join(os.path.dirname(files["chat"]),
                                                                   chats[1]["image"]), 32))
    for reason in ("no image", "image file missing", "undecodable image", "an empty turn",
                   "a turn not from human/user or gpt/assistant", "several images", "a row that is not an object"):
        assert f"skipped 1 rows: {reason}" in printed, reason

    # captions: 12 good rows in each of the three forms, 9 train and 3 validation
    for name in ("captions", "more_captions", "caption_pairs"):
        shard = read_shard(out / f"train_caption_{name}_00000.bin", IMAGE_CAPTION, tok.vocab_size)
        assert shard.num_samples == 9 and read_shard(out / f"val_caption_{name}_00000.bin").num_samples == 3
        assert tok.decode(shard.sample_tokens(0)).endswith(" in a teal frame")
    for reason in ("a line that is not JSON", "no caption", "an empty or non-text caption",
                   "an image or a .txt caption without the other"):
        assert f"skipped 1 rows: {reason}" in printed, reason

    # evaluation sets: one task of each kind, with what the rows said
    tasks = {name: json.loads((out / f"eval_test_{name}.json").read_text()) for name in ("open", "mc", "yn")}
    assert {n: (t["kind"], len(t["items"])) for n, t in tasks.items()} == {
        "open": ("open", 20), "mc": ("multiple_choice", 10), "yn": ("yes_no", 20)}
    assert tasks["open"]["skipped"] == {"image file missing": 1, "no question": 1}
    assert tasks["mc"]["skipped"] == {"an answer that is not one of the options": 1}
    assert tasks["yn"]["skipped"] == {"undecodable image": 1}
    first = tasks["open"]["items"][0]
    assert first["id"] == "q30" and first["answer"] == [scene_facts(30)[1]] and first["answer_type"] == "colour"
    assert tasks["mc"]["chance"] == pytest.approx(1 / 6) and tasks["mc"]["delimiter"] == ""
    pictures = np.load(out / "eval_test_open_images.npy")
    assert pictures.shape == (10, 32, 32, 3)  # each picture once, though two questions ask about it
    assert np.array_equal(pictures[first["image"]], load_image(os.path.join(os.path.dirname(files["chat"]),
                                                                            "pics/30.jpg"), 32))


def test_a_rerun_resumes_and_another_vocabulary_is_refused(prepared, toy_checkpoint, capsys):
    files, out, _ = prepared
    names = sorted(os.listdir(out))
    stamps = {n: os.stat(out / n).st_mtime_ns for n in names if n != "meta.json"}
    args = [f"--out_dir={out}", f"--vocab={toy_checkpoint}", "--val_every=5", "--num_proc=1",
            f"--conversations={files['chat']}", f"--eval={files['eval_mc']}"]
    prepare.main(args)
    assert {n: os.stat(out / n).st_mtime_ns for n in stamps} == stamps  # nothing redone
    assert "eval_test_mc.json exists, skipped" in capsys.readouterr().out
    with pytest.raises(UserError, match="meta.json: this folder was prepared with a compact vocabulary, not the full"):
        prepare.main(args[:1] + ["--vocab=full", "--image_size=32"] + args[2:])
    with pytest.raises(UserError, match="meta.json: this folder was prepared with pictures of \\[32, 32\\]"):
        prepare.main(args[:1] + ["--vocab=compact", "--image_size=64"] + args[2:])


def test_a_rerun_with_fewer_rows_removes_the_shards_it_no_longer_makes(tmp_path, toy_checkpoint):
    files = make_own_dataset(str(tmp_path / "files"))
    with open(files["chat"]) as f:
        rows = json.load(f)
    def write(folder, n):  # the first n rows (well-formed ones), under one file name: the same shards' names
        path = tmp_path / folder / "chat.json"
        path.parent.mkdir()
        with open(path, "w") as f:
            json.dump([dict(r, image=os.path.join(os.path.dirname(files["chat"]), r["image"])) for r in rows[:n]], f)
        return path

    more, fewer = write("more", 30), write("fewer", 10)
    out = tmp_path / "prepared"
    common = [f"--out_dir={out}", f"--vocab={toy_checkpoint}", "--val_every=5", "--shard_rows=10", "--num_proc=1"]
    prepare.main(common + [f"--conversations={more}"])
    before = sorted(n for n in os.listdir(out) if n.startswith("train_chat"))
    assert len(before) > 1
    prepare.main(common + [f"--conversations={fewer}"])
    after = sorted(n for n in os.listdir(out) if n.startswith("train_chat"))
    assert after == before[:1]  # the first ten rows' shard only
    assert json.load(open(out / "sources.json")).keys() >= set(after)


@pytest.mark.parametrize("problem, make, message", [
    ("a JSON object, not a list", lambda d: (d / "c.json").write_text('{"image": "x"}'), "c.json: expected a JSON list"),
    ("JSON that does not parse", lambda d: (d / "c.json").write_text('[{"image": '), "c.json: not valid JSON"),
    ("a CSV without a caption column", lambda d: (d / "c.csv").write_text("image,text\na.jpg,hi\n"),
     "c.csv: no column 'caption' in its header line (it has 'image', 'text')"),
    ("rows that are all unusable", lambda d: (d / "c.json").write_text('[{"image": "absent.jpg"}]'),
     "c.json: no usable rows among 1"),
    ("a file that is not there", lambda d: None, "c.json: no such file"),
])
def test_a_bad_file_is_one_line_naming_it(tmp_path, problem, make, message):
    make(tmp_path)
    option = "--captions" if "CSV" in problem else "--conversations"
    with pytest.raises(UserError, match=re.escape(message)) as error:
        prepare.main([f"--out_dir={tmp_path / 'out'}", f"{option}={tmp_path / ('c.csv' if 'CSV' in problem else 'c.json')}"])
    assert "\n" not in str(error.value)


def test_the_image_size_must_be_the_checkpoints(tmp_path, toy_checkpoint):
    (tmp_path / "c.json").write_text("[]")
    with pytest.raises(UserError, match="--image_size 64: .* was trained on 32x32 pictures"):
        prepare.main([f"--out_dir={tmp_path / 'out'}", f"--vocab={toy_checkpoint}", "--image_size=64",
                      f"--conversations={tmp_path / 'c.json'}"])


def test_a_toy_checkpoint_is_fine_tuned_on_new_words_and_scored(prepared, toy_checkpoint, tmp_path):
    """The README's commands: fine-tune on the conversations only, then evaluate the three tasks."""
    _, out, _ = prepared
    sft = ["finetune.py", "config/toy_sft.py", f"--data_dir={out}", f"--init_from={toy_checkpoint}",
           "--batch_size=8", "--seq_len=64", "--epochs=2", "--eval_interval=4", "--eval_batches=1"]
    # a folder without text shards: the error says how to fine-tune on conversations only
    with pytest.raises(AssertionError, match="to fine-tune on conversations only, set --text_rows=0"):
        run(*sft, "--text_rows=2", f"--out_dir={tmp_path / 'no_text'}")

    # the added ids' rows start at the mean of the old rows; the old rows move to their tokens' new ids
    run(*sft, "--text_rows=0", f"--out_dir={tmp_path / 'grown'}", "--stop_at_iter=0")
    before = torch.load(toy_checkpoint, weights_only=False)
    after = torch.load(tmp_path / "grown" / "ckpt.pt", weights_only=False)
    new_vocab = json.loads((out / "meta.json").read_text())["compact_vocab"]
    assert after["compact_vocab"] == new_vocab and after["model_config"]["vocab_size"] == len(new_vocab)
    assert after["model_config"]["image_token_id"] == Tokenizer(new_vocab).image_id
    source = torch.tensor(vocab_growth(before["compact_vocab"], new_vocab))
    for key in ("wte.weight", "lm_head.weight"):
        old, grown = before["model"][key], after["model"][key]
        assert torch.equal(grown[source >= 0], old[source[source >= 0]])
        assert torch.allclose(grown[source < 0], old.mean(0).expand(int((source < 0).sum()), -1))

    run(*sft, "--text_rows=0", f"--out_dir={tmp_path / 'sft'}")
    ckpt = tmp_path / "sft" / "ckpt.pt"
    result = run("evaluate.py", f"--ckpt={ckpt}", f"--data_dir={out}", "--val_text=")
    report = json.loads(open(f"{ckpt}.eval.json").read())
    assert {t["name"]: t["n"] for t in report["tasks"]} == {"test_mc": 10, "test_open": 20, "test_yn": 20}
    for task in report["tasks"]:  # every prediction kept, the baseline beside chance
        lines = [json.loads(line) for line in open(task["predictions_file"])]
        assert len(lines) == task["n"] and np.mean([p["score"] for p in lines]) == pytest.approx(task["accuracy"])
        assert f"| {task['name']} | {task['majority_answer']} | {100 * task['majority']:.1f} |" in result.stdout
    yes_no = next(t for t in report["tasks"] if t["name"] == "test_yn")
    red = sum(scene_facts(i)[1] == "red" for i in range(30, 40))  # "a red shape?" is yes for these; "teal?" never
    assert (yes_no["majority_answer"], yes_no["majority"]) == ("no", pytest.approx(1 - red / 20))
    assert set(next(t for t in report["tasks"] if t["name"] == "test_open")["answer_types"]) == {"colour", "shape"}
