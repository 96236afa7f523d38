"""
Running a checkpoint: loading its model, and the batched queries that evaluate.py and the
harness adapters (harness/) score with: log-likelihoods of continuations and greedy answers.
sample.py and serve.py load checkpoints here too, so there is one rule for what a checkpoint
holds (its model, its tokenizer, whether it was fine-tuned, whether it ever saw an image).
"""

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import load_checkpoint
from data.loader import to_device
from data.tokenizer import Tokenizer
from model import VLM, ModelConfig
from schedule import image_start_step


def load_model(path, device):
    """The checkpoint's raw module (a compiled one would recompile for every new length), its
    tokenizer, whether it was fine-tuned, and whether its image encoder was ever trained."""
    checkpoint = load_checkpoint(path)
    config = ModelConfig(**{**checkpoint["model_config"], "use_kernels": False})  # eager references
    model = VLM(config).to(device)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    # checkpoints written before "stage" was recorded: fine-tuning's name their pretrained one
    fine_tuned = checkpoint.get("stage", "finetune" if "pretrained_from" in checkpoint else "pretrain") == "finetune"
    if fine_tuned:
        saw_images = True  # fine-tuning trains on image conversations
    else:  # a pretraining checkpoint from before its image phase never saw an image
        c = checkpoint["config"]
        start = checkpoint["image_start_step"] if "image_start_step" in checkpoint else image_start_step(c)
        saw_images = c["image_ratio"] > 0 and checkpoint["iter_num"] > start
    return model, Tokenizer(checkpoint.get("compact_vocab")), fine_tuned, saw_images


# ------------------------------------------------------------------ model queries (batched)

class Progress:
    """A one-line progress counter on stderr."""

    def __init__(self, label, total):
        self.label, self.total, self.done, self.start = label, total, 0, time.time()

    def update(self, n):
        self.done += n
        end = "\n" if self.done >= self.total else ""
        print(f"\r  {self.label}: {self.done}/{self.total} ({time.time() - self.start:.0f}s)", end=end,
              file=sys.stderr, flush=True)


def stack_images(image_store, indices):
    """The images of a batch's rows, in row order ([0, H, W, 3] for text-only rows)."""
    chosen = [image_store[i] for i in indices if i is not None]
    return np.stack(chosen) if chosen else np.zeros((0, 1, 1, 3), np.uint8)


@torch.no_grad()
def loglikelihoods(model, requests, image_store, pad_id, device, autocast, batch_size, progress=None):
    """(log-likelihood of each continuation after its context, whether greedy decoding would have
    produced it exactly): lm-eval's (logprob, is_greedy). requests: [(context ids, continuation
    ids, image index or None)]; a context needs at least one token (lm-eval conditions an empty
    one on <|endoftext|>, see encode_pair). A sequence longer than block_size + 1 loses tokens
    from the left, as in lm-eval. Rows are right-padded, which causal attention makes harmless;
    image placeholders must already be in the context."""
    keep = model.config.block_size + 1
    head = model.lm_head.weight.float()
    results = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        seqs = []
        for ctx, cont, _ in chunk:
            if len(ctx) == 0 or len(cont) == 0 or len(cont) >= keep:
                raise ValueError(f"a log-likelihood request needs a context of 1 or more tokens and a continuation "
                                 f"of 1 to {keep - 1} tokens; got {len(ctx)} and {len(cont)}")
            seqs.append((list(ctx) + list(cont))[-keep:])
        x = np.full((len(chunk), max(map(len, seqs)) - 1), pad_id, dtype=np.int64)
        for row, seq in enumerate(seqs):
            x[row, :len(seq) - 1] = seq[:-1]
        x, images = to_device([x, stack_images(image_store, [i for _, _, i in chunk])], device)
        with autocast:
            hidden = model.hidden_states(x, images)
        for row, (seq, (_, cont, _)) in enumerate(zip(seqs, chunk)):
            # only the positions that predict the continuation go through the head, in float32
            predicting = hidden[row, len(seq) - 1 - len(cont):len(seq) - 1].float()
            logp = F.log_softmax(F.linear(predicting, head), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            results.append((logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
        if progress:
            progress.update(len(chunk))
    return results


@torch.no_grad()
def greedy_answers(model, prompts, image_store, stop_id, device, autocast, batch_size, max_new, progress=None):
    """Greedy continuations of prompts [(ids, image index or None)]. Prompts of equal length
    are batched together, so no padding (and no attention mask) is ever needed."""
    answers = [None] * len(prompts)
    by_length = {}
    for i, (ids, _) in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            idx = np.array([prompts[i][0] for i in chunk], dtype=np.int64)
            images = stack_images(image_store, [prompts[i][1] for i in chunk])
            idx, images = to_device([idx, images], device)
            with autocast:
                new = model.generate(idx, images, max_new, stop_id=stop_id)
            for i, row in zip(chunk, new.tolist()):
                answers[i] = row[:row.index(stop_id)] if stop_id in row else row
            if progress:
                progress.update(len(chunk))
    return answers
