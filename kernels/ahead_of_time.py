"""Builds every Triton kernel for the GPU without one: for A100 (sm_80) and H100/H200 (sm_90a),
with the launch settings the code itself uses (each kernel module's launch_settings) at
config/1b.py's and config/79m.py's shapes, in bfloat16 and float32. Triton's wheel ships
NVIDIA's ptxas, so the PTX is also checked by the assembler, which reports each kernel's
registers and any spill to local memory.

    python -m kernels.ahead_of_time            # a table of registers and spills; exit 1 on any failure

tests/test_kernels_compile.py runs it: a compile error or a register spill fails the suite.
What it cannot see: the integer specialisations Triton adds at launch time (an argument equal
to 1, pointers aligned to 16 bytes), which may change the register count by a few.
"""

import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # the kernels must be real JITFunctions, not the interpreter's

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configurator import script_settings  # noqa: E402
from data.tokenizer import FULL_VOCAB_SIZE  # noqa: E402
from kernels import cross_entropy, rmsnorm, rotary  # noqa: E402
from kernels import swiglu as _  # noqa: E402,F401  (the package's `swiglu` is the op; the module is below)

swiglu = sys.modules["kernels.swiglu"]

ARCHS = {"sm_80": 80, "sm_90a": 90}  # ptxas's name for each: Triton's Hopper PTX targets sm_90a
DTYPES = {"bfloat16": "*bf16", "float32": "*fp32"}
CONFIGS = ("config/1b.py", "config/79m.py")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def kernel_builds(config, dtype):
    """(label, kernel, signature, constexprs, num_warps) of every kernel the model launches
    with `config`'s shapes, activations in `dtype` (weights, rotary tables and statistics are
    float32, as in training)."""
    s = script_settings("pretrain.py", [config])
    act, f32 = DTYPES[dtype], "*fp32"
    head_dim = s["n_embd"] // s["n_head"]
    builds = []

    def add(label, kernel, pointers, settings, **fixed):
        """pointers: the pointer arguments' types; other runtime arguments are int32, except
        `eps` (float32); constexprs are the kernel's own names taken from settings and fixed."""
        constexprs = {**{k: v for k, v in settings.items() if k in kernel.arg_names}, **fixed}
        signature = {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name == "eps" else "i32")
                     for name in kernel.arg_names}
        builds.append((label, kernel, signature, constexprs, settings["num_warps"]))

    add(f"rms_norm fwd D={s['n_embd']}", rmsnorm._rms_norm_fwd_kernel,
        dict(x_ptr=act, w_ptr=f32, y_ptr=act, rstd_ptr=f32), rmsnorm.launch_settings(s["n_embd"]))
    add(f"rms_norm bwd D={s['n_embd']}", rmsnorm._rms_norm_bwd_kernel,
        dict(x_ptr=act, w_ptr=f32, dy_ptr=act, rstd_ptr=f32, dx_ptr=act, dw_partial_ptr=f32),
        rmsnorm.launch_settings(s["n_embd"], backward=True))
    add("swiglu fwd", swiglu._swiglu_fwd_kernel, dict(gate_ptr=act, up_ptr=act, out_ptr=act), swiglu.launch_settings())
    add("swiglu bwd", swiglu._swiglu_bwd_kernel,
        dict(gate_ptr=act, up_ptr=act, dout_ptr=act, dgate_ptr=act, dup_ptr=act), swiglu.launch_settings())
    for heads in sorted({s["n_head"], s["n_kv_head"]}):  # queries, keys
        for inverse in (False, True):  # forward, backward
            add(f"rotary {'bwd' if inverse else 'fwd'} H={heads} hd={head_dim}", rotary._rotary_kernel,
                dict(x_ptr=act, cos_ptr=f32, sin_ptr=f32, out_ptr=act), rotary.launch_settings(heads, head_dim),
                INVERSE=inverse)
    for grad in (False, True):  # evaluation, training
        add(f"cross_entropy {'loss+grad' if grad else 'loss'} V={FULL_VOCAB_SIZE}", cross_entropy._ce_chunk_kernel,
            dict(logits_ptr=act, targets_ptr="*i64", losses_ptr=f32, scale_ptr=f32),
            cross_entropy.launch_settings(FULL_VOCAB_SIZE), COMPUTE_GRAD=grad)
    return builds


def assemble(ptx, arch):
    """ptxas -v on the PTX: (registers, spill store bytes, spill load bytes)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        result = subprocess.run([PTXAS, f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True,
                                text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {result.stderr.strip()}")
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def main():
    rows, failures, seen = [], [], set()
    for config in CONFIGS:
        for dtype in DTYPES:
            for label, kernel, signature, constexprs, num_warps in kernel_builds(config, dtype):
                for arch, capability in ARCHS.items():
                    key = (kernel.fn.__name__, str(sorted(constexprs.items())), dtype, arch, num_warps)
                    if key in seen:  # the same build at another config's shapes
                        continue
                    seen.add(key)
                    try:
                        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                                  target=GPUTarget("cuda", capability, 32),
                                                  options={"num_warps": num_warps})
                        registers, spill_stores, spill_loads = assemble(compiled.asm["ptx"], arch)
                    except Exception as e:  # report every build, then fail
                        failures.append(f"{label} {dtype} {arch}: {type(e).__name__}: {e}")
                        continue
                    rows.append((label, dtype, arch, num_warps, registers, spill_stores, spill_loads))
                    if spill_stores or spill_loads:
                        failures.append(f"{label} {dtype} {arch}: spills {spill_stores} bytes to local memory")
    print(f"Triton {triton.__version__}, ptxas from its wheel; shapes of {', '.join(CONFIGS)}\n")
    print("| kernel | dtype | arch | warps | registers | spill stores / loads (bytes) |")
    print("|---|---|---|---:|---:|---:|")
    for label, dtype, arch, warps, registers, stores, loads in rows:
        print(f"| {label} | {dtype} | {arch} | {warps} | {registers} | {stores} / {loads} |")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
