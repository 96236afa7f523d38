"""
The project's CPU training step against a plain textbook PyTorch step of the same shape, in one
run on one machine:

    python bench_cpu.py                            # 4 layers, d_model 256, seq 256, batch 16, vocab 932
    python bench_cpu.py --n_layer=8 --n_embd=512 --ffn_hidden=1408

Ours is pretrain.py's step: model.VLM with the PyTorch references of kernels/ (what runs on a
CPU), common.train_step, the fused AdamW of model.configure_optimizer, under
common.autocast_context (bf16 where the CPU multiplies bf16 natively, float32 elsewhere);
eager (pretrain.py's default) and through common.compile_and_wrap (--compile=True: inductor
fuses the elementwise work into C++ loops; the first step pays for compiling, reported apart).
The baseline is textbook_llama.py's TextbookLlama (the same decoder as a tutorial writes it: separate
q/k/v and SwiGLU matmuls, nn.RMSNorm, F.scaled_dot_product_attention, full logits into
F.cross_entropy) with torch.optim.AdamW's defaults, timed in float32 and under bf16 autocast.
Every variant trains on the same random batch. Rounds alternate between the variants, so a
machine that gets busy slows them alike; each variant's median round is reported.
"""

import contextlib
import platform
import statistics
import sys
import time

import torch

from common import autocast_context, compile_and_wrap, cpu_has_native_bf16, train_step
from configurator import apply_overrides
from model import VLM, ModelConfig, configure_optimizer
from textbook_llama import TextbookLlama

# -----------------------------------------------------------------------------
n_layer = 4
n_head = 4
n_embd = 256
ffn_hidden = 704
seq_len = 256
batch_size = 16
vocab_size = 932  # the toy world's compact vocabulary
rounds = 5
steps_per_round = 4
warmup_steps = 2
seed = 1337
# -----------------------------------------------------------------------------


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def our_step(config, x, y, compile):
    """pretrain.py's step on a text-only batch."""
    raw_model = VLM(config)
    optimizer = configure_optimizer(raw_model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    vision_params = [p for p in raw_model.vision.parameters() if p.requires_grad]
    autocast = autocast_context("cpu", "bfloat16")
    model = compile_and_wrap(raw_model, compile, "cpu", world_size=1, local_rank=0, layouts=1)

    def step():
        train_step(model, optimizer, [(x, y, None)], autocast, vision_params, False, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def textbook_step(config, x, y, bf16):
    model = TextbookLlama(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))

    def step():
        with torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def matmul_rate(rows, inner, cols, dtype, repeats=20):
    """GFLOP/s of one [rows, inner] @ [inner, cols] matmul in dtype: what this CPU's matmul
    library gives at the step's own shapes, the ceiling for the bulk of both steps."""
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * inner * cols * repeats / (time.perf_counter() - t0) / 1e9


def main(argv):
    settings = {k: globals()[k] for k in ("n_layer", "n_head", "n_embd", "ffn_hidden", "seq_len", "batch_size",
                                          "vocab_size", "rounds", "steps_per_round", "warmup_steps", "seed")}
    s = apply_overrides(settings, argv)
    torch.manual_seed(s["seed"])
    config = ModelConfig(vocab_size=s["vocab_size"], block_size=s["seq_len"], n_layer=s["n_layer"],
                         n_head=s["n_head"], n_kv_head=s["n_head"], n_embd=s["n_embd"],
                         ffn_hidden=s["ffn_hidden"], image_token_id=s["vocab_size"] - 1)
    x = torch.randint(0, s["vocab_size"] - 1, (s["batch_size"], s["seq_len"]))
    y = torch.randint(0, s["vocab_size"] - 1, (s["batch_size"], s["seq_len"]))
    ours_dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    variants = {f"ours ({ours_dtype})": our_step(config, x, y, compile=False),
                f"ours ({ours_dtype}, compiled)": our_step(config, x, y, compile=True),
                "textbook (float32)": textbook_step(config, x, y, bf16=False),
                "textbook (bf16 autocast)": textbook_step(config, x, y, bf16=True)}
    first_step_s = {}
    for name, step in variants.items():
        t0 = time.perf_counter()
        step()
        first_step_s[name] = time.perf_counter() - t0
        for _ in range(s["warmup_steps"]):
            step()
    tokens = s["batch_size"] * s["seq_len"] * s["steps_per_round"]
    rates = {name: [] for name in variants}
    for _ in range(s["rounds"]):
        for name, step in variants.items():
            t0 = time.perf_counter()
            for _ in range(s["steps_per_round"]):
                step()
            rates[name].append(tokens / (time.perf_counter() - t0))
    median = {name: statistics.median(r) for name, r in rates.items()}

    eager, compiled, fp32, bf16 = median.values()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}, "
          f"torch {torch.__version__}; {s['n_layer']} layers, d_model {s['n_embd']}, seq {s['seq_len']}, "
          f"batch {s['batch_size']}, vocab {s['vocab_size']}; median of {s['rounds']} rounds of "
          f"{s['steps_per_round']} steps")
    print("| step | tokens/s | vs textbook float32 | vs textbook bf16 | first step |")
    print("|---|---:|---:|---:|---:|")
    for name, rate in median.items():
        print(f"| {name} | {rate:,.0f} | {rate / fp32:.2f}x | {rate / bf16:.2f}x | {first_step_s[name]:.1f} s |")
    # The MLP's first matmul (tokens x d_model @ d_model x 2 ffn_hidden), the step's largest.
    shape = (s["batch_size"] * s["seq_len"], s["n_embd"], 2 * s["ffn_hidden"])
    bf16_rate, fp32_rate = matmul_rate(*shape, torch.bfloat16), matmul_rate(*shape, torch.float32)
    print(f"matmul {shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}: bf16 {bf16_rate:.0f} GFLOP/s, float32 "
          f"{fp32_rate:.0f} GFLOP/s ({bf16_rate / fp32_rate:.2f}x)")
    for name, ours in (("eager", eager), ("compiled", compiled)):
        print(f"goals, ours {name}: >= 2x textbook float32: {'met' if ours >= 2 * fp32 else 'NOT met'}; "
              f">= 1.1x textbook bf16: {'met' if ours >= 1.1 * bf16 else 'NOT met'}")
    return median


if __name__ == "__main__":
    main(sys.argv[1:])
