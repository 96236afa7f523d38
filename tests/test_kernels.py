"""Each kernel and each reference, forward and backward, against float64 ground truth.

The ground truth is written here independently of kernels/ (F.rms_norm, a complex-number
rotation, F.silu, F.cross_entropy on full logits), evaluated in float64 on the very values
the kernel saw. Sizes are small and deliberately not multiples of any block size.
"""
import os

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads this
# variable when a kernel is defined, so it must be set before `kernels` (which imports
# triton) is imported. On a GPU machine run with TRITON_INTERPRET=0 to test the compiled
# kernels on the GPU instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels.cross_entropy as cross_entropy_module  # noqa: E402
from kernels import (  # noqa: E402
    apply_rotary, apply_rotary_reference, linear_cross_entropy,
    linear_cross_entropy_reference, rms_norm, rms_norm_reference, swiglu, swiglu_reference,
)

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA GPU", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16]
# max |error| allowed, as a fraction of max |truth|: float32 rounding, or bfloat16's 8 bits
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Fill every new torch.empty/empty_like buffer with NaN, so that an output element a
    kernel forgets to write turns into a NaN that fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def f64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


def assert_close(actual, truth, dtype):
    assert actual.shape == truth.shape
    err = (actual.double() - truth.double()).abs().max().item()
    bound = TOL[dtype] * truth.abs().max().item() + 1e-12
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"  # also fails on NaN


def test_poisoning_is_active():
    assert torch.empty(3).isnan().all() and torch.empty_like(torch.ones(2)).isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [rms_norm, rms_norm_reference], ids=["kernel", "reference"])
def test_rms_norm(fn, dtype):
    D, eps = 100, 1e-5  # 3 * 37 = 111 rows: several backward programs, the last one partial
    x = randn(3, 37, D, dtype=dtype, scale=2.0).requires_grad_()
    w = (1.0 + randn(D, scale=0.1)).requires_grad_()
    dy = randn(3, 37, D, dtype=dtype)
    y = fn(x, w, eps)
    y.backward(dy)

    x64, w64 = f64(x), f64(w)
    y64 = F.rms_norm(x64, (D,), w64, eps)
    y64.backward(dy.double())
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == torch.float32
    assert_close(y, y64, dtype)
    assert_close(x.grad, x64.grad, dtype)
    assert_close(w.grad, w64.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [apply_rotary, apply_rotary_reference], ids=["kernel", "reference"])
def test_rotary(fn, dtype):
    B, T, H, hd = 2, 7, 3, 20
    qkv = randn(B, T, 3, H, hd, dtype=dtype).requires_grad_()
    x = qkv[:, :, 1]  # a strided view, as when q/k/v come out of one fused projection
    angles = torch.rand(T, hd // 2, device=DEVICE) * 6.3
    cos, sin = angles.cos(), angles.sin()
    dy = randn(B, H, T, hd, dtype=dtype).transpose(1, 2)  # a strided incoming gradient too
    y = fn(x, cos, sin)
    y.backward(dy)

    # truth: (x1 + i x2) * (cos + i sin), in float64
    qkv64 = f64(qkv)
    x64 = qkv64[:, :, 1]
    z = torch.complex(x64[..., : hd // 2], x64[..., hd // 2:])
    z = z * torch.complex(cos.double(), sin.double())[None, :, None, :]
    y64 = torch.cat([z.real, z.imag], dim=-1)
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype)
    assert_close(qkv.grad, qkv64.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [swiglu, swiglu_reference], ids=["kernel", "reference"])
def test_swiglu(fn, dtype):
    fused = randn(2, 9, 3000, dtype=dtype, scale=2.0).requires_grad_()
    gate, up = fused.chunk(2, dim=-1)  # row-strided views; 1500 columns = 1.5 blocks
    dy = randn(2, 9, 1500, dtype=dtype)
    y = fn(gate, up)
    y.backward(dy)

    fused64 = f64(fused)
    gate64, up64 = fused64.chunk(2, dim=-1)
    y64 = F.silu(gate64) * up64
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype)
    assert_close(fused.grad, fused64.grad, dtype)


def reference_ce(h, weight, targets, ignore_index=-1, chunk_size=None):
    """The plain reference has no chunks; chunk_size only shapes the fused version."""
    return linear_cross_entropy_reference(h, weight, targets, ignore_index)


def ce_truth(h, weight, targets, ignore_index):
    h64, w64 = f64(h), f64(weight)
    token_losses = F.cross_entropy(h64 @ w64.t(), targets, ignore_index=ignore_index,
                                   reduction="none")
    return h64, w64, token_losses


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size, ignore_index", [(16, -1), (None, -100)])
@pytest.mark.parametrize("fn", [linear_cross_entropy, reference_ce], ids=["kernel", "reference"])
def test_linear_cross_entropy(fn, chunk_size, ignore_index, dtype, monkeypatch):
    N, D, V = 37, 24, 5000  # the vocabulary spans 1.2 kernel blocks
    # chunk_size=16 gives chunks of 16, 16, 5; None picks them itself, and this small logits
    # budget makes that 10, 10, 10, 7 (float32) or 19, 18 (bfloat16)
    monkeypatch.setattr(cross_entropy_module, "_CHUNK_BYTES", 64 * V)
    h = randn(N, D, dtype=dtype).requires_grad_()
    weight = randn(V, D, dtype=dtype, scale=0.3).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    targets[::4] = ignore_index
    loss, token_losses = fn(h, weight, targets, ignore_index=ignore_index,
                            chunk_size=chunk_size)
    (1.7 * loss).backward()  # a non-unit incoming gradient must scale the saved grads

    h64, w64, token_losses64 = ce_truth(h, weight, targets, ignore_index)
    loss64 = token_losses64.sum() / (targets != ignore_index).sum()
    (1.7 * loss64).backward()
    assert loss.dtype == token_losses.dtype == torch.float32 and loss.dim() == 0
    assert not token_losses.requires_grad
    assert h.grad.dtype == weight.grad.dtype == dtype
    assert (token_losses[targets == ignore_index] == 0).all()
    assert_close(loss, loss64, dtype)
    assert_close(token_losses, token_losses64, dtype)
    assert_close(h.grad, h64.grad, dtype)
    assert_close(weight.grad, w64.grad, dtype)


@pytest.mark.parametrize("fn", [linear_cross_entropy, reference_ce], ids=["kernel", "reference"])
def test_linear_cross_entropy_all_ignored(fn):
    h = randn(10, 8).requires_grad_()
    weight = randn(50, 8).requires_grad_()
    targets = torch.full((10,), -1, device=DEVICE)
    loss, token_losses = fn(h, weight, targets, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0  # not NaN
    assert (token_losses == 0).all()
    assert (h.grad == 0).all() and (weight.grad == 0).all()


@pytest.mark.parametrize("fn", [linear_cross_entropy, reference_ce], ids=["kernel", "reference"])
def test_linear_cross_entropy_without_grad(fn):
    # evaluation calls it under no_grad (no gradient work), and a frozen head needs only grad_h
    h = randn(21, 16).requires_grad_()
    weight = randn(300, 16)
    targets = torch.randint(0, 300, (21,), device=DEVICE)
    loss, token_losses = fn(h, weight, targets, chunk_size=8)
    with torch.no_grad():
        loss_ng, token_losses_ng = fn(h, weight, targets, chunk_size=8)
    assert not loss_ng.requires_grad
    assert torch.equal(loss, loss_ng) and torch.equal(token_losses, token_losses_ng)
    loss.backward()
    h64, w64, token_losses64 = ce_truth(h, weight, targets, -1)
    token_losses64.mean().backward()
    assert_close(h.grad, h64.grad, torch.float32)


@pytest.mark.parametrize("fn", [linear_cross_entropy, reference_ce], ids=["kernel", "reference"])
def test_linear_cross_entropy_autocast(fn):
    # float32 master weights under bf16 autocast: bf16 matmuls, float32 gradients
    h = randn(19, 32).requires_grad_()
    weight = randn(700, 32, scale=0.3).requires_grad_()
    targets = torch.randint(0, 700, (19,), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, _ = fn(h, weight, targets, chunk_size=8)
    loss.backward()
    assert loss.dtype == torch.float32
    assert h.grad.dtype == weight.grad.dtype == torch.float32
    h64, w64, token_losses64 = ce_truth(h.bfloat16(), weight.bfloat16(), targets, -1)
    token_losses64.mean().backward()
    assert_close(loss, token_losses64.mean(), torch.bfloat16)
    assert_close(h.grad, h64.grad, torch.bfloat16)
    assert_close(weight.grad, w64.grad, torch.bfloat16)


@pytest.mark.skipif(INTERPRET, reason="torch.compile of Triton kernels needs a GPU")
def test_compiled_kernels_match_eager():
    # one graph, no breaks at the kernels (fullgraph=True), same numbers as eager
    def f(x, w, cos, sin, fused, weight, targets):
        y = rms_norm(x, w, 1e-5)
        y = apply_rotary(y.view(4, 64, 2, 32), cos, sin).reshape(256, 64)
        y = y + swiglu(*fused.chunk(2, dim=-1))
        loss, _ = linear_cross_entropy(y, weight, targets, chunk_size=96)
        return loss

    x = randn(4, 64, 64, dtype=torch.bfloat16).requires_grad_()
    w = randn(64).requires_grad_()
    angles = torch.rand(64, 16, device=DEVICE)
    fused = randn(256, 128, dtype=torch.bfloat16).requires_grad_()
    weight = randn(1000, 64, dtype=torch.bfloat16, scale=0.3).requires_grad_()
    targets = torch.randint(0, 1000, (256,), device=DEVICE)
    args = (x, w, angles.cos(), angles.sin(), fused, weight, targets)
    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        loss = fn(*args)
        loss.backward()
        results.append([loss.detach()] + [a.grad for a in (x, w, fused, weight)])
        for a in (x, w, fused, weight):
            a.grad = None
    for eager, compiled in zip(*results):
        assert_close(compiled, eager, torch.bfloat16)
