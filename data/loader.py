"""
Data loaders: fixed-shape batches from memory-mapped shards.

Every batch is (x, y, images): x and y are [B, T] int64 token ids and targets, images is
[N, H, W, 3] uint8 holding the images whose <|image|> placeholders appear in x, in order.
A target of -1 takes no loss (image positions, padding, a user's turn).

Pretraining rows come in three kinds, so shapes never change:
  - a text row: T + 1 consecutive tokens of the text stream (x = [:-1], y = [1:]);
  - an image-caption row: `T // S` samples, each S = tokens_per_image + caption_len + 1
    positions: the image's placeholders, the caption, <|endoftext|>, then padding;
  - a conversation row (instruct_ratio > 0): one conversation, built exactly as fine-tuning
    builds it (Conversations.row): its image's placeholders, the chat turns, padding.
Fine-tuning's ConversationLoader gives conversation rows only: one a row, or packed, as many as
fit, with their segment numbers so that the model keeps each one's attention inside it.
The caption (and its <|endoftext|>) is the only thing trained on in an image-caption row, the
assistant's answers the only thing in a conversation row.

Which rows a micro-batch gets is decided by one global sequence of micro-batch "slots":
slot s = (step * micro-batches per rank + micro_step) * world_size + rank. Every rank walks every slot
(cheap arithmetic) but reads only its own, so no two ranks read the same sample, and the
whole state is a few numbers that are identical on every rank: resuming restores them and the
data continues exactly. A credit counter (Bresenham's line algorithm) per kind turns the image
and conversation ratios into whole rows per slot, so over any window each kind's share of rows
stays within one row of its ratio (rows_for_slot says when conversations may stray further).
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


def rows_for_slot(credits, ratios, batch_size):
    """The credit counters, one per kind of row (image-caption, conversation): the rows of each
    kind in the next slot, and the credits left over. Each slot earns ratio * batch_size rows of
    credit per kind and spends what it rounds to, so each kind's rows so far stay within half
    a row of the credit its ratios earned (one row over any window). The kinds are served in
    order and never take more than batch_size rows together: a kind cut short (only when the
    ratios leave less than one text row a slot) keeps its credit for the next slot, and then
    strays up to a row and a half."""
    counts, left, room = [], [], batch_size
    for credit, ratio in zip(credits, ratios):
        credit += ratio * batch_size
        n = min(room, max(0, math.floor(credit + 0.5)))
        counts.append(n)
        left.append(credit - n)
        room -= n
    return counts, left


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


class MixedLoader:
    """Text rows, image-caption rows and conversation rows, mixed at the ratios the caller asks
    for each step. Without caption_files it gives text rows only (fine-tuning's text rows,
    evaluation); conversation rows need chat_files (their order shuffled by `seed`). The
    tokenizer supplies the placeholder and end-of-text ids and the vocabulary size the shards
    are checked against."""

    def __init__(self, *, text_files, tokenizer, batch_size, seq_len, caption_files=(), tokens_per_image=0,
                 caption_len=0, chat_files=(), seed=0, rank=0, world_size=1, device="cpu"):
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

        self.chats = Conversations(files=chat_files, tokenizer=tokenizer, seq_len=seq_len,
                                   tokens_per_image=tokens_per_image, seed=seed,
                                   used_for="pretraining's conversation rows") if chat_files else None
        if self.chats is not None:
            if self.captions and self.chats.image_size != self.image_size:
                raise UserError(f"conversation shards hold {self.chats.image_size} images, the image-caption "
                                f"shards {self.image_size}: a batch stacks both")
            self.image_size = self.chats.image_size
        # this rank's last micro-batch: (image-caption rows, conversation rows), the first rows in that order
        self.layout = (0, 0)
        self.reset()

    def reset(self):
        # image_rows counts image-caption rows handed out over all ranks (for logging); chat_sample,
        # the conversations handed out, counts conversation rows too (one a row).
        self.state = {"slot": 0, "text_row": 0, "caption_sample": 0, "image_credit": 0.0, "image_rows": 0,
                      "chat_sample": 0, "chat_credit": 0.0}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.reset()
        self.state.update(state)  # a checkpoint from before conversation rows has no chat_ entries: none yet

    def next_batch(self, image_ratio=0.0, instruct_ratio=0.0):
        """The next micro-batch of this rank: image-caption rows first, then conversation rows,
        the rest text (self.layout says how many of each)."""
        if image_ratio > 0 and not self.captions:
            raise UserError("image_ratio > 0 but no image-caption shards were given")
        if instruct_ratio > 0 and self.chats is None:
            raise UserError("instruct_ratio > 0 but no conversation shards were given")
        batch = None
        for r in range(self.world_size):
            (n_image, n_chat), (self.state["image_credit"], self.state["chat_credit"]) = rows_for_slot(
                (self.state["image_credit"], self.state["chat_credit"]), (image_ratio, instruct_ratio), self.B)
            n_text = self.B - n_image - n_chat
            if r == self.rank:
                batch = self._read(n_image, n_chat, n_text)
                self.layout = (n_image, n_chat)
            self.state["text_row"] += n_text
            self.state["caption_sample"] += n_image * self.samples_per_row
            self.state["chat_sample"] += n_chat
            self.state["image_rows"] += n_image
            self.state["slot"] += 1
        return to_device(batch, self.device)

    def _read(self, n_image, n_chat, n_text):
        T, H = self.T, self.samples_per_row
        x = np.full((self.B, T), self.eot_id, dtype=np.int64)
        y = np.full((self.B, T), -1, dtype=np.int64)
        h, w = self.image_size if self.captions or self.chats is not None else (0, 0)
        # caption images, then conversation images: the order of their placeholders in the batch
        images = np.empty((n_image * H + n_chat, h, w, 3), dtype=np.uint8)
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
        for j in range(n_chat):
            row = n_image + j
            x[row], y[row], images[n_image * H + j] = self.chats.row(self.state["chat_sample"] + j)
        for j in range(n_text):
            shard, local = self._text_row_at(self.state["text_row"] + j)
            row = shard.tokens[local * T: local * T + T + 1]
            x[n_image + n_chat + j], y[n_image + n_chat + j] = row[:-1], row[1:]
        return x, y, images

    def _text_row_at(self, row):
        row %= self.text_row_starts[-1]  # epochs over the text stream wrap around
        s = int(np.searchsorted(self.text_row_starts, row, side="right")) - 1
        return self.text[s], row - self.text_row_starts[s]

    def _caption_at(self, i):
        i %= self.caption_starts[-1]
        s = int(np.searchsorted(self.caption_starts, i, side="right")) - 1
        return self.captions[s], i - self.caption_starts[s]


class Conversations:
    """Conversation shards read as rows of seq_len positions, each conversation its image's
    placeholders first, then the chat turns, trained on the assistant's answers only (the shards'
    loss mask, from Tokenizer.encode_conversation). Fine-tuning's rows and pretraining's
    conversation rows both come from row(), so the two are built alike. Position p is the p-th
    conversation of an endless walk: each epoch visits every conversation once, in an order
    shuffled by (seed, epoch) unless shuffle is False. `used_for` names the training in errors.
    A row holds one conversation, or with packing (fits_from, packed_row) as many consecutive
    ones of the walk as fit."""

    def __init__(self, *, files, tokenizer, seq_len, tokens_per_image, seed=0, shuffle=True, used_for="fine-tuning"):
        self.T = seq_len
        # padding is <|endoftext|>; it is never trained on
        self.tokens_per_image, self.image_id, self.pad_id = tokens_per_image, tokenizer.image_id, tokenizer.eot_id
        self.seed, self.shuffle = seed, shuffle
        self.shards = _open_all(files, CONVERSATION, tokenizer.vocab_size, "conversation")
        self.starts = np.cumsum([0] + [s.num_samples for s in self.shards])
        self.num_samples = int(self.starts[-1])
        sizes = {s.image_size for s in self.shards}
        if len(sizes) != 1:
            raise UserError(f"conversation shards disagree on the image size: {sorted(sizes)}")
        self.image_size = sizes.pop()
        self._check_something_is_trained(files, used_for)
        # Positions each conversation takes in a row: its image's placeholders and its tokens but
        # the last (which is only ever a target), at most a row (longer ones are cut).
        tokens = np.concatenate([np.diff(s.offsets) for s in self.shards])
        self.lengths = np.minimum(tokens_per_image + tokens - 1, seq_len)
        self._order_epoch, self._order = None, None

    def _check_something_is_trained(self, files, used_for, samples=256):
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
                            f"{used_for} would train on nothing")

    def _index_at(self, position):
        """The conversation (global index over the shards) at `position` of the walk."""
        epoch, i = divmod(position, self.num_samples)
        if self.shuffle:
            if self._order_epoch != epoch:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                self._order_epoch = epoch
            i = int(self._order[i])
        return i

    def _sample_at(self, position):
        i = self._index_at(position)
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shards[s], i - self.starts[s]

    def _layout(self, position, length):
        """(x, y, image) of the conversation at `position` laid out in `length` positions."""
        shard, i = self._sample_at(position)
        lo, hi = shard.offsets[i], shard.offsets[i + 1]
        x, y = layout_sample(shard.tokens[lo:hi], shard.loss_mask[lo:hi], self.tokens_per_image, self.image_id,
                             length, self.pad_id)
        return x, y, shard.images[i]

    def row(self, position):
        """(x, y, image) of the conversation at `position`: x and y of seq_len positions."""
        return self._layout(position, self.T)

    def fits_from(self, position):
        """How many conversations of the walk, from `position` on, fit into one row together
        (at least one: a conversation longer than a row is cut, and has the row to itself)."""
        n, used = 0, 0
        while True:
            length = self.lengths[self._index_at(position + n)]
            if n > 0 and used + length > self.T:
                return n
            used, n = used + length, n + 1

    def packed_row(self, position, n):
        """(x, y, images [n, H, W, 3], segments) of the n conversations from `position` on, one
        after another in one row. segments numbers them 0 .. n - 1 (the padding after them n),
        so that the model keeps each one's attention inside it (VLM.hidden_states)."""
        x = np.full(self.T, self.pad_id, dtype=np.int64)
        y = np.full(self.T, -1, dtype=np.int64)
        segments = np.full(self.T, n, dtype=np.int64)
        images, start = [], 0
        for k in range(n):
            length = int(self.lengths[self._index_at(position + k)])
            x[start:start + length], y[start:start + length], image = self._layout(position + k, length)
            segments[start:start + length] = k
            images.append(image)
            start += length
        return x, y, np.stack(images), segments


class ConversationLoader:
    """Instruction-tuning rows (Conversations): batch_size rows a micro-batch, each one
    conversation, or with `pack` as many as fit (then a batch is (x, y, images, segments), its
    images in reading order). The state is the slot and the walk's position, the same on every
    rank: every rank walks every row of a slot (only the conversations' lengths) and reads its own."""

    def __init__(self, *, files, tokenizer, batch_size, seq_len, tokens_per_image, seed=0, shuffle=True, rank=0,
                 world_size=1, device="cpu", pack=False):
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size, self.device, self.pack = rank, world_size, device, pack
        self.conversations = Conversations(files=files, tokenizer=tokenizer, seq_len=seq_len,
                                           tokens_per_image=tokens_per_image, seed=seed, shuffle=shuffle)
        self.num_samples, self.image_size = self.conversations.num_samples, self.conversations.image_size
        self.reset()

    def reset(self):
        self.state = {"slot": 0, "position": 0}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        # a checkpoint from before packing has no position: one conversation a row
        self.state = {"position": state["slot"] * self.B, **state}

    def rows_to_cover(self, conversations):
        """Rows the walk takes, from its start, to pass `conversations` conversations: what
        `epochs` passes cost (schedule.finetune_steps)."""
        if not self.pack:
            return conversations
        rows, position = 0, 0
        while position < conversations:
            position += self.conversations.fits_from(position)
            rows += 1
        return rows

    def next_batch(self):
        rows = []
        for r in range(self.world_size):
            for _ in range(self.B):
                n = self.conversations.fits_from(self.state["position"]) if self.pack else 1
                if r == self.rank:
                    rows.append((self.state["position"], n))
                self.state["position"] += n
        self.state["slot"] += self.world_size
        if not self.pack:
            x, y, images = zip(*(self.conversations.row(position) for position, _ in rows))
            return to_device((np.stack(x), np.stack(y), np.stack(images)), self.device)
        x, y, images, segments = zip(*(self.conversations.packed_row(position, n) for position, n in rows))
        return to_device((np.stack(x), np.stack(y), np.concatenate(images), np.stack(segments)), self.device)
