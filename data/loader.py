"""
Data loaders: fixed-shape batches from memory-mapped shards.

Every batch is (x, y, images): x and y are [B, T] int64 token ids and targets, images is
[N, H, W, 3] uint8 holding the images whose <|image|> placeholders appear in x, in order.
A target of -1 takes no loss (image positions, padding, a user's turn).

Pretraining rows come in two kinds, so shapes never change:
  - a text row: T + 1 consecutive tokens of the text stream (x = [:-1], y = [1:]);
  - an image-caption row: `T // S` samples, each S = tokens_per_image + caption_len + 1
    positions: the image's placeholders, the caption, <|endoftext|>, then padding.
The caption (and its <|endoftext|>) is the only thing trained on in an image-caption row.

Which rows a micro-batch gets is decided by one global sequence of micro-batch "slots":
slot s = (step * micro-batches per rank + micro_step) * world_size + rank. Every rank walks every slot
(cheap arithmetic) but reads only its own, so no two ranks read the same sample, and the
whole state is a few numbers that are identical on every rank: resuming restores them and the
data continues exactly. A credit counter (Bresenham's line algorithm) turns the image ratio
into whole rows per slot, so over any window the image-caption share of rows stays within
one row of the ratio.
"""

import math

import numpy as np
import torch

from data.errors import UserError
from data.shards import CONVERSATION, IMAGE_CAPTION, TEXT, ShardError, read_shard


def layout_sample(tokens, train_mask, tokens_per_image, image_id, length, pad_id):
    """One (image, text) sample laid out in `length` positions as (x, y) arrays.
    The sequence is [<|image|> x tokens_per_image] + tokens; y[j] is the token at j + 1 when
    train_mask marks it as trained, else -1. Text beyond `length` is cut off."""
    seq = np.full(length + 1, pad_id, dtype=np.int64)
    trained = np.zeros(length + 1, dtype=bool)
    seq[:tokens_per_image] = image_id
    n = min(len(tokens), length + 1 - tokens_per_image)
    seq[tokens_per_image:tokens_per_image + n] = tokens[:n]
    trained[tokens_per_image:tokens_per_image + n] = train_mask[:n]
    y = np.where(trained[1:], seq[1:], -1)
    return seq[:-1], y


def image_rows_for_slot(credit, image_ratio, batch_size):
    """The credit counter: (image-caption rows of the next slot, the credit left over). Each
    slot earns image_ratio * batch_size rows of credit and spends what it rounds to."""
    credit += image_ratio * batch_size
    n = min(batch_size, max(0, math.floor(credit + 0.5)))
    return n, credit - n


def to_device(arrays, device):
    """numpy -> torch on `device`; on CUDA through pinned memory, so the copy is asynchronous."""
    tensors = [torch.from_numpy(a) for a in arrays]
    if torch.device(device).type == "cuda":
        return [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return tensors


def _open_all(files, kind, vocab_size, what):
    if not files:
        raise UserError(f"no {what} shards given")
    return [read_shard(f, expected_kind=kind, vocab_size=vocab_size) for f in files]


class TextCaptionLoader:
    """Text rows and image-caption rows, mixed at the ratio the caller asks for each step.
    Without caption_files it gives text rows only (fine-tuning's text rows, evaluation).
    The tokenizer supplies the placeholder and end-of-text ids and the vocabulary size the
    shards are checked against."""

    def __init__(self, *, text_files, tokenizer, batch_size, seq_len, caption_files=(), tokens_per_image=0,
                 caption_len=0, rank=0, world_size=1, device="cpu"):
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size, self.device = rank, world_size, device
        image_id, eot_id, vocab_size = tokenizer.image_id, tokenizer.eot_id, tokenizer.vocab_size
        self.tokens_per_image, self.image_id, self.eot_id = tokens_per_image, image_id, eot_id
        self.sample_len = tokens_per_image + caption_len + 1
        self.samples_per_row = seq_len // self.sample_len

        self.text = _open_all(text_files, TEXT, vocab_size, "text")
        for shard in self.text:
            if np.any(shard.tokens == image_id):
                raise ShardError(shard.path, "text shard holds <|image|> placeholder tokens")
        rows = [(s.num_tokens - 1) // seq_len for s in self.text]
        if sum(rows) == 0:
            raise UserError(f"text shards hold fewer than seq_len + 1 = {seq_len + 1} tokens")
        self.text_row_starts = np.cumsum([0] + rows)  # global text row -> shard

        self.captions = _open_all(caption_files, IMAGE_CAPTION, vocab_size, "image-caption") if caption_files else []
        if self.captions:
            if self.samples_per_row == 0:
                raise UserError(f"seq_len {seq_len} cannot hold one image-caption sample of "
                                f"{self.sample_len} positions ({tokens_per_image} image tokens + "
                                f"caption_len {caption_len} + 1)")
            sizes = {s.image_size for s in self.captions}
            if len(sizes) != 1:
                raise UserError(f"image-caption shards disagree on the image size: {sorted(sizes)}")
            self.image_size = sizes.pop()
            self.caption_starts = np.cumsum([0] + [s.num_samples for s in self.captions])
        self.reset()

    def reset(self):
        # image_rows counts image-caption rows handed out over all ranks (for logging).
        self.state = {"slot": 0, "text_row": 0, "caption_sample": 0, "image_credit": 0.0, "image_rows": 0}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)

    def next_batch(self, image_ratio=0.0):
        """The next micro-batch of this rank: the first rows image-caption rows, the rest text."""
        if image_ratio > 0 and not self.captions:
            raise UserError("image_ratio > 0 but no image-caption shards were given")
        batch = None
        for r in range(self.world_size):
            n_image, self.state["image_credit"] = image_rows_for_slot(self.state["image_credit"], image_ratio, self.B)
            n_text = self.B - n_image
            if r == self.rank:
                batch = self._read(n_image, n_text)
            self.state["text_row"] += n_text
            self.state["caption_sample"] += n_image * self.samples_per_row
            self.state["image_rows"] += n_image
            self.state["slot"] += 1
        return to_device(batch, self.device)

    def _read(self, n_image, n_text):
        T, H = self.T, self.samples_per_row
        x = np.full((self.B, T), self.eot_id, dtype=np.int64)
        y = np.full((self.B, T), -1, dtype=np.int64)
        h, w = self.image_size if self.captions else (0, 0)
        images = np.empty((n_image * H, h, w, 3), dtype=np.uint8)
        for row in range(n_image):
            for k in range(H):
                i = row * H + k
                shard, local = self._caption_at(self.state["caption_sample"] + i)
                caption = np.append(shard.sample_tokens(local), self.eot_id)
                start = k * self.sample_len
                x[row, start:start + self.sample_len], y[row, start:start + self.sample_len] = layout_sample(
                    caption, np.ones(len(caption), bool), self.tokens_per_image, self.image_id,
                    self.sample_len, self.eot_id)
                images[i] = shard.images[local]
        for j in range(n_text):
            shard, local = self._text_row_at(self.state["text_row"] + j)
            row = shard.tokens[local * T: local * T + T + 1]
            x[n_image + j], y[n_image + j] = row[:-1], row[1:]
        return x, y, images

    def _text_row_at(self, row):
        row %= self.text_row_starts[-1]  # epochs over the text stream wrap around
        s = int(np.searchsorted(self.text_row_starts, row, side="right")) - 1
        return self.text[s], row - self.text_row_starts[s]

    def _caption_at(self, i):
        i %= self.caption_starts[-1]
        s = int(np.searchsorted(self.caption_starts, i, side="right")) - 1
        return self.captions[s], i - self.caption_starts[s]


class ConversationLoader:
    """Instruction-tuning rows: one conversation each, its image first, loss on the assistant.
    Each epoch visits every conversation once, in an order shuffled by (seed, epoch)."""

    def __init__(self, *, files, tokenizer, batch_size, seq_len, tokens_per_image, seed=0, shuffle=True, rank=0,
                 world_size=1, device="cpu"):
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size, self.device = rank, world_size, device
        # padding is <|endoftext|>; it is never trained on
        self.tokens_per_image, self.image_id, self.pad_id = tokens_per_image, tokenizer.image_id, tokenizer.eot_id
        vocab_size = tokenizer.vocab_size
        self.seed, self.shuffle = seed, shuffle
        self.shards = _open_all(files, CONVERSATION, vocab_size, "conversation")
        self.starts = np.cumsum([0] + [s.num_samples for s in self.shards])
        self.num_samples = int(self.starts[-1])
        sizes = {s.image_size for s in self.shards}
        if len(sizes) != 1:
            raise UserError(f"conversation shards disagree on the image size: {sorted(sizes)}")
        self.image_size = sizes.pop()
        self._check_something_is_trained(files)
        self._order_epoch, self._order = None, None
        self.reset()

    def _check_something_is_trained(self, files, samples=256):
        """Refuses, at start-up, conversations that would train on nothing (a loss of 0 and a NaN
        validation loss, silently): seq_len too short for the image tokens or for any answer, or
        shards without a trained token. Looks at the first `samples` conversations only."""
        if self.num_samples == 0:
            raise UserError(f"{', '.join(map(str, files))}: no conversations")
        if self.T <= self.tokens_per_image:
            raise UserError(f"seq_len {self.T} leaves no room for text after the {self.tokens_per_image} image tokens")
        window = self.T + 1 - self.tokens_per_image  # the tokens of a conversation that fit into a row
        first = [(s, i) for s in self.shards for i in range(min(s.num_samples, samples))][:samples]
        if not any(s.loss_mask[s.offsets[i]:s.offsets[i + 1]][:window].any() for s, i in first):
            raise UserError(f"{files[0]}: none of the first {len(first)} conversations has a trained (assistant) "
                            f"token within seq_len {self.T} after the {self.tokens_per_image} image tokens: "
                            "fine-tuning would train on nothing")

    def reset(self):
        self.state = {"slot": 0}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)

    def _sample_at(self, position):
        epoch, i = divmod(position, self.num_samples)
        if self.shuffle:
            if self._order_epoch != epoch:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                self._order_epoch = epoch
            i = int(self._order[i])
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shards[s], i - self.starts[s]

    def next_batch(self):
        slot = self.state["slot"] + self.rank
        self.state["slot"] += self.world_size
        x = np.empty((self.B, self.T), dtype=np.int64)
        y = np.empty((self.B, self.T), dtype=np.int64)
        images = np.empty((self.B, *self.image_size, 3), dtype=np.uint8)
        for b in range(self.B):
            shard, i = self._sample_at(slot * self.B + b)
            lo, hi = shard.offsets[i], shard.offsets[i + 1]
            x[b], y[b] = layout_sample(shard.tokens[lo:hi], shard.loss_mask[lo:hi], self.tokens_per_image,
                                       self.image_id, self.T, self.pad_id)
            images[b] = shard.images[i]
        return to_device((x, y, images), self.device)
