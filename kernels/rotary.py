"""Rotary position embedding, half-split convention.

x is [B, T, H, hd]; each head vector is split into x1 = x[..., :hd/2], x2 = x[..., hd/2:],
and the pair (x1, x2) is rotated by the angle whose cos/sin are given per position:
    out = cat(x1*cos - x2*sin, x1*sin + x2*cos),   cos, sin: [T, hd/2] float32.
A rotation's inverse is the rotation by the negative angle, so the backward is the same
kernel with sin negated. x may be a strided view (e.g. q sliced out of a fused qkv
projection): the kernel reads it through its strides, so no copy is made.
"""

import torch
import triton
import triton.language as tl


def _rotate_reference(x, cos, sin):
    # One copy first: on the CPU these elementwise ops run about 1.5x faster on contiguous
    # memory than on q's or k's strided view of the fused qkv projection.
    x = x.contiguous()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    # broadcast over batch and heads, in x's dtype (the kernel rotates in float32)
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _RotaryReference(torch.autograd.Function):
    """As the kernel: the backward rotates the gradient back by the negative angle, one pass
    where autograd would retrace the slices, products and concatenation of the forward."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate_reference(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return _rotate_reference(grad_out, cos, -sin), None, None


def apply_rotary_reference(x, cos, sin):
    return _RotaryReference.apply(x, cos, sin)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, H, HALF, stride_b, stride_t,
                   stride_h, INVERSE: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_HALF: tl.constexpr):
    # One program per (batch, position): all heads share that position's cos/sin row.
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < H) & (cols < HALF)
    cos = tl.load(cos_ptr + t * HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    x_row = x_ptr + b * stride_b + t * stride_t + heads * stride_h + cols
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
    out_row = out_ptr + pid * H * 2 * HALF + heads * 2 * HALF + cols  # out is contiguous
    tl.store(out_row, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + HALF, (x1 * sin + x2 * cos).to(out_ptr.dtype.element_ty), mask=mask)


def launch_settings(H, hd):
    """Compile-time settings for H heads of hd (kernels/ahead_of_time.py compiles with these)."""
    return {"BLOCK_H": triton.next_power_of_2(H), "BLOCK_HALF": triton.next_power_of_2(hd // 2), "num_warps": 4}


def _rotate(x, cos, sin, inverse):
    B, T, H, hd = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(B, T, H, hd, device=x.device, dtype=x.dtype)
    _rotary_kernel[(B * T,)](x, cos, sin, out, T, H, hd // 2,
                             x.stride(0), x.stride(1), x.stride(2), INVERSE=inverse, **launch_settings(H, hd))
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_out, cos, sin, inverse=True), None, None


def apply_rotary(x, cos, sin):
    T, half = x.shape[1], x.shape[-1] // 2
    assert cos.shape == (T, half) and sin.shape == (T, half), "cos/sin must be [T, hd/2]"
    return _Rotary.apply(x, cos.contiguous(), sin.contiguous())
