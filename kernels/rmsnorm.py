"""RMSNorm: y = x * rsqrt(mean(x^2) + eps) * weight, over the last dimension.

The math runs in float32 whatever the input dtype; the output has x's dtype.
Forward: one program per row. Backward: each program walks a block of rows, summing their
weight-gradient contributions in registers, and writes one partial row; a torch sum over
those few partial rows finishes the job (no atomics, and the result does not depend on
scheduling order).
"""
import torch
import triton
import triton.language as tl

# Rows per backward program. At 16,384 rows that is 512 programs, about four per SM on a
# 132-SM Hopper card; more rows per program would shrink the [programs, D] partial buffer
# but leave SMs idle. A compile-time constant, since the Triton 3.6 interpreter cannot loop
# to a runtime bound under numpy >= 2.4 (triton-lang/triton#9171).
_ROWS_PER_PROGRAM = 32


class _RMSNormReference(torch.autograd.Function):
    """The kernel's math in plain PyTorch, float32 inside. The backward is written out because
    autograd, retracing the forward op by op, makes about twice as many passes over x."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        # With xhat = x * rstd and y = xhat * w:
        #   dx = rstd * (dy*w - xhat * mean(dy*w*xhat)),   dw = sum over rows of dy * xhat
        x, weight, rstd = ctx.saved_tensors
        xhat, dy = x.float() * rstd, dy.float()
        dy_w = dy * weight
        dx = rstd * (dy_w - xhat * (dy_w * xhat).mean(-1, keepdim=True))
        dw = (dy * xhat).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


def rms_norm_reference(x, weight, eps):
    return _RMSNormReference.apply(x, weight, eps)


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * D can pass 2**31 on big batches
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(rstd_ptr + row, rstd)  # saved so the backward need not recompute it
    y = x * rstd * w
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, M, D,
                         ROWS_PER_PROGRAM: tl.constexpr, BLOCK_D: tl.constexpr):
    # With xhat = x * rstd and y = xhat * w:
    #   dx = rstd * (dy*w - xhat * mean(dy*w*xhat)),   dw = sum over rows of dy * xhat
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, ROWS_PER_PROGRAM):
        row = pid.to(tl.int64) * ROWS_PER_PROGRAM + i
        row_mask = mask & (row < M)  # the last program may run past the final row
        offs = row * D + cols
        x = tl.load(x_ptr + offs, mask=row_mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=row_mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < M, other=0.0)
        xhat = x * rstd
        dyw = dy * w
        dx = rstd * (dyw - xhat * (tl.sum(dyw * xhat, axis=0) / D))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=row_mask)
        dw += dy * xhat
    tl.store(dw_partial_ptr + pid * D + cols, dw, mask=mask)


def launch_settings(D, backward=False):
    """Compile-time settings for rows of D (kernels/ahead_of_time.py compiles the kernels with
    these): the whole row in one block; the forward takes about eight elements per thread, the
    backward four, since it keeps five values per element live across its row loop (at eight,
    D = 2048 in float32 spilled to local memory on sm_90a: ptxas, Triton 3.6)."""
    block = triton.next_power_of_2(D)
    if backward:
        return {"BLOCK_D": block, "num_warps": min(max(block // 128, 1), 16), "ROWS_PER_PROGRAM": _ROWS_PER_PROGRAM}
    return {"BLOCK_D": block, "num_warps": min(max(block // 256, 1), 16)}


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        D = x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        M = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(M, device=x.device, dtype=torch.float32)
        settings = launch_settings(D)
        _rms_norm_fwd_kernel[(M,)](x2, weight, y, rstd, D, eps,
                                   BLOCK_D=settings["BLOCK_D"], num_warps=settings["num_warps"])
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, D = x2.shape
        dy2 = dy.reshape(-1, D).contiguous()
        dx = torch.empty_like(x2)
        settings = launch_settings(D, backward=True)
        programs = triton.cdiv(M, settings["ROWS_PER_PROGRAM"])
        dw_partial = torch.empty(programs, D, device=x2.device, dtype=torch.float32)
        _rms_norm_bwd_kernel[(programs,)](x2, weight, dy2, rstd, dx, dw_partial, M, D, **settings)
        dw = dw_partial.sum(0).to(weight.dtype)
        return dx.view(dy.shape), dw, None


def rms_norm(x, weight, eps):
    return _RMSNorm.apply(x, weight.contiguous(), eps)
