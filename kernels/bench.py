"""Benchmark the kernels against eager PyTorch and torch.compile, on one CUDA GPU.

    python -m kernels.bench [--json PATH]

Every number is one forward + backward, median time (triton.testing.do_bench), bf16, at the
1.4B model's sizes: 16,384 tokens, d_model 2,048, SwiGLU width 5,632, 16 heads of 128, vocab
100,352. The row/elementwise ops report achieved bandwidth (bytes the op must read and write,
whoever runs it) against this card's measured device-to-device copy. The output projection +
cross-entropy head reports TFLOP/s (its 3 matmuls) against a measured bf16 8192^3 matmul, and
its peak memory above the inputs against the unfused path (full logits + F.cross_entropy).
Meant to take under three minutes of GPU time, most of it torch.compile.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing

from kernels import (
    apply_rotary, apply_rotary_reference, linear_cross_entropy,
    linear_cross_entropy_reference, rms_norm, rms_norm_reference, swiglu, swiglu_reference,
)

GiB = 2**30


def median_ms(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def measure(step, leaves, rep=200):
    """Median ms of step() (forward + backward), and its peak memory above what was
    allocated before it ran (activations, temporaries and the new .grad tensors)."""
    step()  # warm up: Triton compiles, torch.compile traces
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
    ms = triton.testing.do_bench(step, warmup=25, rep=rep, grad_to_none=leaves,
                                 return_mode="median")
    return ms, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels/bench.py needs a CUDA GPU, and torch.cuda.is_available() is False.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1 would time Triton's CPU interpreter; unset it.")
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16

    # ceilings measured on this card
    src = torch.empty(GiB // 2, device=dev, dtype=bf16)
    dst = torch.empty_like(src)
    copy_gbps = 2 * GiB / median_ms(lambda: dst.copy_(src)) / 1e6  # read + write
    del src, dst
    a = torch.randn(8192, 8192, device=dev, dtype=bf16)
    b = torch.randn(8192, 8192, device=dev, dtype=bf16)
    matmul_tflops = 2 * 8192**3 / median_ms(lambda: a @ b) / 1e9
    del a, b

    rows = []

    def record(op, impl, ms, peak, bytes_moved=None, flops=None):
        row = dict(op=op, impl=impl, ms=ms, extra_peak_gib=peak / GiB)
        if bytes_moved is not None:
            row["gbps"] = bytes_moved / ms / 1e6
            row["pct_of_copy"] = 100 * row["gbps"] / copy_gbps
        if flops is not None:
            row["tflops"] = flops / ms / 1e9
            row["pct_of_matmul"] = 100 * row["tflops"] / matmul_tflops
        rows.append(row)
        print(f"  {op:<10} {impl:<22} {ms:8.3f} ms", flush=True)

    def compare(op, kernel, reference, inputs, leaves, grad_out, bytes_moved):
        impls = [("triton", kernel), ("eager", reference),
                 ("torch.compile", torch.compile(reference, dynamic=False))]
        for impl, fn in impls:
            ms, peak = measure(lambda: fn(*inputs).backward(grad_out), leaves)
            record(op, impl, ms, peak, bytes_moved=bytes_moved)

    # RMSNorm: forward reads x, writes y; backward reads x and dy, writes dx
    M, D = 16384, 2048
    x = torch.randn(M, D, device=dev, dtype=bf16, requires_grad=True)
    w = torch.ones(D, device=dev, requires_grad=True)
    compare("rmsnorm", rms_norm, rms_norm_reference, (x, w, 1e-5), [x, w],
            torch.randn_like(x), bytes_moved=5 * x.numel() * 2)

    # SwiGLU: forward reads gate, up, writes out; backward reads all three, writes two
    gate = torch.randn(M, 5632, device=dev, dtype=bf16, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    compare("swiglu", swiglu, swiglu_reference, (gate, up), [gate, up],
            torch.randn_like(gate), bytes_moved=8 * gate.numel() * 2)
    del gate, up

    # rotary: forward reads x, writes out; backward reads dout, writes dx
    q = torch.randn(8, 2048, 16, 128, device=dev, dtype=bf16, requires_grad=True)
    angles = torch.rand(2048, 64, device=dev) * 6.3
    compare("rotary", apply_rotary, apply_rotary_reference,
            (q, angles.cos(), angles.sin()), [q], torch.randn_like(q),
            bytes_moved=4 * q.numel() * 2)
    del q

    # output projection + cross-entropy: 3 matmuls of 2*N*D*V flops each, however it is done
    N, V = 16384, 100352
    h = torch.randn(N, D, device=dev, dtype=bf16, requires_grad=True)
    weight = (torch.randn(V, D, device=dev) * D**-0.5).to(bf16).requires_grad_()
    targets = torch.randint(0, V, (N,), device=dev)

    def unfused(h, weight, targets):
        return F.cross_entropy((h @ weight.t()).float(), targets, ignore_index=-1)

    compiled_unfused = torch.compile(unfused, dynamic=False)
    impls = [("fused triton", lambda: linear_cross_entropy(h, weight, targets)[0]),
             ("fused reference", lambda: linear_cross_entropy_reference(h, weight, targets)[0]),
             ("unfused eager", lambda: unfused(h, weight, targets)),
             ("unfused torch.compile", lambda: compiled_unfused(h, weight, targets))]
    for impl, fn in impls:
        ms, peak = measure(lambda: fn().backward(), [h, weight], rep=1000)
        record("head", impl, ms, peak, flops=6 * N * D * V)

    print(f"\ncopy {copy_gbps:.0f} GB/s, bf16 matmul {matmul_tflops:.0f} TFLOP/s on "
          f"{torch.cuda.get_device_name()}")
    print(f"{'op':<9} {'impl':<22} {'ms':>8} {'rate':>14} {'% ceiling':>10} {'extra GiB':>10}")
    for r in rows:
        rate = (f"{r['gbps']:9.0f} GB/s" if "gbps" in r else f"{r['tflops']:6.0f} TFLOP/s")
        pct = r.get("pct_of_copy", r.get("pct_of_matmul"))
        print(f"{r['op']:<9} {r['impl']:<22} {r['ms']:8.3f} {rate:>14} {pct:9.1f}% "
              f"{r['extra_peak_gib']:10.2f}")
    head = {r["impl"]: r for r in rows if r["op"] == "head"}
    fused, base = head["fused triton"], head["unfused eager"]
    print(f"fused head vs unfused eager: {fused['ms'] / base['ms']:.2f}x the time, "
          f"{fused['extra_peak_gib'] / base['extra_peak_gib']:.2f}x the extra peak memory")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_gbps=copy_gbps,
                           matmul_tflops=matmul_tflops, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
