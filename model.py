"""
The vision-language model: a decoder-only transformer that reads text, and a vision encoder
plus MLP projector whose outputs take the place of the <|image|> placeholder tokens.

    images [N, H, W, 3] --encoder--> [N, P, width] --projector--> [N, P, d_model] --+
    tokens [B, T] --embedding--> [B, T, d_model] --(placeholders replaced)--> decoder --> head

The encoder is either a PatchEncoder trained from scratch (the toy default; at depth 0 the
study's plain patch projection, its ablation) or a pretrained SigLIP tower loaded from the
Hugging Face Hub (the study's model, usually frozen), whose weights vision_weights.py loads;
VISION_ENCODERS names them for the vision_encoder setting.
The decoder is Llama-style: RMSNorm, rotary position embeddings, SwiGLU, optional grouped-query
attention and qk-norm, causal scaled_dot_product_attention. An image row therefore reads its P
image tokens, then its caption, under plain causal attention, as in the study (Keh et al. 2025).
The row-wise and elementwise ops and the fused head + cross-entropy come from kernels/: the
Triton versions when config.use_kernels is on, their plain PyTorch references otherwise.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from data.errors import MissingFileError, UserError


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
    qk_norm: bool = False  # normalise queries and keys before attention, as OpenLM (see Attention)
    # the vision encoder: "patches" (a PatchEncoder trained from scratch) or "siglip" (a
    # pretrained SigLIP tower; the weights' source is a script setting, vision_weights)
    vision_encoder: str = "patches"
    image_size: int = 32
    patch_size: int = 8
    # PatchEncoder: vit_depth bidirectional blocks (0 = the study's plain patch projection)
    vit_depth: int = 0
    vit_width: int = 256
    vit_heads: int = 4
    # SigLIP: the tower's shape, copied from its checkpoint's config.json by siglip_config(),
    # so that a checkpoint of ours rebuilds the tower without downloading anything
    siglip_width: int = 768
    siglip_depth: int = 12  # blocks in the pretrained tower
    siglip_heads: int = 12
    siglip_mlp: int = 3072
    siglip_eps: float = 1e-6
    # Which block's patch features feed the projector, counted like Hugging Face's
    # hidden_states: -1 the last block's output, -2 the one before (Prismatic, the study's
    # VLM codebase). Blocks after it are never built.
    siglip_feature_layer: int = -2
    # uint8 pixels are scaled to [0, 1], then normalised per channel (SigLIP: 0.5, 0.5 -> [-1, 1])
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    image_token_id: int = 100261
    use_kernels: bool = False  # Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1)

    @property
    def tokens_per_image(self):
        return (self.image_size // self.patch_size) ** 2


# The ModelConfig fields that a pretraining script's settings of the same name set as they are.
MODEL_SETTINGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "rope_theta", "tie_embeddings", "qk_norm",
                  "vision_encoder", "image_size", "patch_size", "vit_depth", "vit_width", "vit_heads",
                  "siglip_feature_layer")


def model_config_from_settings(settings, vocab_size, image_token_id, weights_folder=None, use_kernels=False):
    """The ModelConfig that pretraining settings describe (pretrain.py's settings after its
    config files and --key=value overrides): the one place where settings become a model, for
    pretrain.py, bench.py and sweep.py alike. The context (block_size) is seq_len. A pretrained
    encoder's shape and normalisation come from its checkpoint folder `weights_folder`
    (vision_weights.py finds it); without a folder they are ModelConfig's defaults (SigLIP-B/16
    at 224's), which is enough for estimates that must not download anything."""
    s = settings
    if s["vision_encoder"] not in VISION_ENCODERS:
        raise UserError(f"vision_encoder must be one of {tuple(VISION_ENCODERS)}, got {s['vision_encoder']!r} "
                        "(a pretrained checkpoint is named by vision_weights)")
    fields = {name: s[name] for name in MODEL_SETTINGS}
    if weights_folder is not None:
        tower = VISION_ENCODERS[s["vision_encoder"]].config_fields(weights_folder)
        for key in ("image_size", "patch_size"):  # settings the data depends on: they must agree
            if key in tower and tower[key] != s[key]:
                raise UserError(f"{key} is {s[key]}, but the vision encoder {s['vision_weights']} takes {tower[key]}")
        fields.update(tower)
    return ModelConfig(vocab_size=vocab_size, block_size=s["seq_len"], image_token_id=image_token_id,
                       use_kernels=use_kernels, **fields)


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


def attention(q, k, v, causal, mask=None):
    """Softmax attention over q [B, H, Tq, hd] and k, v [B, H_kv, Tk, hd] (H a multiple of H_kv:
    grouped-query attention); causal masks position j > i. A boolean mask [B, 1, Tq, Tk] (True:
    may attend) replaces the causal one: packed conversations, each reading only itself
    (VLM.hidden_states). On CUDA, PyTorch's fused kernels (flash without a mask; with one, the
    memory-efficient kernel, which takes masks). On the CPU, the explicit form: at a few hundred
    positions it trains about 1.7x faster there than PyTorch's CPU flash kernel (bench_cpu.py),
    and its [Tq, Tk] scores are small at such lengths."""
    if q.is_cuda:
        gqa = k.shape[1] != q.shape[1]
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # scaling q is cheaper than scaling scores
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif causal:
        Tq, Tk = scores.shape[-2:]
        scores = scores + torch.full((Tq, Tk), float("-inf"), dtype=scores.dtype, device=q.device).triu(1)
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, causal, ops, qk_norm=False, eps=1e-5):
        super().__init__()
        assert dim % n_head == 0 and n_head % n_kv_head == 0
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.causal, self.ops = causal, ops
        self.qkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            # qk-norm as OpenLM (mlfoundations/open_lm, CustomAttn) applies it: one LayerNorm
            # with a gain and no bias (DCLM's "gain_only_lp_layer_norm") over all heads'
            # queries together, one over the keys, before rotary. It bounds the attention
            # logits, which is what lets the study's decoder train at a peak LR of 1e-2.
            self.q_norm = nn.LayerNorm(n_head * self.head_dim, eps=eps, bias=False)
            self.k_norm = nn.LayerNorm(n_kv_head * self.head_dim, eps=eps, bias=False)

    def forward(self, x, rope=None, cache=None, mask=None):
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, T, -1, hd), k.view(B, T, -1, hd), v.view(B, T, -1, hd)
        if rope is not None:
            cos, sin = rope
            q, k = self.ops.apply_rotary(q, cos, sin), self.ops.apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if cache is not None:
            k, v = cache.append(k, v)
        # With a cache, a prompt (T > 1) is always fed at position 0, so the usual causal mask
        # applies; a single new token may attend to everything cached.
        y = attention(q, k, v, causal=self.causal and T > 1, mask=mask)
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
    def __init__(self, dim, n_head, n_kv_head, hidden, eps, causal, ops, qk_norm=False):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps, ops)
        self.attn = Attention(dim, n_head, n_kv_head, causal, ops, qk_norm, eps)
        self.norm2 = RMSNorm(dim, eps, ops)
        self.mlp = MLP(dim, hidden, ops)

    def forward(self, x, rope=None, cache=None, mask=None):
        x = x + self.attn(self.norm1(x), rope, cache, mask)
        return x + self.mlp(self.norm2(x))


class Pixels(nn.Module):
    """uint8 images [N, H, W, 3] to the encoder's normalised float input."""

    def __init__(self, config):
        super().__init__()
        self.register_buffer("mean", torch.tensor(config.image_mean) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std) * 255, persistent=False)

    def forward(self, images):
        return (images.float() - self.mean) / self.std


# -----------------------------------------------------------------------------
# Vision encoders. Each one takes uint8 images [N, H, W, 3] to patch features [N, P, width] and
# owns three things: its modules, `config_fields` (the ModelConfig fields that a pretrained
# checkpoint folder fixes, {} for one trained from scratch) and `no_weight_decay` (its
# parameters that AdamW must not decay). VISION_ENCODERS below names them for the settings;
# vision_weights.py loads the pretrained ones' weights.

class PatchEncoder(nn.Module):
    """Trained from scratch: cut images into patches, embed each linearly, run vit_depth
    bidirectional blocks over them. With vit_depth = 0 this is the study's plain patch
    projection. Returns [N, P, vit_width]."""

    no_weight_decay = ("pos_embed",)  # a position table, like the norms: not a weight to shrink

    @staticmethod
    def config_fields(folder):
        return {}  # its shape is the settings' own

    def __init__(self, config, ops):
        super().__init__()
        c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        self.patch_size, self.width = c.patch_size, c.vit_width
        self.pixels = Pixels(c)
        self.patch_embed = nn.Linear(3 * c.patch_size ** 2, c.vit_width)
        self.pos_embed = nn.Parameter(torch.zeros(c.tokens_per_image, c.vit_width))
        self.blocks = nn.ModuleList(
            Block(c.vit_width, c.vit_heads, c.vit_heads, 4 * c.vit_width, c.norm_eps, False, ops)
            for _ in range(c.vit_depth))
        self.norm = RMSNorm(c.vit_width, c.norm_eps, ops)

    def forward(self, images):
        N, H, W, _ = images.shape
        p = self.patch_size
        x = self.pixels(images)
        # [N, H, W, 3] -> [N, (H/p)*(W/p), p*p*3]: patches in reading order
        x = x.view(N, H // p, p, W // p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(N, -1, p * p * 3)
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class SiglipBlock(nn.Module):
    """One block of SigLIP's vision tower: pre-LayerNorm (with bias), biased multi-head
    attention over all patches, and a GELU (tanh) MLP. Module names follow the Hub
    checkpoint's, so vision_weights.load_siglip's mapping stays short."""

    def __init__(self, width, heads, mlp_width, eps):
        super().__init__()
        self.heads = heads
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.fc1, self.fc2 = nn.Linear(width, mlp_width), nn.Linear(mlp_width, width)

    def forward(self, x):
        N, P, W = x.shape
        h = self.layer_norm1(x)
        q, k, v = (proj(h).view(N, P, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        x = x + self.out_proj(attention(q, k, v, causal=False).transpose(1, 2).reshape(N, P, W))
        return x + self.fc2(F.gelu(self.fc1(self.layer_norm2(x)), approximate="tanh"))


class SiglipEncoder(nn.Module):
    """SigLIP's vision tower up to siglip_feature_layer: a patch convolution (the image's
    border beyond a whole number of patches is dropped, as in SigLIP: 384 / 14 gives 27 x 27),
    a learnt position table, then the blocks. No CLS token. Returns [N, P, siglip_width]:
    the chosen block's patch features, without the final LayerNorm (as Prismatic takes them)."""

    no_weight_decay = ("pos_embed",)

    @staticmethod
    def config_fields(folder):
        """The tower's shape and normalisation, from its checkpoint folder (siglip_config)."""
        return siglip_config(folder)

    def __init__(self, config, ops=None):  # ops: the decoder's kernels; SigLIP's blocks are plain PyTorch
        super().__init__()
        c = config
        used = c.siglip_feature_layer if c.siglip_feature_layer >= 0 else c.siglip_depth + 1 + c.siglip_feature_layer
        if not 1 <= used <= c.siglip_depth:
            raise ValueError(f"siglip_feature_layer {c.siglip_feature_layer} picks no block of a "
                             f"{c.siglip_depth}-block tower (use 1..{c.siglip_depth}, or -1..-{c.siglip_depth})")
        self.width, self.depth = c.siglip_width, c.siglip_depth
        self.pixels = Pixels(c)
        self.patch_embed = nn.Conv2d(3, c.siglip_width, c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(c.tokens_per_image, c.siglip_width))
        self.blocks = nn.ModuleList(SiglipBlock(c.siglip_width, c.siglip_heads, c.siglip_mlp, c.siglip_eps)
                                    for _ in range(used))

    def forward(self, images):
        x = self.pixels(images).permute(0, 3, 1, 2)  # [N, 3, H, W]
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # patches in reading order
        for block in self.blocks:
            x = block(x)
        return x


def siglip_config(folder):
    """The ModelConfig fields that describe the SigLIP tower in `folder`: its shape from
    config.json (a full SiglipModel's, whose vision_config holds it, or a vision-only
    model's), its normalisation from preprocessor_config.json."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise MissingFileError(f"{path} does not exist: not a SigLIP checkpoint folder")
    with open(path) as f:
        config = json.load(f)
    if config.get("model_type") not in ("siglip", "siglip_vision_model"):
        raise UserError(f"{path}: model_type is {config.get('model_type')!r}, not a SigLIP model")
    vision = config.get("vision_config", config)
    # A Hub config.json may leave out values equal to transformers' SiglipVisionConfig
    # defaults (SigLIP-B/16 at 224's), so those defaults fill any gap.
    if vision.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UserError(f"{path}: hidden_act {vision['hidden_act']!r}; SiglipBlock implements GELU (tanh) only")
    fields = dict(vision_encoder="siglip", image_size=vision.get("image_size", 224),
                  patch_size=vision.get("patch_size", 16), siglip_width=vision.get("hidden_size", 768),
                  siglip_depth=vision.get("num_hidden_layers", 12), siglip_heads=vision.get("num_attention_heads", 12),
                  siglip_mlp=vision.get("intermediate_size", 3072), siglip_eps=vision.get("layer_norm_eps", 1e-6))
    # A vision-only folder saved without its image processor keeps ModelConfig's default
    # normalisation, which is SigLIP's (mean 0.5, std 0.5).
    processor = os.path.join(folder, "preprocessor_config.json")
    if os.path.exists(processor):
        with open(processor) as f:
            processor = json.load(f)
        fields.update(image_mean=tuple(processor["image_mean"]), image_std=tuple(processor["image_std"]))
    return fields


VISION_ENCODERS = {  # the vision_encoder setting -> its module
    "patches": PatchEncoder,
    "siglip": SiglipEncoder,
}


class Vision(nn.Module):
    """Images to decoder-width embeddings [N, P, d_model]: the encoder, then an MLP projector
    (Linear, GELU, Linear: Prismatic's "gelu-mlp"). freeze_vision freezes the encoder only."""

    def __init__(self, config, ops):
        super().__init__()
        if config.vision_encoder not in VISION_ENCODERS:
            raise ValueError(f"vision_encoder must be one of {tuple(VISION_ENCODERS)}, got {config.vision_encoder!r}")
        self.encoder = VISION_ENCODERS[config.vision_encoder](config, ops)
        self.projector = nn.Sequential(nn.Linear(self.encoder.width, config.n_embd), nn.GELU(),
                                       nn.Linear(config.n_embd, config.n_embd))

    def forward(self, images):
        return self.projector(self.encoder(images))


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
            Block(c.n_embd, c.n_head, c.n_kv_head, c.ffn_hidden, c.norm_eps, True, ops, c.qk_norm)
            for _ in range(c.n_layer))
        self.norm_f = RMSNorm(c.n_embd, c.norm_eps, ops)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.vision = Vision(c, ops)
        cos, sin = rotary_tables(c.n_embd // c.n_head, c.block_size, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Random initialisation happens here, at construction, and only here: pretrained
        # weights (vision_weights.py, a checkpoint's state dict) are loaded afterwards, so nothing
        # ever overwrites them.
        self.apply(self._init_weights)
        # GPT-2's trick: scale the residual branches' output layers so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                depth = c.n_layer if name.startswith("blocks.") else max(c.vit_depth, 1)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * depth))
        pos_embed = getattr(self.vision.encoder, "pos_embed", None)  # an encoder's learnt position table
        if pos_embed is not None:
            nn.init.normal_(pos_embed, mean=0.0, std=0.02)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_trainable(self, encoder=True, decoder=True):
        """Freezes the vision encoder and/or the decoder (the embeddings, blocks and head); the
        projector always trains. Call it before configure_optimizer: frozen parameters get no
        optimizer state."""
        for name, p in self.named_parameters():
            p.requires_grad = encoder if name.startswith("vision.encoder.") else \
                True if name.startswith("vision.") else decoder

    def num_params(self, part="all"):
        """Parameters of the whole model, the decoder alone, or the vision encoder and
        projector together."""
        vision = sum(p.numel() for p in self.vision.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"all": total, "decoder": total - vision, "vision": vision}[part]

    def flops_per_token(self, seq_len):
        """Training matmul FLOPs per decoder token (forward + backward), the usual MFU count:
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

    def hidden_states(self, idx, images=None, cache=None, segments=None):
        """The decoder's last hidden states [B, T, d_model]. segments [B, T] (optional) numbers
        the documents packed into each row: a position attends only to earlier positions of its
        own document, so each reads as if alone in its row (rotary embeddings see only the
        distance between positions, not where the document starts)."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.pos
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        mask = None
        if segments is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (segments.unsqueeze(2) == segments.unsqueeze(1)).unsqueeze(1) & causal  # [B, 1, T, T]
        x = self.embed(idx, images)
        for block in self.blocks:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.advance(T)
        return self.norm_f(x)

    def forward(self, idx, targets, images=None, segments=None):
        """Returns (loss, token_losses): the mean cross-entropy over the targets that are not
        -1, and each position's loss ([B, T] float32, 0 where the target is -1). segments: see
        hidden_states."""
        B, T = idx.shape
        h = self.hidden_states(idx, images, segments=segments)
        loss, token_losses = self.ops.linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
        if (images is None or images.shape[0] == 0) and torch.is_grad_enabled():
            # On a text-only batch the vision encoder and projector take no part. Touch each of
            # their trainable parameters with weight 0 so every one still gets a (zero)
            # gradient: DistributedDataParallel expects that, and otherwise hangs or errors
            # (frozen parameters are not DDP's concern). The training loop then drops these
            # zero gradients so the optimizer leaves them exactly as they were.
            loss = loss + 0.0 * sum(p.view(-1)[0] for p in self.vision.parameters() if p.requires_grad)
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
    """AdamW over the trainable parameters (frozen ones get no optimizer state), with weight
    decay on matrices only (not norms, biases or what the encoder names in no_weight_decay)."""
    exempt = {f"vision.encoder.{name}" for name in model.vision.encoder.no_weight_decay}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and name not in exempt else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)
