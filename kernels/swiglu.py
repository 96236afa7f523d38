"""SwiGLU gate: silu(gate) * up, elementwise, math in float32, output in the input dtype.

gate and up may be row-strided views (for example the two halves of one fused projection,
`gate, up = proj(x).chunk(2, -1)`): the kernels take a row stride, so no copy is made.
The backward recomputes silu from the saved inputs instead of storing it.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Columns per program. Grid axis 0 runs over rows (no 65535 limit there), axis 1 over
# column blocks; 1024 keeps the masked tail small for widths like 5632 = 5.5 * 1024.
_BLOCK = 1024


def launch_settings():
    """Compile-time settings of both kernels (kernels/ahead_of_time.py compiles them with these)."""
    return {"BLOCK": _BLOCK, "num_warps": 4}


def swiglu_reference(gate, up):
    return F.silu(gate) * up


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, N, stride_gate, stride_up,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + row * N + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(gate_ptr, up_ptr, dout_ptr, dgate_ptr, dup_ptr, N, stride_gate,
                       stride_up, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    # d silu(g)/dg = s + g * s * (1 - s)
    dgate = dout * u * s * (1.0 + g * (1.0 - s))
    dup = dout * g * s
    tl.store(dgate_ptr + row * N + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * N + cols, dup.to(dup_ptr.dtype.element_ty), mask=mask)


def _rows(t):
    # [..., N] -> [M, N] with unit column stride; a view whenever the layout allows one
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g2, u2 = _rows(gate), _rows(up)
        M, N = g2.shape
        out = torch.empty(M, N, device=gate.device, dtype=gate.dtype)
        grid = (M, triton.cdiv(N, _BLOCK))
        _swiglu_fwd_kernel[grid](g2, u2, out, N, g2.stride(0), u2.stride(0),
                                 **launch_settings())
        ctx.save_for_backward(g2, u2)
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        g2, u2 = ctx.saved_tensors
        M, N = g2.shape
        dout2 = dout.reshape(M, N).contiguous()
        dgate = torch.empty(M, N, device=g2.device, dtype=g2.dtype)
        dup = torch.empty(M, N, device=u2.device, dtype=u2.dtype)
        grid = (M, triton.cdiv(N, _BLOCK))
        _swiglu_bwd_kernel[grid](g2, u2, dout2, dgate, dup, N, g2.stride(0), u2.stride(0),
                                 **launch_settings())
        return dgate.view(dout.shape), dup.view(dout.shape)


def swiglu(gate, up):
    return _SwiGLU.apply(gate, up)
