"""
Every GPU number the project reports, from one command on one CUDA GPU (about 6 minutes on an
H100 or H200, most of it torch.compile; nothing is downloaded):

    python bench.py --out_dir=bench/h100
    python bench.py --tiny=True --out_dir=/tmp/bench    # the same code at toy sizes, on the CPU

In order:
1. tests/test_kernels.py with the Triton kernels compiled (TRITON_INTERPRET=0): pass or fail.
2. Training steps of config/1b.py's model as pretrain.py runs it (bf16 autocast,
   torch.compile, our kernels, fused AdamW, common.train_step, synthetic shards through the real
   loader), batch_size x 2048 tokens on one GPU: text-only batches, the same with pretrain.py's
   per-step host sync, and mixed batches (image_ratio of the rows are image-caption rows).
   For each: tokens/s, MFU, peak memory, first-step (compile) time.
3. In the same process, the baseline to beat: a plain textbook Llama of the same shape
   (nn.Linear head + F.cross_entropy over the full logits), compiled, on the same text batches.
4. Our steps again with the model sharded by FSDP2 (pretrain.py --parallel=fsdp) over a
   one-rank group: tokens/s and peak memory beside step 2's (DDP's model on one GPU is the
   plain module).
5. kernels/bench.py: each kernel against eager PyTorch and torch.compile of its reference, at
   the 1B model's sizes (forward + backward, bf16: median time and extra peak memory).
results.json (everything, raw), results.md (the tables, and the speed goals, each marked
met or not) and kernel_tests.txt go to out_dir, rewritten after every step, so a run cut short
keeps what it measured. A step that fails (say, out of memory) is reported and the next runs.

MFU is pretrain.py's: model.flops_per_token(seq_len) x tokens/s over the card's dense bf16
peak from common.peak_flops (decoder matmul FLOPs only; the vision tower's are not counted).
"""

import datetime
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types

import numpy as np
import torch

# Triton reads TRITON_INTERPRET when the kernels are defined, at import: the compiled kernels on a
# GPU, Triton's CPU interpreter elsewhere.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
os.environ["TRITON_INTERPRET"] = "0" if DEVICE == "cuda" else "1"

import triton  # noqa: E402

from common import autocast_context, peak_flops, shard_model, train_step  # noqa: E402
from configurator import apply_overrides, script_settings  # noqa: E402
from data import shards  # noqa: E402
from data.atomic import write_text  # noqa: E402
from data.errors import report_user_errors  # noqa: E402
from data.loader import MixedLoader  # noqa: E402
from data.tokenizer import FULL_VOCAB_SIZE, SPECIAL_TOKENS  # noqa: E402
from kernels.bench import ANCHOR_SHAPES, TINY_SHAPES, bench_kernels, ceilings  # noqa: E402
from model import VLM, configure_optimizer, model_config_from_settings  # noqa: E402
from textbook_llama import TextbookLlama  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
GiB = 2**30

# -----------------------------------------------------------------------------
out_dir = "bench"
tiny = False  # toy sizes that run on the CPU in seconds (what tests/test_bench.py runs)
batch_size = 8  # rows per step (config/1b.py's per-GPU micro-batch)
image_ratio = 0.1  # share of image-caption rows in the mixed steps
warmup_steps = 2  # steps after the first (compiling) one, before the timed ones
timed_steps = 8
kernel_tests = ""  # a pytest -k expression choosing tests/test_kernels.py's tests ("" = all)
use_kernels = True  # our Triton kernels in the model (CUDA only); False: their PyTorch references
compile = True  # torch.compile the models and the kernels' references (CUDA only: bench_cpu.py times the CPU);
# False times everything eager, e.g. to still get numbers on a machine where compiling fails
seed = 1337
# -----------------------------------------------------------------------------


# === THE MODEL THAT IS TIMED ===================================================================
def bench_model_config(tiny):
    """(ModelConfig, freeze_vision, seq_len, caption_len, eot_id): the model that
    `pretrain.py config/1b.py` builds, through the same settings-to-model function, with the
    full cl100k vocabulary (real data has no compact vocabulary), or toy sizes when tiny. The
    SigLIP tower's shape is ModelConfig's default, SigLIP-B/16's, so nothing is downloaded."""
    overrides = []
    vocab, image_id, eot_id = FULL_VOCAB_SIZE, SPECIAL_TOKENS["<|image|>"], SPECIAL_TOKENS["<|endoftext|>"]
    if tiny:
        overrides = ["--n_layer=2", "--n_head=2", "--n_kv_head=2", "--n_embd=64", "--ffn_hidden=96", "--seq_len=32",
                     "--image_size=16", "--patch_size=8", "--vit_depth=1", "--vit_width=32", "--vit_heads=2",
                     "--caption_len=8", "--vision_encoder=patches", "--freeze_vision=False"]
        vocab, image_id, eot_id = 500, 498, 499
    settings = script_settings("pretrain.py", ["config/1b.py", *overrides])
    # The kernels on CUDA only, as pretrain.py: in Triton's interpreter a CPU step would take
    # minutes (kernels/bench.py still runs them there, at toy sizes).
    config = model_config_from_settings(settings, vocab, image_id, use_kernels=use_kernels and DEVICE == "cuda")
    return config, settings["freeze_vision"], settings["seq_len"], settings["caption_len"], eot_id
# ===============================================================================================


def run_kernel_tests(selection):
    """tests/test_kernels.py in a subprocess: compiled on a GPU, interpreted on the CPU."""
    cmd = [sys.executable, "-m", "pytest", "tests/test_kernels.py", "-p", "no:cacheprovider"]
    cmd += ["-k", selection] if selection else []
    start = time.perf_counter()
    # inherits TRITON_INTERPRET; a hang must not eat the GPU time the other phases need
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    return dict(command=f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} python " + " ".join(cmd[1:]),
                passed=proc.returncode == 0, summary=lines[-1] if lines else "(no output)",
                seconds=time.perf_counter() - start), output


def synthetic_loader(folder, config, seq_len, caption_len, eot_id):
    """The real loader over small random shards in the real formats (it wraps around them)."""
    rng = np.random.default_rng(seed)
    ordinary = min(100000, config.vocab_size - 10)  # below every special token
    text = os.path.join(folder, "text.bin")
    shards.write_text_shard(text, rng.integers(0, ordinary, 64 * batch_size * seq_len + 1), config.vocab_size)
    captions = os.path.join(folder, "captions.bin")
    n, s = 64, config.image_size
    shards.write_image_caption_shard(captions, rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
                                     [rng.integers(0, ordinary, caption_len) for _ in range(n)], config.vocab_size)
    # the loader needs only these three of a tokenizer (the tiny model's ids are made up)
    tokenizer = types.SimpleNamespace(image_id=config.image_token_id, eot_id=eot_id, vocab_size=config.vocab_size)
    return MixedLoader(text_files=[text], caption_files=[captions], tokenizer=tokenizer, batch_size=batch_size,
                          seq_len=seq_len, tokens_per_image=config.tokens_per_image, caption_len=caption_len,
                          device=DEVICE)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_steps(key, name, step, tokens_per_step, flops_per_token, first_step=True):
    """Runs step() once (when first_step: the call that compiles), warmup_steps times, then
    timed_steps times with no host sync in between; returns the variant's row."""
    first_s = None
    if first_step:
        sync()
        start = time.perf_counter()
        step()
        sync()
        first_s = time.perf_counter() - start
    for _ in range(warmup_steps):
        step()
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(timed_steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - start) / timed_steps
    peak = peak_flops(DEVICE)
    tokens_per_s = tokens_per_step / step_s
    row = dict(key=key, variant=name, tokens_per_s=tokens_per_s, step_ms=1e3 * step_s,
               mfu=flops_per_token * tokens_per_s / peak if peak else None,
               peak_gib=torch.cuda.max_memory_allocated() / GiB if DEVICE == "cuda" else None,
               first_step_s=first_s, compile_s=first_s - step_s if first_s is not None else None,
               loss=float(loss), flops_per_token=flops_per_token)
    mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] else ""
    print(f"  {name:<44} {tokens_per_s:10,.0f} tok/s{mfu}, {row['step_ms']:.1f} ms/step, loss {row['loss']:.3f}",
          flush=True)
    return row


def use_compile():
    # On the CPU (tests/test_bench.py) compiling would take minutes for steps timed in seconds.
    return compile and DEVICE == "cuda"


def free_memory():
    gc.collect()
    torch._dynamo.reset()  # drop the compiled graphs, and the tensors they hold
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def bench_ours(loader, config, freeze_vision, seq_len, rows, parallel="ddp"):
    """Our model as pretrain.py trains it. One compiled module: the text graph compiled by the
    first variant is reused by the second; the mixed steps compile a second graph. With
    parallel="fsdp", the model is sharded by FSDP2 over a one-rank group, as pretrain.py
    --parallel=fsdp does over many: the cost of its hooks, casts and (here trivial) collectives."""
    autocast = autocast_context(DEVICE, "bfloat16")
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        raw_model = VLM(config)
    raw_model.set_trainable(encoder=not freeze_vision)  # as pretrain.py: a frozen tower has no optimizer state
    if parallel == "fsdp":
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if DEVICE == "cuda" else "gloo",
                                                 store=torch.distributed.HashStore(), rank=0, world_size=1)
        shard_model(raw_model, parallel, autocast)
    optimizer = configure_optimizer(raw_model, 3e-4, 0.1, (0.9, 0.95), DEVICE)
    model = torch.compile(raw_model, dynamic=False) if use_compile() else raw_model
    vision_params = [p for p in raw_model.vision.parameters() if p.requires_grad]

    def step(ratio, host_sync):
        """pretrain.py's step, less the loss sums it keeps for logging."""
        rows_before = loader.state["image_rows"]
        batch = loader.next_batch(ratio)
        token_losses, grad_norm = train_step(model, optimizer, [batch], autocast, vision_params,
                                             loader.state["image_rows"] > rows_before, grad_clip=1.0)
        if host_sync:
            math.isfinite(grad_norm.item())  # pretrain.py checks the norm on the host every step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return token_losses[0].sum() / (batch[1] != -1).sum()

    print(f"  {config.n_layer} layers, d_model {config.n_embd}: {raw_model.num_params('decoder'):,} decoder + "
          f"{raw_model.num_params('vision'):,} vision params; {batch_size} x {seq_len} tokens per step", flush=True)
    tokens, fpt = batch_size * seq_len, raw_model.flops_per_token(seq_len)
    ours = "ours" if config.use_kernels else "ours, kernels off"
    if parallel == "fsdp":
        rows.append(time_steps("fsdp_text", f"{ours}, FSDP2, text", lambda: step(0.0, False), tokens, fpt))
        rows.append(time_steps("fsdp_mixed", f"{ours}, FSDP2, mixed (image_ratio {image_ratio})",
                               lambda: step(image_ratio, False), tokens, fpt))
        return
    rows.append(time_steps("text", f"{ours}, text", lambda: step(0.0, False), tokens, fpt))
    rows.append(time_steps("text_sync", f"{ours}, text, host sync each step (= pretrain.py)",
                           lambda: step(0.0, True), tokens, fpt, first_step=False))
    rows.append(time_steps("mixed", f"{ours}, mixed (image_ratio {image_ratio})",
                           lambda: step(image_ratio, False), tokens, fpt))


def bench_baseline(loader, config, seq_len, rows):
    """The textbook Llama on the same text batches: fused AdamW, clipping, compiled."""
    autocast = autocast_context(DEVICE, "bfloat16")
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = TextbookLlama(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=DEVICE == "cuda")
    compiled = torch.compile(model, dynamic=False) if use_compile() else model

    def step():
        x, y, _ = loader.next_batch(0.0)
        with autocast:
            loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    name = "textbook Llama, compiled, text" if use_compile() else "textbook Llama, text"
    rows.append(time_steps("baseline", name, step, batch_size * seq_len, model.flops_per_token(seq_len)))


def goals(r):
    """The speed targets (MFU, memory, beating the textbook baseline) that this run's results
    speak to: (goal, measured, met). met is None off a GPU, where the numbers say nothing."""
    out = []

    def add(goal, measured, met):
        out.append((goal, measured, met if DEVICE == "cuda" else None))

    if "kernel_tests" in r:
        add("kernel tests pass, compiled", r["kernel_tests"]["summary"], r["kernel_tests"]["passed"])
    steps = {s["key"]: s for s in r["steps"]}
    for key, target in (("text", 0.60), ("mixed", 0.55)):
        if key in steps and steps[key]["mfu"] is not None:
            mfu = steps[key]["mfu"]
            add(f"MFU, {key} steps >= {100 * target:.0f}%", f"{100 * mfu:.1f}%", mfu >= target)
    for key in ("text", "mixed"):
        if key in steps and "baseline" in steps:
            ratio = steps[key]["tokens_per_s"] / steps["baseline"]["tokens_per_s"]
            add(f"tokens/s, {key} / textbook compiled >= 1.2x", f"{ratio:.2f}x", ratio >= 1.2)
    for key in ("text", "mixed"):
        if key in steps and steps[key]["peak_gib"] is not None:
            gib = steps[key]["peak_gib"]
            add(f"peak memory, {key}, batch {batch_size} <= 45 GiB", f"{gib:.1f} GiB", gib <= 45)
    k = {(row["op"], row["impl"]): row for row in r["kernels"]}
    for op in ("head", "rmsnorm", "swiglu"):
        if (op, "triton") in k and (op, "torch.compile") in k:
            ours, compiled = k[(op, "triton")]["ms"], k[(op, "torch.compile")]["ms"]
            add(f"{op}: triton {'at or below' if op == 'head' else 'faster than'} torch.compile",
                f"{ours:.3f} vs {compiled:.3f} ms", ours <= compiled if op == "head" else ours < compiled)
    if ("head", "triton") in k and k[("head", "triton")]["extra_gib"] is not None:
        extra = k[("head", "triton")]["extra_gib"]
        add("head: triton's extra memory <= 0.9 GiB", f"{extra:.2f} GiB", extra <= 0.9)
    return out


def markdown(r):
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = [f"# bench.py on {r['device']}", "",
             f"{r['date']}; torch {r['torch']}, triton {r['triton']}, CUDA {r['cuda']}; {r['seconds']:.0f} s in all."]
    if r["peak_flops"]:
        lines[-1] += (f" Dense bf16 peak {r['peak_flops'] / 1e12:.0f} TFLOP/s (common.PEAK_BF16_FLOPS); measured here: "
                      f"copy {num(r['copy_gbps'], '.0f')} GB/s (read + write), 8192^3 bf16 matmul "
                      f"{num(r['matmul_tflops'], '.0f')} TFLOP/s.")
    lines += ["", f"Command: `{r['command']}`", ""]
    for phase, error in r["errors"].items():
        lines += [f"**{phase} failed:** `{error}`", ""]
    if "kernel_tests" in r:
        lines += [f"Kernel tests: `{r['kernel_tests']['command']}`: {r['kernel_tests']['summary']}", ""]
    if r["kernels"]:
        lines += ["Kernels, forward + backward, median; extra peak = memory above the inputs:", "",
                  "| op | implementation | ms | extra peak GiB | GB/s | % of copy | TFLOP/s | % of matmul |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for k in r["kernels"]:
            lines.append(f"| {k['op']} | {k['impl']} | {k['ms']:.3f} | {num(k['extra_gib'], '.3f')} | "
                         f"{num(k.get('gbps'), '.0f')} | {num(k.get('pct_of_copy'), '.1f')} | "
                         f"{num(k.get('tflops'), '.0f')} | {num(k.get('pct_of_matmul'), '.1f')} |")
        lines.append("")
    if r["steps"]:
        lines += [f"Training steps of {batch_size} x {r['seq_len']} tokens: the mean of {timed_steps} steps after "
                  f"{warmup_steps} warm-up ones; peak = max allocated over the timed steps; first step = "
                  "compile + one step:", "",
                  "| variant | tokens/s | MFU % | ms/step | peak GiB | first step s | loss |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for s in r["steps"]:
            lines.append(f"| {s['variant']} | {s['tokens_per_s']:,.0f} | {num(s['mfu'] and 100 * s['mfu'], '.1f')} | "
                         f"{s['step_ms']:.1f} | {num(s['peak_gib'], '.1f')} | {num(s['first_step_s'], '.1f')} | "
                         f"{s['loss']:.3f} |")
        lines.append("")
    lines += ["| goal | measured | met |", "|---|---|---|"]
    for goal, measured, met in r["goals"]:
        lines.append(f"| {goal} | {measured} | {'n/a' if met is None else 'yes' if met else 'NO'} |")
    return "\n".join(lines) + "\n"


def main():
    """Runs every phase; returns the results (also written to out_dir)."""
    os.makedirs(out_dir, exist_ok=True)
    results = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU",
                   date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                   command="python " + " ".join(sys.argv), peak_flops=peak_flops(DEVICE),
                   copy_gbps=None, matmul_tflops=None, kernels=[], steps=[], errors={})
    config, freeze_vision, seq_len, caption_len, eot_id = bench_model_config(tiny)
    results["seq_len"] = seq_len
    start = time.perf_counter()

    def kernel_tests_phase():
        results["kernel_tests"], output = run_kernel_tests(kernel_tests)
        write_text(os.path.join(out_dir, "kernel_tests.txt"), output)
        print(f"  {results['kernel_tests']['summary']}", flush=True)

    def kernels_phase():
        results["copy_gbps"], results["matmul_tflops"] = ceilings(DEVICE)
        bench_kernels(TINY_SHAPES if tiny else ANCHOR_SHAPES, DEVICE, results["kernels"], compile=use_compile(),
                      copy_gbps=results["copy_gbps"], matmul_tflops=results["matmul_tflops"])

    folder = tempfile.TemporaryDirectory()  # the synthetic shards
    loader = synthetic_loader(folder.name, config, seq_len, caption_len, eot_id)
    # the kernel timings last: if the run is cut short, they are the cheapest to redo alone
    # (python -m kernels.bench)
    phases = [("kernel tests", kernel_tests_phase),
              ("our training steps", lambda: bench_ours(loader, config, freeze_vision, seq_len, results["steps"])),
              ("baseline training steps", lambda: bench_baseline(loader, config, seq_len, results["steps"])),
              ("our training steps under FSDP2",
               lambda: bench_ours(loader, config, freeze_vision, seq_len, results["steps"], parallel="fsdp")),
              ("kernels", kernels_phase)]
    for i, (name, phase) in enumerate(phases):
        in_use = f", {torch.cuda.memory_allocated() / GiB:.1f} GiB allocated" if DEVICE == "cuda" else ""
        print(f"{i + 1}. {name} ({time.perf_counter() - start:.0f} s{in_use})", flush=True)
        # One failure (a kernel that does not compile, an out-of-memory) must not cost the
        # other phases' numbers: GPU time is scarce.
        try:
            phase()
        except Exception as e:
            traceback.print_exc()
            results["errors"][name] = f"{type(e).__name__}: {e}"
        free_memory()
        # written after every phase, so a run cut short still leaves what it measured
        results["goals"], results["seconds"] = goals(results), time.perf_counter() - start
        write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2) + "\n")
        write_text(os.path.join(out_dir, "results.md"), markdown(results))
    folder.cleanup()
    if torch.distributed.is_initialized():  # the FSDP phase's one-rank group
        torch.distributed.destroy_process_group()
    print(f"\n{markdown(results)}\nall in {results['seconds']:.0f} s; written to {out_dir}/", flush=True)
    return results


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    apply_overrides(globals(), sys.argv[1:])
    sys.exit(1 if main()["errors"] else 0)
