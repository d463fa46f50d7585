"""Finds and restores the encoder that config.encoder.checkpoint names.

Accepted: an MAE or CL-MAE workdir (its newest committed checkpoint, or config.encoder.step), one of its step
folders (WORKDIR/checkpoints/<step>), "raw_pixels", or a PyTorch .pth / .safetensors file or Hugging Face folder,
all read by `clmae_jax.weights.read_weights`. Of a run only the encoder's leaves are read from disk: the decoder,
CL-MAE's masking module and the optimizer state stay there.
"""

import jax
import numpy as np

from clmae_jax.evaluate.encoder import RAW_PIXELS, Encoder, encoder_params, raw_pixels
from clmae_jax.models.geometry import Geometry, check_same_encoder
from clmae_jax.models.vit import vit_size
from clmae_jax.runtime.errors import UserError
from clmae_jax.weights import Weights, read_weights


def pretrained_encoder(weights: Weights) -> Encoder:
    """The encoder of pretrained MAE / CL-MAE weights (a ViT classifier is refused: fine-tune or export it)."""
    if weights.geometry.num_classes is not None:
        raise UserError(f"{weights.name} is a ViT classifier, not MAE / CL-MAE pretraining weights; evaluate the "
                        "encoder it was fine-tuned from.")
    g, params = weights.geometry, encoder_params(weights.params.get("mae", weights.params))
    return Encoder(name=weights.name, params=jax.tree.map(np.asarray, params), num_heads=int(g.num_heads),
                   mean=tuple(g.mean), std=tuple(g.std), step=weights.step)


def check_expected_geometry(encoder: Encoder, encoder_config):
    """config.encoder.size / patch_size, when set, must match the weights: the wrong run fails before extraction."""
    size, patch = encoder_config.get("size", ""), encoder_config.get("patch_size", 0)
    if not (size or patch):
        return
    found = encoder.geometry
    width, depth = (vit_size(size)["width"], vit_size(size)["depth"]) if size else (found.width, found.depth)
    wanted = Geometry(width, depth, patch or found.patch_size, found.channels)
    check_same_encoder(found, f"encoder {encoder.name}", wanted, f"config.encoder (size {size!r}, patch_size {patch})")


def load_encoder(config) -> Encoder:
    """The encoder config.encoder names, checked against config.encoder's optional geometry and normalisation."""
    ec = config.encoder
    path = ec.checkpoint
    if not path:
        raise UserError("config.encoder.checkpoint is empty; set it to an MAE / CL-MAE workdir, a checkpoint step "
                        f"folder, a PyTorch weights file or {RAW_PIXELS!r}.")
    if path == RAW_PIXELS:
        return raw_pixels(config.input.mean, config.input.std)
    encoder = pretrained_encoder(read_weights(path, ec.get("step", -1), encoder_only=True))
    check_expected_geometry(encoder, ec)
    overrides = {k: tuple(ec[k]) for k in ("mean", "std") if ec.get(k)}
    return Encoder(**{**encoder.__dict__, **overrides, "dtype": ec.get("dtype", "float32"),
                      "attention": ec.get("attention", "einsum")})
