"""The pretrained SigLIP tower: parity with the reference implementation (transformers, a
test-only dependency) on Hub-style folders, errors that name a bad tensor, and freezing."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import train_step
from model import VLM, ModelConfig, SiglipEncoder, configure_optimizer, siglip_config
from vision_weights import load_siglip
from tests.tiny_data import ROOT, make_tiny_dataset

transformers = pytest.importorskip("transformers")

# Shapes of the two Hub towers, shallower so a CPU runs them in seconds (the test still covers
# the skipped last block): google/siglip-base-patch16-224 and google/siglip-so400m-patch14-384.
BASE = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, image_size=224, patch_size=16,
            num_hidden_layers=3)
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=384, patch_size=14,
              num_hidden_layers=2)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                 max_position_embeddings=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, image_size=16, patch_size=8,
                   num_hidden_layers=3)


def perturb(model, seed):
    """Random weights everywhere, so that LayerNorm gains and biases, which the reference
    initialises to ones and zeros, are not interchangeable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_full_siglip(folder, vision, seed=0):
    """A full SiglipModel (text and vision towers), saved as the Hub checkpoints are: config.json
    with a nested vision_config, model.safetensors, preprocessor_config.json."""
    config = transformers.SiglipConfig(text_config=TINY_TEXT, vision_config=vision)
    torch.manual_seed(seed)
    model = perturb(transformers.SiglipModel(config), seed)
    model.save_pretrained(folder)
    transformers.SiglipImageProcessorPil().save_pretrained(folder)
    return model.vision_model


def save_vision_only(folder, seed=0):
    torch.manual_seed(seed)
    model = perturb(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY_VISION)), seed)
    model.save_pretrained(folder)
    return model


def our_encoder(folder, feature_layer=-2):
    encoder = SiglipEncoder(ModelConfig(**siglip_config(folder), siglip_feature_layer=feature_layer))
    load_siglip(encoder, folder)
    return encoder


def reference_features(reference, images, hidden_state):
    """The reference's patch features at a hidden_states index, from uint8 [N, H, W, 3]
    images prepared as SigLIP's image processor does (scale to [0, 1], mean 0.5, std 0.5)."""
    pixels = (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        return reference(pixel_values=pixels, output_hidden_states=True).hidden_states[hidden_state]


@pytest.mark.parametrize("vision, n_images, layers", [(BASE, 2, (-2, -1)), (SO400M, 1, (-2,))],
                         ids=["base-patch16-224", "so400m-patch14-384"])
def test_patch_features_match_the_reference(tmp_path, vision, n_images, layers):
    reference = save_full_siglip(tmp_path, vision)
    config = siglip_config(tmp_path)
    assert (config["siglip_width"], config["siglip_depth"], config["siglip_heads"], config["siglip_mlp"]) == (
        vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"], vision["intermediate_size"])
    assert config["image_mean"] == config["image_std"] == (0.5, 0.5, 0.5)
    size = vision["image_size"]
    tokens = (size // vision["patch_size"]) ** 2  # 196 for base-224, 729 for so400m-384 (no CLS token)
    images = torch.randint(0, 256, (n_images, size, size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    for layer in layers:
        encoder = our_encoder(tmp_path, layer)
        assert len(encoder.blocks) == vision["num_hidden_layers"] + 1 + layer  # later blocks are never built
        with torch.no_grad():
            ours = encoder(images)
        assert ours.shape == (n_images, tokens, vision["hidden_size"])
        torch.testing.assert_close(ours, reference_features(reference, images, layer), rtol=1e-4, atol=1e-4)


def test_a_vision_only_folder_loads_too(tmp_path):
    reference = save_vision_only(tmp_path)
    assert not os.path.exists(tmp_path / "preprocessor_config.json")  # SigLIP's normalisation by default
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = our_encoder(tmp_path)(images)
    torch.testing.assert_close(ours, reference_features(reference, images, -2), rtol=1e-5, atol=1e-5)


def test_a_sparse_hub_config_means_the_reference_defaults(tmp_path):
    # a Hub config.json may leave out the vision numbers that equal the reference's defaults
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "siglip", "vision_config": {"model_type": "siglip_vision_model"}}, f)
    defaults = transformers.SiglipVisionConfig()
    config = siglip_config(tmp_path)
    assert (config["image_size"], config["patch_size"], config["siglip_width"], config["siglip_depth"],
            config["siglip_heads"], config["siglip_mlp"], config["siglip_eps"]) == (
        defaults.image_size, defaults.patch_size, defaults.hidden_size, defaults.num_hidden_layers,
        defaults.num_attention_heads, defaults.intermediate_size, defaults.layer_norm_eps)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny full SiglipModel in the Hub's layout."""
    folder = tmp_path_factory.mktemp("siglip")
    save_full_siglip(folder, TINY_VISION)
    return folder


def edited_copy(folder, target, edit):
    shutil.copytree(folder, target)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(target, "model.safetensors"))
    return target


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("vision_model.encoder.layers.1.mlp.fc2.bias"),
     "tensor vision_model.encoder.layers.1.mlp.fc2.bias is missing"),
    (lambda t: t.update({"vision_model.encoder.layers.0.self_attn.qk_norm.weight": torch.ones(32)}),
     "unknown tensor vision_model.encoder.layers.0.self_attn.qk_norm.weight"),
    (lambda t: t.update({"vision_model.encoder.layers.3.layer_norm1.weight": torch.ones(32)}),
     "unknown tensor vision_model.encoder.layers.3.layer_norm1.weight"),  # a block the config does not have
    (lambda t: t.update({"vision_model.embeddings.position_embedding.weight": torch.zeros(5, 32)}),
     r"tensor vision_model.embeddings.position_embedding.weight has shape \(5, 32\), the model expects \(4, 32\)"),
])
def test_a_bad_tensor_fails_naming_it(tiny_folder, tmp_path, edit, message):
    folder = edited_copy(tiny_folder, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        our_encoder(folder)


def test_a_missing_file_or_a_foreign_model_fails_naming_it(tiny_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        siglip_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="model_type is 'clip', not a SigLIP model"):
        siglip_config(tmp_path)
    encoder = SiglipEncoder(ModelConfig(**siglip_config(tiny_folder)))
    with pytest.raises(FileNotFoundError, match="model.safetensors does not exist"):
        load_siglip(encoder, tmp_path)


def test_a_frozen_tower_stays_bit_identical_while_the_projector_trains(tiny_folder):
    config = ModelConfig(vocab_size=97, block_size=24, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, ffn_hidden=48,
                         image_token_id=3, **siglip_config(tiny_folder))
    torch.manual_seed(0)
    model = VLM(config)
    load_siglip(model.vision.encoder, tiny_folder)
    model.set_trainable(encoder=False)
    optimizer = configure_optimizer(model, 1e-2, 0.1, (0.9, 0.95), "cpu")
    encoder_before = {k: v.clone() for k, v in model.vision.encoder.state_dict().items()}
    projector_before = {k: v.clone() for k, v in model.vision.projector.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(4, 97, (2, 24), generator=g)
    idx[:, :4] = 3  # one image (4 patch tokens) at the start of each row
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=g)
    trainable_vision = [p for p in model.vision.parameters() if p.requires_grad]
    losses = []
    for _ in range(4):
        token_losses, _ = train_step(model, optimizer, [(idx, idx.roll(-1, 1), images)], torch.autocast("cpu", enabled=False),
                                     trainable_vision, True, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(token_losses[0].mean().item())
    assert losses[-1] < losses[0]
    for k, v in model.vision.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    for k, v in model.vision.projector.state_dict().items():
        assert not torch.equal(v, projector_before[k]), k
    # no optimizer state for the frozen tower; the zero-gradient DDP touch leaves it alone too
    frozen = {id(p) for p in model.vision.encoder.parameters()}
    assert not any(id(p) in frozen for group in optimizer.param_groups for p in group["params"])
    loss, _ = model(idx.clamp(min=4), idx, None)  # a text-only batch
    loss.backward()
    assert all(p.grad is None for p in model.vision.encoder.parameters())
    assert all(p.grad is not None and (p.grad == 0).all() for p in model.vision.projector.parameters())


def pretrain(data_dir, out_dir, *args, check=True):
    tiny = ["--n_layer=1", "--n_head=2", "--n_kv_head=2", "--n_embd=32", "--ffn_hidden=64", "--seq_len=64",
            "--caption_len=20", "--batch_size=4", "--max_iters=10", "--warmup_iters=2", "--eval_interval=5",
            "--eval_batches=2", "--image_ratio=0.5"]
    result = subprocess.run([sys.executable, "pretrain.py", *tiny, f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                             *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_pretrain_loads_and_freezes_the_tower_and_its_checkpoint_carries_it(tmp_path):
    (tmp_path / "data").mkdir()
    data_dir = str(make_tiny_dataset(tmp_path / "data"))
    folder = tmp_path / "siglip"
    save_full_siglip(folder, dict(TINY_VISION, image_size=32, patch_size=16))  # the tiny data's 32x32 images
    tower = {k: v for k, v in load_file(folder / "model.safetensors").items() if k.startswith("vision_model.")}
    args = ["--vision_encoder=siglip", f"--vision_weights={folder}", "--image_size=32", "--patch_size=16", "--freeze_vision=True",
            "--qk_norm=True", "--vision_start_frac=0.5", "--image_iters=3"]
    pretrain(data_dir, tmp_path / "run", *args, "--stop_at_iter=6")
    checkpoint = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert checkpoint["model_config"]["vision_encoder"] == "siglip" and checkpoint["model_config"]["qk_norm"]
    model = checkpoint["model"]
    assert torch.equal(model["vision.encoder.pos_embed"], tower["vision_model.embeddings.position_embedding.weight"])
    assert torch.equal(model["vision.encoder.blocks.1.fc2.weight"], tower["vision_model.encoder.layers.1.mlp.fc2.weight"])
    assert "vision.encoder.blocks.2.fc2.weight" not in model  # the last block feeds nothing
    # the checkpoint carries the tower: resuming reads no weights file (config.json still sets the shape)
    os.remove(folder / "model.safetensors")
    pretrain(data_dir, tmp_path / "run", *args, "--init_from=resume")
    after = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["model"]
    for k in model:
        if k.startswith("vision.encoder."):
            assert torch.equal(after[k], model[k]), k  # frozen through the image steps
        elif k.startswith("vision.projector."):
            assert not torch.equal(after[k], model[k]), k  # trained
    bad = pretrain(data_dir, tmp_path / "bad", *args[:2], "--image_size=32", "--patch_size=8", check=False)
    assert bad.returncode != 0 and "patch_size is 8, but the vision encoder" in bad.stderr
