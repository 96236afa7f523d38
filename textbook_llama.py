"""
The baseline that bench.py and bench_cpu.py measure our decoder against: a Llama-style decoder
the way a tutorial writes it, in plain PyTorch. Both benchmarks import it from here.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class TextbookLlama(nn.Module):
    """The baseline: a Llama-style decoder the way a tutorial writes it, in plain PyTorch. Same
    shape and parameter count as our decoder, but separate q/k/v and SwiGLU matmuls, nn.RMSNorm,
    rotate-half rotary, and an nn.Linear head whose full [tokens, vocab] logits go to
    F.cross_entropy. Only torch.compile speeds it up."""

    def __init__(self, c):
        super().__init__()
        self.n_layer, self.n_embd, self.n_head, self.n_kv_head = c.n_layer, c.n_embd, c.n_head, c.n_kv_head
        hd = c.n_embd // c.n_head
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.layers = nn.ModuleList()
        for _ in range(c.n_layer):
            layer = nn.Module()
            layer.attn_norm, layer.mlp_norm = nn.RMSNorm(c.n_embd, c.norm_eps), nn.RMSNorm(c.n_embd, c.norm_eps)
            layer.wq = nn.Linear(c.n_embd, c.n_head * hd, bias=False)
            layer.wk = nn.Linear(c.n_embd, c.n_kv_head * hd, bias=False)
            layer.wv = nn.Linear(c.n_embd, c.n_kv_head * hd, bias=False)
            layer.wo = nn.Linear(c.n_embd, c.n_embd, bias=False)
            # qk-norm as our decoder has it (config/1b.py, OpenLM): LayerNorm over all heads' q, k
            layer.q_norm = nn.LayerNorm(c.n_head * hd, c.norm_eps, bias=False) if c.qk_norm else nn.Identity()
            layer.k_norm = nn.LayerNorm(c.n_kv_head * hd, c.norm_eps, bias=False) if c.qk_norm else nn.Identity()
            layer.w1 = nn.Linear(c.n_embd, c.ffn_hidden, bias=False)
            layer.w3 = nn.Linear(c.n_embd, c.ffn_hidden, bias=False)
            layer.w2 = nn.Linear(c.ffn_hidden, c.n_embd, bias=False)
            self.layers.append(layer)
        self.norm = nn.RMSNorm(c.n_embd, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
        angles = torch.outer(torch.arange(c.block_size).float(), inv_freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def flops_per_token(self, seq_len):
        """The same count as model.VLM.flops_per_token."""
        matmul_params = sum(p.numel() for p in self.parameters()) - self.wte.weight.numel()
        return 6 * matmul_params + 6 * self.n_layer * self.n_embd * seq_len

    def forward(self, idx, targets):
        B, T = idx.shape
        cos, sin = self.cos[:T], self.sin[:T]

        def rotate(x):
            x1, x2 = x.chunk(2, dim=-1)
            return x * cos + torch.cat((-x2, x1), dim=-1) * sin

        x = self.wte(idx)
        for layer in self.layers:
            h = layer.attn_norm(x)
            q = layer.q_norm(layer.wq(h)).view(B, T, self.n_head, -1).transpose(1, 2)
            k = layer.k_norm(layer.wk(h)).view(B, T, self.n_kv_head, -1).transpose(1, 2)
            v = layer.wv(h).view(B, T, self.n_kv_head, -1).transpose(1, 2)
            y = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True,
                                               enable_gqa=self.n_kv_head != self.n_head)
            x = x + layer.wo(y.transpose(1, 2).reshape(B, T, -1))
            h = layer.mlp_norm(x)
            x = x + layer.w2(F.silu(layer.w1(h)) * layer.w3(h))
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.view(B * T, -1), targets.view(-1), ignore_index=-1)
