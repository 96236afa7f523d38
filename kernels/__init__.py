"""Triton kernels for the model's hot spots, each with a plain PyTorch reference.

The Triton versions run on CUDA tensors (or anywhere under TRITON_INTERPRET=1, which the
tests use); on other devices they fall back to their reference, which is also what the
CPU path uses. Each reference is the ground truth that tests/test_kernels.py checks against.
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
