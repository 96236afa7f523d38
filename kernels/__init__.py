"""Triton kernels for the model's hot spots, each with a plain PyTorch reference.

Each op comes as `op` (Triton, with its own backward) and `op_reference` (plain PyTorch,
what a textbook writes; it is what runs on the CPU). Two references, RMSNorm and rotary,
write their backward out as the kernels do: autograd's retracing of their forward cost the
CPU step about 4% (bench_cpu.py's shape, AMD EPYC, 2026-11-27). The Triton versions run on CUDA
tensors, or anywhere under TRITON_INTERPRET=1 (the tests); model.Ops picks one set or the
other, once. tests/test_kernels.py checks both against float64 ground truth.
"""
from .cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .rmsnorm import rms_norm, rms_norm_reference
from .rotary import apply_rotary, apply_rotary_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "rms_norm", "rms_norm_reference",
    "apply_rotary", "apply_rotary_reference",
    "swiglu", "swiglu_reference",
    "linear_cross_entropy", "linear_cross_entropy_reference",
]
