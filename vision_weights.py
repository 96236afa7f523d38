"""
Pretrained vision encoders' weights: where a checkpoint folder comes from (a local folder, or a
Hugging Face Hub repository at a pinned revision, downloaded once into the Hub's cache) and how
its tensors are copied into our modules. model.py builds the modules and imports only torch;
this file is the seam to the outside world. A new pretrained encoder adds its loader to LOADERS.
"""

import os
import re

from huggingface_hub import hf_hub_download
from safetensors import safe_open

from data.errors import MissingFileError, UserError

SIGLIP_CONFIG_FILES = ("config.json", "preprocessor_config.json")


def siglip_folder(source, revision, weights=True):
    """The folder holding a SigLIP checkpoint's files: `source` itself when it is a local
    folder, else the Hub repository `source` at the pinned `revision`, whose files
    huggingface_hub downloads once into its cache. weights=False fetches only the small
    config files (enough to build the model; its weights then come from our checkpoint)."""
    if os.path.isdir(source):
        return source
    if source.startswith(("/", ".", "~")):
        raise MissingFileError(f"vision_weights {source}: no such folder")
    names = SIGLIP_CONFIG_FILES + (("model.safetensors",) if weights else ())
    return os.path.dirname([hf_hub_download(source, name, revision=revision) for name in names][-1])


def load_siglip(encoder, folder):
    """Copies the vision tower's weights from folder/model.safetensors into `encoder`, a
    SiglipEncoder built from siglip_config(folder). Skipped: the text tower, and the parts of
    the vision tower a VLM does not use (the pooling head, the final LayerNorm, the blocks
    after the feature layer). Any other vision tensor, a missing one or one of another shape
    is an error that names it."""
    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        raise MissingFileError(f"{path} does not exist: not a SigLIP checkpoint folder")
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        # A full SiglipModel's vision tensors start with "vision_model."; a vision-only model
        # saved by transformers 5 has no prefix (older versions wrote "vision_model." too).
        prefix = "vision_model." if any(key.startswith("vision_model.") for key in keys) else ""
        ours = encoder.state_dict()
        theirs_of = {"patch_embed.weight": f"{prefix}embeddings.patch_embedding.weight",
                     "patch_embed.bias": f"{prefix}embeddings.patch_embedding.bias",
                     "pos_embed": f"{prefix}embeddings.position_embedding.weight"}
        for name in ours:
            if name.startswith("blocks."):
                _, i, leaf = name.split(".", 2)
                group = "self_attn." if leaf.startswith(("q_", "k_", "v_", "out_")) else \
                    "mlp." if leaf.startswith("fc") else ""
                theirs_of[name] = f"{prefix}encoder.layers.{i}.{group}{leaf}"
        wanted = set(theirs_of.values())
        unused = (f"{prefix}head.", f"{prefix}post_layernorm.") + tuple(
            f"{prefix}encoder.layers.{i}." for i in range(len(encoder.blocks), encoder.depth))
        for key in sorted(keys):
            is_text = prefix and not key.startswith(prefix)  # text tower, logit_scale, logit_bias
            if not is_text and key not in wanted and not key.startswith(unused):
                raise UserError(f"{path}: unknown tensor {key} (not part of the SigLIP tower we build)")
        state = {}
        for name, key in theirs_of.items():
            if key not in keys:
                raise UserError(f"{path}: tensor {key} is missing")
            tensor = f.get_tensor(key)
            if tensor.shape != ours[name].shape:
                raise UserError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(ours[name].shape)} (check the tower's config.json)")
            state[name] = tensor
    encoder.load_state_dict(state)


LOADERS = {"siglip": load_siglip}  # vision_encoder -> how its pretrained weights load (patches: none)


def check_vision_weights(settings):
    """A pretrained encoder's vision_weights must name a local folder or a Hub repository id,
    checked before anything is built or downloaded."""
    source = settings["vision_weights"]
    if settings["vision_encoder"] in LOADERS and not os.path.isdir(source) and (
            source.startswith(("/", ".", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", source)):
        raise UserError(f"vision_weights {source!r} is neither a local folder nor a Hub repository id (owner/name)")


def weights_folder(settings, with_weights):
    """The checkpoint folder of the settings' pretrained encoder (None for one trained from
    scratch). with_weights=False fetches only its config files: enough to build the model, whose
    weights then come from our own checkpoint (a resume or a branch)."""
    if settings["vision_encoder"] not in LOADERS:
        return None
    return siglip_folder(settings["vision_weights"], settings["vision_revision"], weights=with_weights)


def load_pretrained(encoder, settings, folder):
    """Copies the pretrained weights in `folder` into `encoder`, if the settings' encoder has any."""
    if settings["vision_encoder"] in LOADERS:
        LOADERS[settings["vision_encoder"]](encoder, folder)
