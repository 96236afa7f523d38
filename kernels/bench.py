"""Time each Triton kernel against eager PyTorch and torch.compile of its reference.

    python -m kernels.bench            # on one CUDA GPU, the anchor shapes (bench.py runs this too)

Every number is one forward + backward in bf16: the median time and the peak memory above
what was allocated before the call (activations, temporaries and the new .grad tensors).
The anchor shapes are the 1B model's: 16,384 tokens, d_model 2,048, SwiGLU width 5,632,
16 heads of 128, vocab 100,352. The row-wise and elementwise ops also report the bandwidth
they achieve (the bytes the op must read and write, whoever runs it) against this card's
measured device-to-device copy; the output projection + cross-entropy head reports TFLOP/s
(its three matmuls) against a measured 8192^3 bf16 matmul.
On the CPU (bench.py --tiny=True) the same code runs once per row at toy shapes, the kernels in
Triton's interpreter, with no memory figures: that only checks that the code runs.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

from kernels import (
    apply_rotary, apply_rotary_reference, linear_cross_entropy,
    linear_cross_entropy_reference, rms_norm, rms_norm_reference, swiglu, swiglu_reference,
)

GiB = 2**30
ANCHOR_SHAPES = dict(tokens=16384, d_model=2048, ffn_hidden=5632, vocab=100352, heads=16, head_dim=128)
TINY_SHAPES = dict(tokens=32, d_model=64, ffn_hidden=96, vocab=500, heads=2, head_dim=32)


def median_ms(fn, reset=(), rep_ms=200):
    """Median milliseconds of fn() on CUDA: triton's do_bench (CUDA events, its own warm-up, the
    L2 cache flushed between calls)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=list(reset) or None,
                                   return_mode="median")


def measure(step, leaves, device, rep_ms=200):
    """(median ms, extra peak bytes) of step(), a forward + backward. On the CPU, where this only
    checks that the code runs: one call's host-clock time, and no memory figure."""
    if device != "cuda":
        start = time.perf_counter()
        step()
        return 1e3 * (time.perf_counter() - start), None
    step()  # warm up: Triton compiles its kernels, torch.compile traces
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in leaves:
        t.grad = None
    return median_ms(step, leaves, rep_ms), peak


def ceilings(device):
    """This card's device-to-device copy (GB/s, bytes read + written) and 8192^3 bf16 matmul
    (TFLOP/s), on random data. None on the CPU."""
    if device != "cuda":
        return None, None
    src = torch.randn(GiB // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() * 2 / median_ms(lambda: dst.copy_(src)) / 1e6
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    matmul_tflops = 2 * 8192**3 / median_ms(lambda: a @ b) / 1e9
    return copy_gbps, matmul_tflops


def unfused_head(h, weight, targets):
    """The textbook head: full float32 logits, then cross-entropy."""
    return F.cross_entropy((h @ weight.t()).float(), targets, ignore_index=-1)


def bench_kernels(shapes, device, rows, compile=True, copy_gbps=None, matmul_tflops=None):
    """Appends to rows one dict per (op, implementation): triton, eager (the reference) and
    torch.compile (of the reference); the head also its chunk sizes and the chunked reference."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter's fast path
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    def record(op, impl, ms, peak, bytes_moved=None, flops=None):
        row = dict(op=op, impl=impl, ms=ms, extra_gib=None if peak is None else peak / GiB)
        if bytes_moved and copy_gbps:
            row["gbps"] = bytes_moved / ms / 1e6
            row["pct_of_copy"] = 100 * row["gbps"] / copy_gbps
        if flops and matmul_tflops:
            row["tflops"] = flops / ms / 1e9
            row["pct_of_matmul"] = 100 * row["tflops"] / matmul_tflops
        rows.append(row)
        extra = "" if peak is None else f", {peak / GiB:.3f} GiB extra"
        print(f"  {op:<8} {impl:<24} {ms:9.3f} ms{extra}", flush=True)

    def compare(op, kernel, reference, inputs, leaves, grad_out, bytes_moved):
        impls = [("triton", kernel), ("eager", reference)]
        if compile:
            impls.append(("torch.compile", torch.compile(reference, dynamic=False)))
        for impl, fn in impls:
            ms, peak = measure(lambda: fn(*inputs).backward(grad_out), leaves, device)
            record(op, impl, ms, peak, bytes_moved=bytes_moved)

    M, D, FF, V = shapes["tokens"], shapes["d_model"], shapes["ffn_hidden"], shapes["vocab"]
    H, hd = shapes["heads"], shapes["head_dim"]
    # RMSNorm: forward reads x, writes y; backward reads x and dy, writes dx (5 passes)
    x = randn(M, D).requires_grad_()
    w = torch.ones(D, device=device, requires_grad=True)
    compare("rmsnorm", rms_norm, rms_norm_reference, (x, w, 1e-5), [x, w], randn(M, D),
            bytes_moved=5 * x.numel() * x.element_size())
    del x
    # SwiGLU: forward reads gate and up, writes out; backward reads three, writes two (8 passes)
    gate, up = randn(M, FF).requires_grad_(), randn(M, FF).requires_grad_()
    compare("swiglu", swiglu, swiglu_reference, (gate, up), [gate, up], randn(M, FF),
            bytes_moved=8 * gate.numel() * gate.element_size())
    del gate, up
    # rotary on q [batch, seq, heads, head_dim]: forward reads x, writes out; backward the same
    seq = min(M, 2048)
    q = randn(M // seq, seq, H, hd).requires_grad_()
    angles = torch.rand(seq, hd // 2, device=device, generator=g) * 6.3
    compare("rotary", apply_rotary, apply_rotary_reference, (q, angles.cos(), angles.sin()), [q],
            randn(*q.shape), bytes_moved=4 * q.numel() * q.element_size())
    del q
    # output projection + cross-entropy: 3 matmuls of 2*M*D*V flops, however it is done
    h = randn(M, D).requires_grad_()
    weight = randn(V, D, scale=D**-0.5).requires_grad_()
    targets = torch.randint(0, V, (M,), device=device, generator=g)
    impls = [("triton", lambda: linear_cross_entropy(h, weight, targets)[0]),
             # smaller chunks hold fewer logits at once: less memory, smaller matmuls
             ("triton, chunk 2048", lambda: linear_cross_entropy(h, weight, targets, chunk_size=2048)[0]),
             ("triton, chunk 1024", lambda: linear_cross_entropy(h, weight, targets, chunk_size=1024)[0]),
             ("chunked reference", lambda: linear_cross_entropy_reference(h, weight, targets)[0]),
             ("eager", lambda: unfused_head(h, weight, targets))]
    if compile:
        compiled = torch.compile(unfused_head, dynamic=False)
        impls.append(("torch.compile", lambda: compiled(h, weight, targets)))
    for impl, fn in impls:
        ms, peak = measure(lambda: fn().backward(), [h, weight], device, rep_ms=500)
        record("head", impl, ms, peak, flops=6 * M * D * V)


def main():
    if not torch.cuda.is_available():
        sys.exit("kernels/bench.py needs a CUDA GPU (for the CPU check: python bench.py --tiny=True)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1 would time Triton's CPU interpreter; unset it.")
    copy_gbps, matmul_tflops = ceilings("cuda")
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s, bf16 matmul {matmul_tflops:.0f} TFLOP/s")
    bench_kernels(ANCHOR_SHAPES, "cuda", [], copy_gbps=copy_gbps, matmul_tflops=matmul_tflops)


if __name__ == "__main__":
    main()
