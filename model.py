"""
The vision-language model: a decoder-only transformer that reads text, and a patch encoder
whose outputs take the place of the <|image|> placeholder tokens in the sequence.

    images [N, H, W, 3] --PatchEncoder--> [N, P, d_model] --+
    tokens [B, T] --embedding--> [B, T, d_model] --(placeholders replaced)--> decoder --> head

The decoder is Llama-style: RMSNorm, rotary position embeddings, SwiGLU, optional grouped-query
attention, causal scaled_dot_product_attention. An image row therefore reads its P image
tokens, then its caption, under plain causal attention, as in the study (DESIGN.md).
The row-wise and elementwise ops and the fused head + cross-entropy come from kernels/: the
Triton versions when config.use_kernels is on, their plain PyTorch references otherwise.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


@dataclass
class ModelConfig:
    vocab_size: int = 100352
    block_size: int = 2048  # longest sequence the rotary tables cover
    n_layer: int = 24
    n_head: int = 16
    n_kv_head: int = 16  # fewer than n_head: grouped-query attention
    n_embd: int = 2048
    ffn_hidden: int = 5632  # SwiGLU width
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # the patch encoder
    image_size: int = 32
    patch_size: int = 8
    vit_depth: int = 0  # 0 = the study's plain patch projection
    vit_width: int = 256
    vit_heads: int = 4
    image_token_id: int = 100261
    use_kernels: bool = False  # Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1)

    @property
    def tokens_per_image(self):
        return (self.image_size // self.patch_size) ** 2


class Ops:
    """The four hot ops, from Triton kernels or from their PyTorch references."""

    def __init__(self, use_kernels):
        if use_kernels:
            self.rms_norm, self.apply_rotary = kernels.rms_norm, kernels.apply_rotary
            self.swiglu, self.linear_cross_entropy = kernels.swiglu, kernels.linear_cross_entropy
        else:
            self.rms_norm, self.apply_rotary = kernels.rms_norm_reference, kernels.apply_rotary_reference
            self.swiglu = kernels.swiglu_reference
            self.linear_cross_entropy = kernels.linear_cross_entropy_reference


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.ops = eps, ops

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, causal, ops):
        super().__init__()
        assert dim % n_head == 0 and n_head % n_kv_head == 0
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.causal, self.ops = causal, ops
        self.qkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope=None, cache=None):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)
        if rope is not None:
            cos, sin = rope
            q, k = self.ops.apply_rotary(q, cos, sin), self.ops.apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if cache is not None:
            k, v = cache.append(k, v)
        # With a cache, a prompt (T > 1) is always fed at position 0, so the usual causal mask
        # applies; a single new token may attend to everything cached.
        is_causal = self.causal and T > 1
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim, hidden, ops):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # one matmul for both halves
        self.down = nn.Linear(hidden, dim, bias=False)
        self.ops = ops

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.ops.swiglu(gate, up))


class Block(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, hidden, eps, causal, ops):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps, ops)
        self.attn = Attention(dim, n_head, n_kv_head, causal, ops)
        self.norm2 = RMSNorm(dim, eps, ops)
        self.mlp = MLP(dim, hidden, ops)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.norm1(x), rope, cache)
        return x + self.mlp(self.norm2(x))


class PatchEncoder(nn.Module):
    """Images to decoder-width embeddings: cut into patches, embed each linearly, run
    vit_depth bidirectional blocks over them, then an MLP projector. With vit_depth = 0 this
    is the study's plain patch projection."""

    def __init__(self, config, ops):
        super().__init__()
        c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        self.patch_size = c.patch_size
        self.patch_embed = nn.Linear(3 * c.patch_size ** 2, c.vit_width)
        self.pos_embed = nn.Parameter(torch.zeros(c.tokens_per_image, c.vit_width))
        self.blocks = nn.ModuleList(
            Block(c.vit_width, c.vit_heads, c.vit_heads, 4 * c.vit_width, c.norm_eps, False, ops)
            for _ in range(c.vit_depth))
        self.norm = RMSNorm(c.vit_width, c.norm_eps, ops)
        self.projector = nn.Sequential(nn.Linear(c.vit_width, c.n_embd), nn.GELU(),
                                       nn.Linear(c.n_embd, c.n_embd))

    def forward(self, images):
        N, H, W, _ = images.shape
        p = self.patch_size
        x = images.float() / 127.5 - 1.0  # uint8 -> [-1, 1]
        # [N, H, W, 3] -> [N, (H/p)*(W/p), p*p*3]: patches in reading order
        x = x.view(N, H // p, p, W // p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(N, -1, p * p * 3)
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.projector(self.norm(x))


class KVCache:
    """Keys and values of every layer for incremental decoding, allocated once per layer for
    the longest sequence (max_len) on that layer's first call."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.k, self.v = [], []
        self.pos, self.layer = 0, 0

    def append(self, k, v):
        """Stores this layer's new keys/values [B, heads, T, hd]; returns all of them so far."""
        T, i = k.shape[2], self.layer
        if i == len(self.k):
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k.append(k.new_empty(shape))
            self.v.append(v.new_empty(shape))
        self.k[i][:, :, self.pos:self.pos + T] = k
        self.v[i][:, :, self.pos:self.pos + T] = v
        self.layer += 1
        return self.k[i][:, :, :self.pos + T], self.v[i][:, :, :self.pos + T]

    def advance(self, T):
        self.pos, self.layer = self.pos + T, 0


def rotary_tables(head_dim, length, theta):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


class VLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.ops = ops = Ops(c.use_kernels)
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.n_kv_head, c.ffn_hidden, c.norm_eps, True, ops) for _ in range(c.n_layer))
        self.norm_f = RMSNorm(c.n_embd, c.norm_eps, ops)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.vision = PatchEncoder(c, ops)
        cos, sin = rotary_tables(c.n_embd // c.n_head, c.block_size, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's trick: scale the residual branches' output layers so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                depth = c.n_layer if name.startswith("blocks.") else max(c.vit_depth, 1)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * depth))
        nn.init.normal_(self.vision.pos_embed, mean=0.0, std=0.02)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, part="all"):
        """Parameters of the whole model, the decoder alone, or the patch encoder alone."""
        vision = sum(p.numel() for p in self.vision.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"all": total, "decoder": total - vision, "vision": vision}[part]

    def flops_per_token(self, seq_len):
        """Training matmul FLOPs per decoder token (forward + backward), DESIGN.md's count:
        6 x (decoder params - input embedding) + 6 x layers x d_model x seq (causal attention).
        The input embedding is a lookup, not a matmul; a tied head is still a matmul."""
        c = self.config
        matmul_params = self.num_params("decoder") - (0 if c.tie_embeddings else self.wte.weight.numel())
        return 6 * matmul_params + 6 * c.n_layer * c.n_embd * seq_len

    def embed(self, idx, images):
        """Token embeddings, with the k-th <|image|> placeholder (in reading order) replaced by
        the k-th image token: image i fills placeholders i*P .. i*P + P - 1."""
        x = self.wte(idx)
        if images is None or images.shape[0] == 0:  # a text-only batch
            return x
        image_tokens = self.vision(images).to(x.dtype).flatten(0, 1)  # [N * P, d_model]
        is_image = idx == self.config.image_token_id
        if not torch.compiler.is_compiling():
            found, expected = int(is_image.sum()), image_tokens.shape[0]
            if found != expected:
                raise ValueError(f"the batch has {found} <|image|> placeholders but {images.shape[0]} images "
                                 f"x {self.config.tokens_per_image} tokens = {expected}")
        # A gather + select keeps every shape static (no boolean indexing), for torch.compile.
        which = (is_image.flatten().cumsum(0) - 1).clamp(min=0).view_as(idx)
        return torch.where(is_image.unsqueeze(-1), image_tokens[which], x)

    def hidden_states(self, idx, images=None, cache=None):
        T = idx.shape[1]
        start = 0 if cache is None else cache.pos
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.embed(idx, images)
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm_f(x)

    def forward(self, idx, targets, images=None):
        """Returns (loss, token_losses): the mean cross-entropy over the targets that are not
        -1, and each position's loss ([B, T] float32, 0 where the target is -1)."""
        B, T = idx.shape
        h = self.hidden_states(idx, images)
        loss, token_losses = self.ops.linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
        if (images is None or images.shape[0] == 0) and torch.is_grad_enabled():
            # On a text-only batch the patch encoder takes no part. Touch each of its parameters
            # with weight 0 so every parameter still gets a (zero) gradient: DistributedDataParallel
            # expects that, and otherwise hangs or errors. The training loop then drops these
            # zero gradients so the optimizer leaves the encoder exactly as it was.
            loss = loss + 0.0 * sum(p.view(-1)[0] for p in self.vision.parameters())
        return loss, token_losses.view(B, T)

    def logits(self, idx, images=None, cache=None, last_only=False):
        """Output logits (float32) for inference: every position, or the last one only."""
        h = self.hidden_states(idx, images, cache)
        if last_only:
            h = h[:, -1:]
        return F.linear(h, self.lm_head.weight.to(h.dtype)).float()

    @torch.no_grad()
    def generate_tokens(self, idx, images=None, max_new_tokens=16, temperature=0.0, top_k=None, stop_id=None,
                        generator=None):
        """Continues each row of idx [B, T] by up to max_new_tokens tokens with a KV cache,
        yielding each step's new tokens [B] as soon as they exist (so sample.py can print an
        answer while it is written): greedy when temperature is 0, else sampled (optionally
        from the top_k tokens). Rows that met stop_id keep emitting it; the steps end early
        once every row has stopped."""
        B, T = idx.shape
        cache = KVCache(T + max_new_tokens)
        logits = self.logits(idx, images, cache, last_only=True)[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            if temperature == 0.0:
                token = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
            if stop_id is not None:
                token = torch.where(done, torch.full_like(token, stop_id), token)
                done |= token == stop_id
            yield token
            if stop_id is not None and bool(done.all()):
                return
            if step + 1 < max_new_tokens:  # the last token is never fed back: no position needed
                logits = self.logits(token[:, None], None, cache, last_only=True)[:, -1]

    def generate(self, idx, images=None, max_new_tokens=16, temperature=0.0, top_k=None, stop_id=None,
                 generator=None):
        """generate_tokens, collected: the new tokens [B, n], n <= max_new_tokens."""
        return torch.stack(list(self.generate_tokens(idx, images, max_new_tokens, temperature, top_k, stop_id,
                                                     generator)), dim=1)


def configure_optimizer(model, learning_rate, weight_decay, betas, device_type):
    """AdamW over the trainable parameters, with weight decay on matrices only (not norms,
    biases or the patch position table)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and name != "vision.pos_embed" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")
