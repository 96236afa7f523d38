"""export_hf.py: the exported LlamaForCausalLM computes our decoder's logits."""

import json
import os
from dataclasses import asdict

import pytest
import torch

import export_hf
from common import save_checkpoint
from data.tokenizer import Tokenizer
from model import VLM, ModelConfig

transformers = pytest.importorskip("transformers")


def tiny_checkpoint(path, tie, compact_vocab, vocab_size):
    """A tiny random decoder with grouped-query attention, saved as pretrain.py saves one."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         ffn_hidden=48, tie_embeddings=tie, rope_theta=500.0, norm_eps=1e-6)
    model = VLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a mixed-up norm weight would show
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm_f.weight":
                p.uniform_(0.5, 1.5)
    save_checkpoint(path, {"config": {}, "model": model.state_dict(), "model_config": asdict(config),
                           "compact_vocab": compact_vocab})
    return model


@pytest.mark.parametrize("tie, compact", [(False, True), (True, False)])
def test_exported_llama_computes_our_logits(tmp_path, tie, compact):
    compact_vocab = Tokenizer.cl100k_ids_of(["the red circle is on the left"]) if compact else None
    tok = Tokenizer(compact_vocab)
    ckpt = str(tmp_path / "ckpt.pt")
    ours = tiny_checkpoint(ckpt, tie, compact_vocab, tok.vocab_size)
    out = export_hf.main([f"--ckpt={ckpt}", f"--out_dir={tmp_path / 'hf'}"])
    assert os.path.exists(os.path.join(out, "compact_vocab.json")) == compact
    if compact:
        with open(os.path.join(out, "compact_vocab.json")) as f:
            assert json.load(f) == compact_vocab
    llama = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert llama.config.tie_word_embeddings == tie and llama.config.eos_token_id == tok.eot_id
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, ours.config.vocab_size, (3, ours.config.block_size), generator=generator)
    with torch.no_grad():
        expected = ours.logits(idx)
        got = llama(idx).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # measured: about 1e-7


def test_qk_norm_models_are_refused(tmp_path):
    checkpoint = {"model": {}, "model_config": {**asdict(ModelConfig()), "qk_norm": True}}
    with pytest.raises(ValueError, match="qk_norm"):
        export_hf.export(checkpoint, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")
