"""A tiny synthetic dataset in the real shard formats, for fast tests of the training scripts."""

import json
import os

import numpy as np

from data import shards
from data.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a red green blue circle square triangle is on left right top bottom one two three four five plus".split()


def make_tiny_dataset(out_dir, seed=0):
    """Random word salad: text shards, 32x32 image-caption shards and meta.json."""
    vocab = Tokenizer.cl100k_ids_of(WORDS + [" " + w for w in WORDS])
    tok = Tokenizer(vocab)
    rng = np.random.default_rng(seed)

    def document():
        return " ".join(rng.choice(WORDS, rng.integers(5, 30)))

    for split, n in (("train", 600), ("val", 100)):
        tokens = []
        for _ in range(n):
            tokens += tok.encode(document()) + [tok.eot_id]
        shards.write_text_shard(os.path.join(out_dir, f"{split}_text.bin"), tokens, tok.vocab_size)
        images = rng.integers(0, 256, (n // 2, 32, 32, 3), dtype=np.uint8)
        captions = [tok.encode(document())[:20] for _ in range(n // 2)]
        shards.write_image_caption_shard(os.path.join(out_dir, f"{split}_caption.bin"), images, captions,
                                         tok.vocab_size)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"compact_vocab": vocab, "vocab_size": len(vocab)}, f)
    return out_dir


def write_tiny_chat_shards(out_dir, seed=1):
    """Conversation shards beside make_tiny_dataset's (train_chat.bin, val_chat.bin): a user's
    four words and the assistant's three about a random 32x32 picture."""
    tok = Tokenizer(Tokenizer.cl100k_ids_of(WORDS + [" " + w for w in WORDS]))
    rng = np.random.default_rng(seed)
    for split, n in (("train", 40), ("val", 8)):
        turns = [tok.encode_conversation([("user", " ".join(rng.choice(WORDS, 4))),
                                          ("assistant", " ".join(rng.choice(WORDS, 3)))]) for _ in range(n)]
        shards.write_conversation_shard(os.path.join(out_dir, f"{split}_chat.bin"),
                                        rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                        [t for t, _ in turns], [m for _, m in turns], tok.vocab_size)
    return out_dir
