"""
Writes a checkpoint's decoder as a Hugging Face LlamaForCausalLM folder (config.json and
model.safetensors), so it loads with the tools people already use:

    python export_hf.py --ckpt=out/toy_sft/ckpt.pt --out_dir=out/toy_sft/hf

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/toy_sft/hf")

Our decoder is a Llama (RMSNorm, rotary embeddings on the half-split layout that Llama's
rotate_half uses, SwiGLU, grouped-query attention, no biases), so the export renames weights and
splits our fused qkv and gate_up matrices; the logits equal ours (tested in float32).
What does not carry over:
  - the vision encoder and projector: a Llama reads text only, so the export is for text tasks;
  - qk-norm (ModelConfig.qk_norm): Llama has no norm on queries and keys, so such a model is
    refused (Qwen3's architecture has one, but nobody has checked its layout against ours);
  - the tokenizer: the folder holds none. Text is cl100k_base (tiktoken) plus our special
    tokens (data/tokenizer.py). With a compact vocabulary (the toy world) the model's id i is
    cl100k id compact_vocab[i]; the folder's compact_vocab.json lists them.
"""

import json
import os
import sys

import torch
from safetensors.torch import save

from common import load_checkpoint
from configurator import apply_overrides
from data.atomic import atomic_write, make_folder, write_text
from data.errors import UserError, report_user_errors
from data.tokenizer import Tokenizer

# -----------------------------------------------------------------------------
ckpt = "out/finetune/ckpt.pt"
out_dir = ""  # "" = <ckpt>.hf next to the checkpoint
dtype = "float32"  # or "bfloat16" (half the size)
# -----------------------------------------------------------------------------


def llama_config(c, eot_id, dtype_name):
    """config.json for our ModelConfig (a dict). rope_theta is given both ways: transformers 5
    reads rope_parameters, earlier versions rope_theta."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": c["vocab_size"], "hidden_size": c["n_embd"], "intermediate_size": c["ffn_hidden"],
            "num_hidden_layers": c["n_layer"], "num_attention_heads": c["n_head"],
            "num_key_value_heads": c["n_kv_head"], "head_dim": c["n_embd"] // c["n_head"],
            "max_position_embeddings": c["block_size"], "rms_norm_eps": c["norm_eps"],
            "rope_theta": c["rope_theta"], "rope_parameters": {"rope_type": "default", "rope_theta": c["rope_theta"]},
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": c["tie_embeddings"], "bos_token_id": eot_id, "eos_token_id": eot_id,
            "torch_dtype": dtype_name}


def llama_state_dict(state, c):
    """Our decoder's weights under Llama's names (the vision encoder's and projector's are left out)."""
    head_dim = c["n_embd"] // c["n_head"]
    q_rows, kv_rows = c["n_head"] * head_dim, c["n_kv_head"] * head_dim
    out = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["norm_f.weight"]}
    if not c["tie_embeddings"]:  # tied: Llama reuses embed_tokens, and safetensors refuses shared tensors
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(c["n_layer"]):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].split([q_rows, kv_rows, kv_rows])
        gate, up = state[ours + "mlp.gate_up.weight"].chunk(2)  # SwiGLU: silu(gate) * up
        out.update({theirs + "input_layernorm.weight": state[ours + "norm1.weight"],
                    theirs + "self_attn.q_proj.weight": q, theirs + "self_attn.k_proj.weight": k,
                    theirs + "self_attn.v_proj.weight": v,
                    theirs + "self_attn.o_proj.weight": state[ours + "attn.proj.weight"],
                    theirs + "post_attention_layernorm.weight": state[ours + "norm2.weight"],
                    theirs + "mlp.gate_proj.weight": gate, theirs + "mlp.up_proj.weight": up,
                    theirs + "mlp.down_proj.weight": state[ours + "mlp.down.weight"]})
    return out


def export(checkpoint, out_dir, dtype_name="float32"):
    """Writes checkpoint (as pretrain.py and finetune.py save it) to out_dir as a Llama folder."""
    c = checkpoint["model_config"]
    check_dtype(dtype_name)
    if c.get("qk_norm", False):
        raise UserError("export_hf: this model uses qk_norm (a norm on queries and keys), which "
                        "LlamaForCausalLM does not have; it cannot be exported as a Llama")
    compact_vocab = checkpoint.get("compact_vocab")
    weights = {name: t.detach().to(getattr(torch, dtype_name)).contiguous().clone()  # clone: no shared storage
               for name, t in llama_state_dict(checkpoint["model"], c).items()}
    files = {"config.json": json.dumps(llama_config(c, Tokenizer(compact_vocab).eot_id, dtype_name), indent=1)}
    if compact_vocab is not None:
        files["compact_vocab.json"] = json.dumps(compact_vocab)
    make_folder(out_dir, "out_dir")
    stale = os.path.join(out_dir, "compact_vocab.json")  # from an earlier export into the same folder
    if compact_vocab is None and os.path.exists(stale):
        os.remove(stale)
    path = os.path.join(out_dir, "model.safetensors")
    with atomic_write(path, "wb") as f:
        f.write(save(weights, metadata={"format": "pt"}))
    for name, text in files.items():
        write_text(os.path.join(out_dir, name), text + "\n")
    return out_dir


def check_dtype(dtype_name):
    if dtype_name not in ("float32", "bfloat16"):
        raise UserError(f"export_hf: dtype must be 'float32' or 'bfloat16', got {dtype_name!r}")


def main(argv):
    settings = dict(ckpt=ckpt, out_dir=out_dir, dtype=dtype)
    apply_overrides(settings, argv)
    s = settings
    check_dtype(s["dtype"])  # before loading a checkpoint that may be large
    destination = export(load_checkpoint(s["ckpt"]), s["out_dir"] or f"{s['ckpt']}.hf", s["dtype"])
    print(f"wrote {destination} (LlamaForCausalLM, {s['dtype']})")
    return destination


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main(sys.argv[1:])
