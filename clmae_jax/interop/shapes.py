"""Geometry of an fb/mae state dict, read from its tensors' shapes, file hints filling what shapes lack."""
import re

import numpy as np

from clmae_jax.models.geometry import Geometry
from clmae_jax.models.masker import CurriculumMasker
from clmae_jax.models.vit import VIT_SIZES
from clmae_jax.runtime.errors import UserError


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


MAE_DECODER_HEADS = 16  # Every published MAE decoder (512 wide) uses 16 heads.


MASKER_HEADS = CurriculumMasker.num_heads  # The official MaskingNet's default, ours too; shapes lack it.


# What a file's metadata or config may tell beyond its shapes.
HINT_KEYS = ("num_heads", "decoder_heads", "masker_heads", "image_size", "mean", "std", "mask_ratio", "norm_pix_loss",
             "pool", "pos_embed")


def count_blocks(state_dict: dict, prefix: str) -> int:
    """Number of blocks `prefix.N.*` in a state dict."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    return len({m.group(1) for m in map(pattern.match, state_dict) if m})


def require(state_dict: dict, key: str, what: str) -> np.ndarray:
    """state_dict[key], or a one-line UserError naming the missing key."""
    if key not in state_dict:
        raise UserError(f"{what}: missing key {key!r}; this is not an MAE / CL-MAE state dict in the "
                        "facebookresearch/mae or Hugging Face ViTMAE layout.")
    return state_dict[key]


def known_heads(width: int, depth: int):
    """Heads of a named ViT size with this width and depth (MAE's published sizes), else None."""
    return next((s["num_heads"] for s in VIT_SIZES.values() if (s["width"], s["depth"]) == (width, depth)), None)


def fbmae_geometry(state_dict: dict, what: str, hints: dict) -> Geometry:
    """Geometry read from an fb/mae state dict's shapes; `hints` (file metadata, HF config) fill what shapes lack."""
    width, channels, patch, _ = require(state_dict, "patch_embed.proj.weight", what).shape
    depth = count_blocks(state_dict, "blocks")
    hidden = require(state_dict, "blocks.0.mlp.fc1.weight", what).shape[0]
    geometry = dict(width=width, depth=depth, num_heads=known_heads(width, depth), mlp_ratio=hidden / width,
                    patch_size=patch, channels=channels, mean=IMAGENET_MEAN if channels == 3 else (0.5,) * channels,
                    std=IMAGENET_STD if channels == 3 else (0.5,) * channels)
    if "pos_embed" in state_dict:
        geometry["image_size"] = int(round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)) * patch
    if "decoder_embed.weight" in state_dict:
        decoder_width = state_dict["decoder_embed.weight"].shape[0]
        geometry.update(decoder_width=decoder_width, decoder_depth=count_blocks(state_dict, "decoder_blocks"),
                        decoder_heads=MAE_DECODER_HEADS if decoder_width == 512 else None)
    if any(k.startswith("masking_net.") for k in state_dict):
        geometry.update(masker_depth=count_blocks(state_dict, "masking_net.blocks"), masker_heads=MASKER_HEADS)
    geometry.update({k: hints[k] for k in HINT_KEYS if hints.get(k) is not None})
    if geometry["num_heads"] is None:
        raise UserError(f"{what}: cannot tell the number of attention heads of a width-{width}, depth-{depth} ViT "
                        "(not a standard size); pass num_heads= to load_pretrained.")
    return Geometry(**geometry)
