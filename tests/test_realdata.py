"""The Hub preparers (data/dclm, data/fineweb_edu, data/cc3m, data/cauldron) on small fixture files
in each source's exact layout, with the download skipped (--local_dir), then a few training steps
on what they wrote."""

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.cauldron import prepare as cauldron
from data.cc3m import prepare as cc3m
from data.dclm import prepare as dclm
from data.images import load_image
from data.shards import CONVERSATION, IMAGE_CAPTION, TEXT, main as inspect_main, read_shard
from data.tokenizer import Tokenizer
from tests.test_pipeline import MODEL, run

# The Hub's image column type (what `datasets` writes for an Image feature).
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TURN = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])


def jpeg(seed, size=(40, 24)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_text_parquet(path, docs, column="text"):
    """DCLM-Baseline / FineWeb-Edu rows: the document in `text`, plus metadata columns."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({column: pa.array(docs, pa.string()), "url": [f"https://x/{i}" for i in range(len(docs))],
                             "token_count": pa.array(range(len(docs)), pa.int64())}), path)


def write_tar(path, samples):
    """A webdataset tar: members {key}.jpg and {key}.txt; samples: (key, jpeg bytes or None, caption or None)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, picture, caption in samples:
            for ext, data in (("jpg", picture), ("txt", None if caption is None else caption.encode())):
                if data is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def write_cauldron_parquet(path, rows):
    """the_cauldron rows: images list<struct<bytes, path>>, texts list<struct<user, assistant, source>>."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    schema = pa.schema([("images", pa.list_(IMAGE)), ("texts", pa.list_(TURN))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def shard_names(folder):
    """The shards a preparer wrote (beside them, sources.json records what made each)."""
    return sorted(n for n in os.listdir(folder) if n.endswith(".bin"))


def docs_of(file_index):
    return [f"document {d} of file {file_index}: the cat sat on the mat." for d in range(20)]


@pytest.fixture
def text_repo(tmp_path):
    """A DCLM-like repository: 4 parquet files in nested folders, each with one empty and one null row."""
    repo = tmp_path / "dclm_repo"
    for i in range(4):
        write_text_parquet(str(repo / "global-shard_01_of_10" / f"shard_{i:08d}_processed.parquet"),
                           docs_of(i)[:10] + ["", None] + docs_of(i)[10:])
    return repo


def test_text_prepare_writes_documents_joined_by_endoftext_and_resumes(text_repo, tmp_path, capsys):
    out = tmp_path / "out"
    dclm.main([f"--local_dir={text_repo}", f"--out_dir={out}", "--num_proc=2"])
    tok = Tokenizer()
    names = shard_names(out)
    assert names == ["train_text_00000.bin", "train_text_00001.bin", "train_text_00002.bin", "val_text_00000.bin"]
    for name, file_index in (("train_text_00001.bin", 1), ("val_text_00000.bin", 3)):  # the last file is validation
        shard = read_shard(out / name, expected_kind=TEXT, vocab_size=tok.vocab_size)
        expected = [i for doc in docs_of(file_index) for i in tok.encode(doc) + [tok.eot_id]]
        assert shard.tokens.tolist() == expected
    printed = capsys.readouterr().out
    assert "skipped 6 rows: missing or empty text" in printed and "skipped 2 rows: missing or empty text" in printed
    assert inspect_main(["inspect", *(str(out / n) for n in names)]) == 0

    stamps = {n: os.stat(out / n).st_mtime_ns for n in names}
    dclm.main([f"--local_dir={text_repo}", f"--out_dir={out}", "--num_proc=2"])
    assert {n: os.stat(out / n).st_mtime_ns for n in names} == stamps  # nothing redone
    assert "(3 shards already there)" in capsys.readouterr().err


def test_text_prepare_budget_takes_whole_files_in_order(text_repo, tmp_path):
    out = tmp_path / "out"
    one_file = len([i for doc in docs_of(0) for i in Tokenizer().encode(doc)]) + 20
    dclm.main([f"--local_dir={text_repo}", f"--out_dir={out}", f"--max_tokens={one_file + 1}", "--num_proc=2"])
    assert shard_names(out) == ["train_text_00000.bin", "train_text_00001.bin", "val_text_00000.bin"]


def test_text_prepare_names_a_missing_column_and_the_file(tmp_path):
    for i in range(2):
        write_text_parquet(str(tmp_path / "repo" / f"{i}.parquet"), ["a doc"], column="content")
    with pytest.raises(ValueError, match=r"1\.parquet: no column 'text' \(its columns: content, url"):
        dclm.main([f"--local_dir={tmp_path / 'repo'}", f"--out_dir={tmp_path / 'out'}", "--num_proc=1"])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        dclm.main([f"--local_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'out'}"])


def test_a_second_run_with_other_inputs_redoes_its_shards_and_removes_stale_ones(text_repo, tmp_path, capsys):
    out = tmp_path / "out"
    dclm.main([f"--local_dir={text_repo}", f"--out_dir={out}", "--num_proc=2"])
    other = tmp_path / "other_repo"  # two files of other documents: one to train on, one to validate
    for i in range(2):
        write_text_parquet(str(other / f"{i}.parquet"), docs_of(10 + i))
    capsys.readouterr()
    dclm.main([f"--local_dir={other}", f"--out_dir={out}", "--num_proc=2"])
    assert "(0 shards already there)" in capsys.readouterr().err
    assert shard_names(out) == ["train_text_00000.bin", "val_text_00000.bin"]  # 00001 and 00002 are gone
    tok = Tokenizer()
    for name, file_index in (("train_text_00000.bin", 10), ("val_text_00000.bin", 11)):
        expected = [i for doc in docs_of(file_index) for i in tok.encode(doc) + [tok.eot_id]]
        assert read_shard(out / name).tokens.tolist() == expected
    # the same inputs again: nothing is redone
    dclm.main([f"--local_dir={other}", f"--out_dir={out}", "--num_proc=2"])
    assert "(1 shards already there)" in capsys.readouterr().err


def caption_samples(tar_index):
    return [(f"{tar_index:04d}{k:05d}", jpeg(100 * tar_index + k), f"a photo number {k} of tar {tar_index}")
            for k in range(4)]


@pytest.fixture
def wds_repo(tmp_path):
    """A CC3M-like repository: 2 training tars and 1 validation tar; tar 1 holds broken samples."""
    repo = tmp_path / "cc3m_repo"
    write_tar(str(repo / "cc3m-train-0000.tar"), caption_samples(0))
    write_tar(str(repo / "cc3m-train-0001.tar"), caption_samples(1) + [
        ("broken", b"not a jpeg at all", "an unreadable picture"),
        ("nocaption", jpeg(7), None),
        ("emptycaption", jpeg(8), "  ")])
    write_tar(str(repo / "cc3m-validation-0000.tar"), caption_samples(9))
    return repo


def test_caption_prepare_writes_resized_pictures_and_counts_broken_samples(wds_repo, tmp_path, capsys):
    out = tmp_path / "out"
    cc3m.main([f"--local_dir={wds_repo}", f"--out_dir={out}", "--image_size=16", "--num_proc=2"])
    tok = Tokenizer()
    for name, tar_index in (("train_caption_00001.bin", 1), ("val_caption_00000.bin", 9)):
        shard = read_shard(out / name, expected_kind=IMAGE_CAPTION, vocab_size=tok.vocab_size)
        samples = caption_samples(tar_index)
        assert shard.num_samples == len(samples) and shard.image_size == (16, 16)
        for i, (_, picture, caption) in enumerate(samples):
            assert np.array_equal(shard.images[i], load_image(picture, 16))
            assert tok.decode(shard.sample_tokens(i)) == caption
    printed = capsys.readouterr().out
    for reason in ("undecodable image", "empty caption", "a {key}.jpg or {key}.txt member missing"):
        assert f"skipped 1 rows: {reason}" in printed
    names = shard_names(out)
    assert inspect_main(["inspect", *(str(out / n) for n in names)]) == 0
    stamps = {n: os.stat(out / n).st_mtime_ns for n in names}
    cc3m.main([f"--local_dir={wds_repo}", f"--out_dir={out}", "--image_size=16"])
    assert {n: os.stat(out / n).st_mtime_ns for n in names} == stamps


def test_caption_prepare_names_a_missing_member_and_the_tar(tmp_path):
    write_tar(str(tmp_path / "repo" / "cc3m-train-0000.tar"), [("a", jpeg(1), None), ("b", jpeg(2), None)])
    write_tar(str(tmp_path / "repo" / "cc3m-validation-0000.tar"), [("a", jpeg(1), "fine")])
    with pytest.raises(ValueError, match=r"cc3m-train-0000\.tar: no \{key\}\.txt members"):
        cc3m.main([f"--local_dir={tmp_path / 'repo'}", f"--out_dir={tmp_path / 'out'}", "--image_size=16"])


def cauldron_rows(subset, file_index):
    rows = [{"images": [{"bytes": jpeg(1000 * file_index + r), "path": None}],
             "texts": [{"user": f"{subset} question {r}?", "assistant": f"answer {r}.", "source": subset},
                       {"user": "and then?", "assistant": "the end.", "source": subset}]} for r in range(6)]
    rows[2]["images"] = rows[2]["images"] * 2  # several pictures
    rows[3]["images"] = []  # text only
    rows[4]["images"] = [{"bytes": b"broken", "path": None}]
    return rows


def test_conversation_prepare_maps_turns_to_the_chat_template(tmp_path, capsys):
    repo, out = tmp_path / "cauldron_repo", tmp_path / "out"
    for subset in ("vqav2", "aokvqa"):
        write_cauldron_parquet(str(repo / subset / "train-00000-of-00001-abc.parquet"), cauldron_rows(subset, 0))
    cauldron.main([f"--local_dir={repo}", f"--out_dir={out}", "--subsets=vqav2,aokvqa", "--image_size=16",
                   "--val_every=4", "--num_proc=2"])
    tok = Tokenizer()
    rows = cauldron_rows("aokvqa", 0)
    train = read_shard(out / "train_chat_aokvqa_00000.bin", expected_kind=CONVERSATION, vocab_size=tok.vocab_size)
    val = read_shard(out / "val_chat_aokvqa_00000.bin", expected_kind=CONVERSATION)
    assert (train.num_samples, val.num_samples) == (2, 1)  # rows 1, 5 train; rows 0, 4 validation; 2, 3, 4 skipped
    for shard, i, r in ((train, 0, 1), (train, 1, 5), (val, 0, 0)):
        turns = [(role, t[role].strip()) for t in rows[r]["texts"] for role in ("user", "assistant")]
        ids, mask = tok.encode_conversation(turns)
        lo, hi = shard.offsets[i], shard.offsets[i + 1]
        assert shard.tokens[lo:hi].tolist() == ids and shard.loss_mask[lo:hi].tolist() == mask
        assert np.array_equal(shard.images[i], load_image(rows[r]["images"][0]["bytes"], 16))
    printed = capsys.readouterr().out
    for reason in ("several pictures", "no picture", "undecodable picture"):
        assert f"skipped 2 rows: {reason}" in printed
    names = shard_names(out)
    assert len(names) == 4 and inspect_main(["inspect", *(str(out / n) for n in names)]) == 0


def test_conversation_prepare_names_a_missing_column_and_the_file(tmp_path):
    path = tmp_path / "repo" / "vqav2" / "train-0.parquet"
    os.makedirs(path.parent)
    pq.write_table(pa.table({"images": pa.array([[]], pa.list_(IMAGE)), "text": ["q"]}), path)
    with pytest.raises(ValueError, match=r"train-0\.parquet: no column 'texts'"):
        cauldron.main([f"--local_dir={tmp_path / 'repo'}", f"--out_dir={tmp_path / 'out'}", "--subsets=vqav2"])


def test_prepared_hub_data_pretrains_and_finetunes(tmp_path, wds_repo):
    """The scripts as a user runs them, then pretrain.py reading text and captions from two folders
    (as config/1b.py does) and finetune.py on the conversations."""
    text_repo, chat_repo = tmp_path / "fineweb_repo", tmp_path / "cauldron_repo"
    for i in range(2):
        write_text_parquet(str(text_repo / "sample" / "10BT" / f"{i:03d}_00000.parquet"), docs_of(i) * 4)
        write_cauldron_parquet(str(chat_repo / "vqav2" / f"train-{i:05d}-of-00002.parquet"), cauldron_rows("vqav2", i))
    text, captions, chats = tmp_path / "fineweb_edu", tmp_path / "cc3m", tmp_path / "cauldron"
    run("data/fineweb_edu/prepare.py", f"--local_dir={text_repo}", f"--out_dir={text}")
    run("data/cc3m/prepare.py", f"--local_dir={wds_repo}", f"--out_dir={captions}", "--image_size=16")
    run("data/cauldron/prepare.py", f"--local_dir={chat_repo}", f"--out_dir={chats}", "--subsets=vqav2",
        "--image_size=16", "--val_every=3")
    out = tmp_path / "pretrain"
    run("pretrain.py", "config/toy.py", *MODEL, f"--data_dir={text}", f"--out_dir={out}",
        "--train_captions=../cc3m/train_caption*.bin", "--val_captions=../cc3m/val_caption*.bin",
        "--image_size=16", "--patch_size=8", "--caption_len=12", "--seq_len=32", "--batch_size=4",
        "--max_iters=4", "--image_iters=3", "--warmup_iters=1", "--image_ratio=0.5", "--eval_batches=1",
        "--eval_interval=2")
    sft = tmp_path / "sft"
    run("finetune.py", "config/toy_sft.py", f"--data_dir={chats}", f"--init_from={out / 'ckpt.pt'}",
        f"--out_dir={sft}", "--text_rows=0", "--batch_size=2", "--seq_len=32", "--epochs=1", "--eval_interval=1", "--eval_batches=1")
    assert (sft / "ckpt.pt").exists()


def test_downloads_only_matching_files_at_the_pinned_revision_and_deletes_them(wds_repo, tmp_path, monkeypatch):
    """The Hub path with huggingface_hub replaced by a fake that serves the fixture repository."""
    import shutil

    import huggingface_hub
    calls = tmp_path / "calls.txt"

    def list_repo_files(repo_id, repo_type, revision):
        return sorted(os.listdir(wds_repo)) + ["README.md", "_info.json"]

    def hf_hub_download(repo_id, filename, repo_type, revision, local_dir):
        with open(calls, "a") as f:  # runs in the worker processes: the file is how we hear of it
            f.write(f"{repo_id} {repo_type} {revision} {filename}\n")
        os.makedirs(local_dir, exist_ok=True)
        return shutil.copy(wds_repo / filename, os.path.join(local_dir, filename))

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    out = tmp_path / "out"
    cc3m.main([f"--out_dir={out}", "--image_size=16", "--num_proc=2"])
    repo_id, revision = cc3m.DATASETS["cc3m"][:2]
    assert sorted(calls.read_text().splitlines()) == [
        f"{repo_id} dataset {revision} {name}" for name in sorted(os.listdir(wds_repo))]
    assert os.listdir(out / "downloads") == []
    assert read_shard(out / "train_caption_00001.bin").num_samples == 4
