"""Pretrained encoders for evaluation: the ViT encoder of an MAE or CL-MAE run, or raw pixels (the baseline).

An `Encoder` holds only what evaluation needs (patch embedding, CLS token, encoder blocks and norm); the MAE
decoder and CL-MAE's masking module are never loaded. Its `features(images)` gives the two pooled features of
facebookresearch/mae `models_vit.py` (vit.POOLS):
- "cls": the CLS token after the encoder's final LayerNorm (`global_pool=False`, the linear probe's default);
- "gap_norm": the mean of the patch tokens of the last block, before the final LayerNorm (which `global_pool=True`
  deletes), through `fc_norm`, a fresh LayerNorm (weight 1, bias 0, eps 1e-6): the kNN feature of the CL-MAE code.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clmae_jax.models.geometry import Geometry, params_geometry
from clmae_jax.models.vit import ViTEncoder, pool_features, vit_size
from clmae_jax.runtime import data
from clmae_jax.runtime.errors import UserError

RAW_PIXELS = "raw_pixels"
ENCODER_KEYS = ("patch_embed", "cls_token", "encoder")  # An MAE tree's encoder: what evaluation reads.
POOLS = ("gap_norm", "cls")


def fresh_layer_norm(x, eps: float = 1e-6):
    """fc_norm of the official kNN: a LayerNorm never trained (weight 1, bias 0), i.e. without affine."""
    mean = x.mean(axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)


class Features(nn.Module):
    """The ViT encoder on all tokens (nothing masked), pooled the ways evaluation reads (POOLS), in float32."""

    vit: ViTEncoder

    def setup(self):
        nn.share_scope(self, self.vit)

    def __call__(self, images):
        out = jax.tree.map(lambda x: x.astype(jnp.float32), self.vit(images))
        return {kind: pool_features(out, kind, fresh_layer_norm) for kind in POOLS}


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A frozen encoder: `features(images uint8 [B,H,W,C]) -> {"gap_norm", "cls"}` float32 [B, D] (pure, jittable)."""

    name: str  # Where it came from, for tables and errors.
    params: Any  # MAE-layout encoder parameters; None for raw pixels.
    num_heads: int = 0
    mean: tuple = (0.0,)
    std: tuple = (1.0,)
    step: int = 0
    dtype: str = "float32"
    attention: str = "einsum"

    @property
    def is_raw_pixels(self) -> bool:
        """True for the pixel baseline."""
        return self.params is None

    @property
    def geometry(self) -> Geometry:
        """Width, depth, patch size and channels of the weights."""
        return params_geometry(self.params)

    def module(self) -> Features:
        """The flax module that runs these weights."""
        g = self.geometry
        return Features(ViTEncoder(g.patch_size, g.width, g.depth, self.num_heads, dtype=jnp.dtype(self.dtype),
                                   attention=self.attention))

    def features(self, params, images):
        """Pooled features of uint8 images, normalised with the encoder's mean/std; raw pixels give the
        normalised pixels flattened (both pools), so the baseline runs through the same code."""
        x = data.normalize(images, self.mean, self.std)
        if self.is_raw_pixels:
            flat = x.reshape(x.shape[0], -1)
            return {kind: flat for kind in POOLS}
        return self.module().apply({"params": params}, x)


def config_encoder(config, params, name: str, step: int = 0, dtype: str = "float32") -> Encoder:
    """The encoder a pretraining config trains (its ViT size, normalisation and attention) on `params` (arrays or
    shapes)."""
    return Encoder(name=name, params=params, num_heads=vit_size(config.model.size)["num_heads"],
                   mean=tuple(config.input.mean), std=tuple(config.input.std), step=step, dtype=dtype,
                   attention=config.model.attention)


def encoder_params(mae_params) -> dict:
    """The encoder half of an MAE parameter tree (the decoder, mask token and prediction head dropped)."""
    return {k: mae_params[k] for k in ENCODER_KEYS}


def raw_pixels(mean, std) -> Encoder:
    """The trivial baseline: features are the normalised pixels."""
    return Encoder(name=RAW_PIXELS, params=None, mean=tuple(mean), std=tuple(std))


def feature_pool(eval_config, default: str) -> str:
    """eval_config.pool ('gap_norm' or 'cls'), defaulting to the protocol's official choice."""
    kind = eval_config.get("pool") or default
    if kind not in POOLS:
        raise UserError(f"Unknown pool {kind!r} in config.evals; use one of {POOLS}.")
    return kind

