"""Output projection fused with cross-entropy, never holding the full (N x V) logits.

With a 100k vocabulary, N = 16k tokens of float32 logits is 6.6 GB, and eager PyTorch keeps
several such tensors alive. Instead we walk the tokens in chunks. For each chunk:
    logits      = h_chunk @ W^T                      (input dtype, e.g. bf16)
    loss        = logsumexp(logits) - logits[target]  (float32)
    grad_logits = (softmax(logits) - onehot(target)) / n_valid, written over the logits
    grad_h      = grad_logits @ W,   grad_W += grad_logits^T @ h_chunk   (fp32 accumulator)
The gradients are computed in the forward pass, while the chunk's logits are at hand,
so the head costs three matmuls in all (not four: the backward never recomputes logits);
the backward only scales them by the incoming gradient of the loss.

Each chunk's loss and gradient come from one Triton kernel (one program per row, two passes
over the vocabulary). The reference is what a textbook writes, and what runs on the CPU:
the full logits, in float32, into F.cross_entropy.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Upper bound on one chunk's logits. At 16,384 tokens x 100,352 vocab in bf16 (3.3 GB of
# logits) this gives 4 chunks of 4,096 rows: matmuls big enough to run at full speed.
_CHUNK_BYTES = 1 << 30

# Vocabulary columns a program handles per loop step.
_BLOCK_V = 4096


@triton.jit
def _ce_chunk_kernel(logits_ptr, targets_ptr, losses_ptr, scale_ptr, ignore_index,
                     V: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # V is a compile-time constant (one compile per vocabulary size): the Triton 3.6
    # interpreter cannot loop to a runtime bound under numpy >= 2.4 (triton-lang/triton#9171).
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * V
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    # masked, since an ignored target (e.g. -1) is no column; a masked load reads nothing
    target_logit = tl.load(row_ptr + target, mask=valid, other=0.0).to(tl.float32)

    # Pass 1: online logsumexp. Keep a running max m and the sum of exp(x - m), rescaling
    # the sum whenever m grows, so the row is read once and nothing overflows.
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(losses_ptr + row, tl.where(valid, lse - target_logit, 0.0))

    # Pass 2: grad_logits = (softmax - onehot) * scale, over the logits in place.
    if COMPUTE_GRAD:
        row_scale = tl.where(valid, tl.load(scale_ptr), 0.0)  # 1/n_valid, or 0 if ignored
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            grad = tl.where(cols == target, p - 1.0, p) * row_scale
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def launch_settings(V):
    """Compile-time settings for a vocabulary of V (kernels/ahead_of_time.py compiles with these)."""
    return {"V": V, "BLOCK_V": min(_BLOCK_V, triton.next_power_of_2(V)), "num_warps": 8}


def _chunk_loss(logits, targets, scale, ignore_index, compute_grad):
    C, V = logits.shape
    losses = torch.empty(C, device=logits.device, dtype=torch.float32)
    _ce_chunk_kernel[(C,)](logits, targets, losses, scale, ignore_index, COMPUTE_GRAD=compute_grad,
                           **launch_settings(V))
    return losses, (logits if compute_grad else None)


def _chunked_forward(h, weight, targets, ignore_index, chunk_size, need_grad_h, need_grad_w):
    N, V = h.shape[0], weight.shape[0]
    if chunk_size is None:
        # power-of-two chunk count: equal chunks whenever N is a multiple of it
        n_chunks = triton.next_power_of_2(triton.cdiv(N * V * h.element_size(), _CHUNK_BYTES))
        chunk_size = triton.cdiv(N, n_chunks)
    # A tensor, not a Python number: no host sync, and no graph break under torch.compile.
    n_valid = (targets != ignore_index).sum()
    scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)
    compute_grad = need_grad_h or need_grad_w
    grad_h = torch.empty_like(h) if need_grad_h else None
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) \
        if need_grad_w else None
    token_losses = []
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        h_chunk = h[start:end]
        logits = h_chunk @ weight.t()
        losses, grad_logits = _chunk_loss(logits, targets[start:end], scale, ignore_index, compute_grad)
        token_losses.append(losses)
        if need_grad_h:
            grad_h[start:end] = grad_logits @ weight
        if need_grad_w:
            grad_w += grad_logits.t() @ h_chunk
        del logits, grad_logits  # free this chunk's buffer before the next one is allocated
    token_losses = torch.cat(token_losses)
    loss = token_losses.sum() * scale
    if need_grad_w:
        grad_w = grad_w.to(weight.dtype)
    return loss, token_losses, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_size):
        need_grad_h, need_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, token_losses, grad_h, grad_w = _chunked_forward(
            h, weight, targets, ignore_index, chunk_size, need_grad_h, need_grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(token_losses)
        return loss, token_losses

    @staticmethod
    def backward(ctx, grad_loss, grad_token_losses):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss if grad_h is not None else None
        grad_w = grad_w * grad_loss if grad_w is not None else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy_reference(h, weight, targets, ignore_index=-1):
    """What the fused version computes, written plainly: float32 logits, only at the positions
    that have a target (fine-tuning's answers are a few of each conversation's positions).
    Returns (loss, token_losses) as linear_cross_entropy does."""
    trained = (targets != ignore_index).nonzero().squeeze(1)
    losses = F.cross_entropy(F.linear(h[trained], weight).float(), targets[trained], reduction="none")
    token_losses = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
    token_losses[trained] = losses.detach()
    return losses.sum() / max(len(trained), 1), token_losses


def linear_cross_entropy(h, weight, targets, ignore_index=-1, chunk_size=None):
    """Mean cross-entropy of (h @ weight.T) against targets over non-ignored tokens.

    h [N, D], weight [V, D], targets [N] int64. Returns (loss, token_losses): loss is a
    0-dim float32 tensor (0 if every target is ignored), token_losses a detached float32
    [N] tensor with 0 at ignored positions. chunk_size: tokens per chunk (None: automatic).
    """
    device = h.device.type
    # Autocast does not reach inside a custom function, so do what it would do to a linear
    # layer: run the matmuls in the autocast dtype. The casts' own backward returns the
    # gradients in the callers' dtypes (e.g. float32 master weights).
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        h, weight = h.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_size)
        # no gradient wanted (evaluation): losses only
        loss, token_losses, _, _ = _chunked_forward(h, weight, targets, ignore_index, chunk_size, False, False)
        return loss, token_losses
