"""
Binary shard files: the on-disk format of all training data.

Every shard starts with a 256-byte header of 32 little-endian int64 values:
    [0] magic   (the 8 bytes b"VLMSHARD" read as an int64)
    [1] format version (1)
    [2] kind: 1 = text, 2 = image-caption, 3 = conversation
    [3] bytes per token: 2 (uint16) or 4 (uint32; cl100k ids exceed 65535)
    [4] vocabulary size: every token id is below it
    [5] number of tokens
    [6] number of samples (0 for text shards)
    [7] image height, [8] image width (0 for text shards); images are uint8 RGB, H x W x 3
and after it, each section starting on a 64-byte boundary:
    text:           tokens[num_tokens]           documents joined, each ended by <|endoftext|>
    image-caption:  images[num_samples, H, W, 3], offsets[num_samples + 1] (int64), tokens
    conversation:   the same three sections, then loss_mask[num_tokens] (uint8, 1 = train on it)
Sample i's tokens are tokens[offsets[i]:offsets[i+1]]. Readers memory-map the file, so opening
a shard costs nothing until its data is touched, and check everything the header promises.
Writers write a temporary file and rename it, so a half-written shard is never visible.

    python -m data.shards inspect FILE...   prints each shard's header; exits 1 on a bad file
"""

import glob
import hashlib
import os
import sys
from dataclasses import dataclass

import numpy as np

from data.atomic import atomic_write
from data.errors import MissingFileError, UserError, report_user_errors

MAGIC = int.from_bytes(b"VLMSHARD", "little")
VERSION = 1
HEADER_INTS = 32
HEADER_BYTES = HEADER_INTS * 8
ALIGN = 64
TEXT, IMAGE_CAPTION, CONVERSATION = 1, 2, 3
KIND_NAMES = {TEXT: "text", IMAGE_CAPTION: "image-caption", CONVERSATION: "conversation"}
TOKEN_DTYPES = {2: np.uint16, 4: np.uint32}


class ShardError(UserError):
    """A shard file that is not what its header says it is."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")


def token_dtype_for(vocab_size):
    """The narrowest token dtype that holds every id below vocab_size."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _aligned(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _layout(kind, token_bytes, num_tokens, num_samples, height, width):
    """Byte offset of each section and the total file size, from the header's numbers."""
    pos = HEADER_BYTES
    sections = {}
    if kind != TEXT:
        sections["images"] = pos
        pos = _aligned(pos + num_samples * height * width * 3)
        sections["offsets"] = pos
        pos = _aligned(pos + (num_samples + 1) * 8)
    sections["tokens"] = pos
    pos += num_tokens * token_bytes
    if kind == CONVERSATION:
        pos = _aligned(pos)
        sections["loss_mask"] = pos
        pos += num_tokens
    return sections, pos


@dataclass
class Shard:
    path: str
    kind: int
    vocab_size: int
    num_tokens: int
    num_samples: int
    image_size: tuple  # (height, width); (0, 0) for text
    tokens: np.ndarray  # memory-mapped
    images: np.ndarray = None  # [num_samples, H, W, 3] uint8, memory-mapped
    offsets: np.ndarray = None  # [num_samples + 1] int64
    loss_mask: np.ndarray = None  # [num_tokens] uint8

    def sample_tokens(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def describe(self):
        line = (f"{self.path}: {KIND_NAMES[self.kind]} shard v{VERSION}, "
                f"{self.tokens.dtype.name} tokens, vocab {self.vocab_size}, {self.num_tokens:,} tokens")
        if self.kind != TEXT:
            h, w = self.image_size
            line += f", {self.num_samples:,} samples with {h}x{w} RGB images"
        if self.kind == CONVERSATION:
            line += f", {int(self.loss_mask.sum()):,} trained tokens"
        return line


def _write(path, kind, vocab_size, tokens, images=None, offsets=None, loss_mask=None):
    dtype = token_dtype_for(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{path}: token ids must lie in [0, {vocab_size}), "
                         f"got [{tokens.min()}, {tokens.max()}]")
    num_samples = 0 if images is None else len(images)
    height, width = (0, 0) if images is None else images.shape[1:3]
    if images is not None and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3):
        raise ValueError(f"{path}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    sections, size = _layout(kind, np.dtype(dtype).itemsize, len(tokens), num_samples, height, width)
    header = np.zeros(HEADER_INTS, dtype="<i8")
    header[:9] = [MAGIC, VERSION, kind, np.dtype(dtype).itemsize, vocab_size, len(tokens),
                  num_samples, height, width]
    with atomic_write(path, "wb") as f:  # readers see the old file or the whole new one
        f.write(header.tobytes())
        parts = {"tokens": tokens.astype(dtype)}
        if images is not None:
            parts["images"] = np.ascontiguousarray(images)
            parts["offsets"] = np.asarray(offsets, dtype="<i8")
        if loss_mask is not None:
            parts["loss_mask"] = np.asarray(loss_mask, dtype=np.uint8)
        for name, start in sorted(sections.items(), key=lambda kv: kv[1]):
            f.seek(start)
            f.write(parts[name].tobytes())
        f.truncate(size)


def write_text_shard(path, tokens, vocab_size):
    """tokens: 1-D ints, documents already joined with <|endoftext|>."""
    _write(path, TEXT, vocab_size, tokens)


def _join(samples):
    lengths = [len(s) for s in samples]
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in samples]) if samples else np.zeros(0, np.int64)
    return flat, offsets


def write_image_caption_shard(path, images, captions, vocab_size):
    """images: uint8 [N, H, W, 3]; captions: N token lists (no image placeholders)."""
    if len(images) != len(captions):
        raise ValueError(f"{path}: {len(images)} images but {len(captions)} captions")
    tokens, offsets = _join(captions)
    _write(path, IMAGE_CAPTION, vocab_size, tokens, images, offsets)


def write_conversation_shard(path, images, conversations, loss_masks, vocab_size):
    """One image per conversation; conversations: N token lists; loss_masks: N 0/1 lists."""
    if not (len(images) == len(conversations) == len(loss_masks)):
        raise ValueError(f"{path}: {len(images)} images, {len(conversations)} conversations, "
                         f"{len(loss_masks)} loss masks")
    if any(len(c) != len(m) for c, m in zip(conversations, loss_masks)):
        raise ValueError(f"{path}: a loss mask differs in length from its conversation")
    tokens, offsets = _join(conversations)
    mask, _ = _join(loss_masks)
    _write(path, CONVERSATION, vocab_size, tokens, images, offsets, mask)


def find_shards(data_dir, pattern, hint="for the toy world, run: python data/toyworld/prepare.py"):
    """The shard files matching `pattern` inside data_dir, sorted (so every rank agrees). `hint`
    ends the error when there are none: what the user may do about it."""
    files = sorted(glob.glob(os.path.join(data_dir, pattern)))
    if not files:
        raise MissingFileError(f"no shards match {os.path.join(data_dir, pattern)} ({hint})")
    return files


def fingerprint(paths, sample_bytes=1 << 16):
    """What identifies a set of shards without reading them whole: each file's name (not its
    folder: the same data written as another path is the same data), size, and a sha256 of its
    first and last 64 KiB (the header with its counts, and data from both ends). Checkpoints
    record it, and a resume refuses shards whose fingerprint differs (regenerated data)."""
    result = []
    for path in paths:
        size = os.path.getsize(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(sample_bytes))
            f.seek(max(sample_bytes, size - sample_bytes))
            digest.update(f.read())
        result.append([os.path.basename(path), size, digest.hexdigest()])
    return result


def read_shard(path, expected_kind=None, vocab_size=None):
    """Memory-maps a shard and checks it; raises ShardError naming the file and the problem."""
    path = str(path)
    try:
        file_size = os.path.getsize(path)
    except OSError as e:
        raise ShardError(path, f"cannot open ({e.strerror})") from None
    if not os.path.isfile(path):
        raise ShardError(path, "is a directory, not a shard file" if os.path.isdir(path) else "is not a regular file")
    if file_size < HEADER_BYTES:
        raise ShardError(path, f"truncated: {file_size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i8", count=HEADER_INTS)
    magic, version, kind, token_bytes, vocab, num_tokens, num_samples, height, width = (int(v) for v in header[:9])
    if magic != MAGIC:
        raise ShardError(path, "not a shard file (wrong magic number)")
    if version != VERSION:
        raise ShardError(path, f"unknown format version {version} (this code reads version {VERSION})")
    if kind not in KIND_NAMES:
        raise ShardError(path, f"unknown shard kind {kind}")
    if expected_kind is not None and kind != expected_kind:
        raise ShardError(path, f"is a {KIND_NAMES[kind]} shard, expected a {KIND_NAMES[expected_kind]} shard")
    if token_bytes not in TOKEN_DTYPES:
        raise ShardError(path, f"unsupported token width of {token_bytes} bytes (expected 2 or 4)")
    if vocab <= 0 or vocab > 2 ** (8 * token_bytes):
        raise ShardError(path, f"vocabulary size {vocab} does not fit {8 * token_bytes}-bit tokens")
    if vocab_size is not None and vocab != vocab_size:
        raise ShardError(path, f"vocabulary size {vocab} differs from the expected {vocab_size}")
    if min(num_tokens, num_samples, height, width) < 0 or (kind != TEXT and min(height, width) == 0):
        raise ShardError(path, "header has negative or missing counts")
    if (num_samples if kind != TEXT else num_tokens) == 0:  # caught here, not at the first read, hours in
        raise ShardError(path, f"empty: the {KIND_NAMES[kind]} shard holds no {'tokens' if kind == TEXT else 'samples'}")
    sections, expected_size = _layout(kind, token_bytes, num_tokens, num_samples, height, width)
    if file_size < expected_size:
        raise ShardError(path, f"truncated: {file_size:,} bytes, the header promises {expected_size:,}")
    if file_size > expected_size:
        raise ShardError(path, f"{file_size - expected_size:,} unexpected bytes after the data")

    def section(name, dtype, shape):
        return np.memmap(path, dtype=dtype, mode="r", offset=sections[name], shape=shape)

    tokens = section("tokens", TOKEN_DTYPES[token_bytes], (num_tokens,))
    if num_tokens and int(tokens.max()) >= vocab:
        bad = int(np.argmax(tokens >= vocab))
        raise ShardError(path, f"token id {int(tokens[bad])} at position {bad} is outside the vocabulary of {vocab}")
    shard = Shard(path, kind, vocab, num_tokens, num_samples, (height, width), tokens)
    if kind != TEXT:
        shard.images = section("images", np.uint8, (num_samples, height, width, 3))
        shard.offsets = np.array(section("offsets", "<i8", (num_samples + 1,)))
        if shard.offsets[0] != 0 or shard.offsets[-1] != num_tokens or np.any(np.diff(shard.offsets) < 0):
            raise ShardError(path, "sample offsets are not increasing from 0 to the number of tokens")
    if kind == CONVERSATION:
        shard.loss_mask = section("loss_mask", np.uint8, (num_tokens,))
        if num_tokens and int(shard.loss_mask.max()) > 1:
            raise ShardError(path, "loss mask holds values other than 0 and 1")
    return shard


def main(argv):
    if len(argv) < 2 or argv[0] != "inspect":
        print("usage: python -m data.shards inspect FILE...", file=sys.stderr)
        return 2
    status = 0
    for path in argv[1:]:
        try:
            print(read_shard(path).describe())
        except ShardError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    sys.exit(main(sys.argv[1:]))
