"""
How fast finetune.py's step trains the toy world's conversations on the CPU, one row layout
against another, in one run on one machine:

    python data/toyworld/prepare.py && python bench_finetune_cpu.py

Each variant is finetune.py's step (common.train_step, fused AdamW, bf16 autocast where the CPU
multiplies bf16 natively) on the toy model (pretrain.py's defaults), fed by the real loader over
data/toyworld's conversation shards, with no text rows:
  - "one a row of 64": one conversation a row, padded (finetune.py before packing);
  - the same with the full head: logits and loss at every position, as the loss head computed
    them before it skipped the positions without a target (most of a conversation's);
  - "packed, rows of 96" (finetune.py's default) and "packed, rows of 128": as many
    conversations a row as fit, each attending only to itself.
What counts is conversations a second, not tokens: packing trains the same conversations in
fewer positions. Rounds alternate between the variants, so a machine that gets busy slows them
alike; each variant's median round is reported.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench_cpu import cpu_name
from common import autocast_context, cpu_has_native_bf16, train_step
from configurator import apply_overrides, script_settings
from data.loader import ConversationLoader
from data.shards import find_shards
from data.tokenizer import load_tokenizer
from model import VLM, configure_optimizer, model_config_from_settings

# -----------------------------------------------------------------------------
data_dir = "data/toyworld"
positions_per_step = 3072  # every variant steps over the same number of positions
rounds = 5
steps_per_round = 5
warmup_steps = 2
seed = 1337
# -----------------------------------------------------------------------------


def full_head_loss(h, weight, targets, ignore_index=-1):
    """The loss head as it was: float32 logits at every position, then the masked mean."""
    token_losses = F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index,
                                   reduction="none")
    return token_losses.sum() / (targets != ignore_index).sum().clamp(min=1), token_losses.detach()


def variant(s, tokenizer, seq_len, pack, full_head=False):
    """A step function over its own model, optimizer and loader; each step returns how many
    conversations it trained."""
    config = model_config_from_settings(script_settings("pretrain.py", []), tokenizer.vocab_size, tokenizer.image_id)
    model = VLM(config)
    if full_head:
        model.ops.linear_cross_entropy = full_head_loss
    optimizer = configure_optimizer(model, 1e-3, 0.0, (0.9, 0.95), "cpu")
    autocast = autocast_context("cpu", "bfloat16")
    loader = ConversationLoader(files=find_shards(s["data_dir"], "train_chat*.bin"), tokenizer=tokenizer,
                                batch_size=s["positions_per_step"] // seq_len, seq_len=seq_len,
                                tokens_per_image=config.tokens_per_image, seed=s["seed"], pack=pack)
    vision_params = list(model.vision.parameters())

    def step():
        before = loader.state["position"]
        train_step(model, optimizer, [loader.next_batch()], autocast, vision_params, True, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loader.state["position"] - before
    return step


def main(argv):
    s = apply_overrides({k: globals()[k] for k in ("data_dir", "positions_per_step", "rounds", "steps_per_round",
                                                   "warmup_steps", "seed")}, argv)
    torch.manual_seed(s["seed"])
    tokenizer = load_tokenizer(s["data_dir"])
    variants = {"one a row of 64, full head": variant(s, tokenizer, 64, pack=False, full_head=True),
                "one a row of 64": variant(s, tokenizer, 64, pack=False),
                "packed, rows of 96": variant(s, tokenizer, 96, pack=True),
                "packed, rows of 128": variant(s, tokenizer, 128, pack=True)}
    for step in variants.values():
        for _ in range(s["warmup_steps"]):
            step()
    rates = {name: [] for name in variants}
    for _ in range(s["rounds"]):
        for name, step in variants.items():
            t0 = time.perf_counter()
            conversations = sum(step() for _ in range(s["steps_per_round"]))
            rates[name].append(conversations / (time.perf_counter() - t0))
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}, "
          f"torch {torch.__version__}; the toy model, {s['positions_per_step']} positions a step; median of "
          f"{s['rounds']} rounds of {s['steps_per_round']} steps")
    print("| rows | conversations/s | vs one a row of 64, full head |")
    print("|---|---:|---:|")
    base = median["one a row of 64, full head"]
    for name, rate in median.items():
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x |")
    return median


if __name__ == "__main__":
    main(sys.argv[1:])
