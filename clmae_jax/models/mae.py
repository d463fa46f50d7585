"""Masked autoencoder (He et al., 2021): encoder on visible tokens, light decoder, masked-patch loss.

Function names follow facebookresearch/mae `models_mae.py` so the paper can sit beside the code. Masking is
"keep the top-k tokens by a per-token score": random masking scores tokens with uniform noise, CL-MAE scores them
with the curriculum masking module; both share one mechanism.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clmae_jax.models.vit import Transformer, ViTEncoder, dense_init, patchify, sincos_2d


def unpatchify(patches, patch_size: int, channels: int):
    """[B, L, p*p*C] -> [B,H,W,C]; inverse of `patchify` for square images."""
    b, length, _ = patches.shape
    p, grid = patch_size, int(round(length ** 0.5))
    x = patches.reshape(b, grid, grid, p, p, channels)
    return jnp.einsum("bhwpqc->bhpwqc", x).reshape(b, grid * p, grid * p, channels)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible tokens per image: exactly int(N * (1 - ratio)), as MAE's `len_keep`."""
    return int(num_patches * (1 - mask_ratio))


def topk_masking(tokens, keep_scores, num_keep: int):
    """Keeps the `num_keep` highest-scoring tokens per image.

    Returns (visible tokens [B,k,D], binary mask [B,L] with 1 = removed, ids_restore [B,L]).
    """
    ids_shuffle = jnp.argsort(-keep_scores, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :num_keep]
    visible = jnp.take_along_axis(tokens, ids_keep[..., None], axis=1)
    mask = (ids_restore >= num_keep).astype(jnp.float32)
    return visible, mask, ids_restore


def patch_statistics(target):
    """Mean and std of each patch [..., p*p*C] for norm_pix_loss: torch's unbiased `.var()`, as the MAE code."""
    mean = target.mean(axis=-1, keepdims=True)
    return mean, jnp.sqrt(target.var(axis=-1, keepdims=True, ddof=1) + 1e-6)


def patch_targets(images, patch_size: int, norm_pix_loss: bool):
    """Reconstruction targets per patch, normalised by each patch's own mean/std when `norm_pix_loss`."""
    target = patchify(images.astype(jnp.float32), patch_size)
    if not norm_pix_loss:
        return target
    mean, std = patch_statistics(target)
    return (target - mean) / std


def per_patch_error(images, pred, patch_size: int, norm_pix_loss: bool):
    """Mean squared error of each patch over its pixels: [B, L]."""
    target = patch_targets(images, patch_size, norm_pix_loss)
    return jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)


def mae_loss(images, pred, mask, patch_size: int, norm_pix_loss: bool):
    """MAE loss: per-patch MSE averaged over the removed (mask == 1) patches only."""
    error = per_patch_error(images, pred, patch_size, norm_pix_loss)
    return jnp.sum(error * mask) / jnp.sum(mask)


def denormalize_prediction(images, pred, patch_size: int, norm_pix_loss: bool):
    """Prediction in pixel space: undoes the per-patch normalisation with each target patch's mean/std."""
    pred = pred.astype(jnp.float32)
    if norm_pix_loss:
        mean, std = patch_statistics(patchify(images.astype(jnp.float32), patch_size))
        pred = pred * std + mean
    return unpatchify(pred, patch_size, images.shape[-1])


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder (vit.ViTEncoder) that sees visible tokens only and a narrow decoder with mask tokens."""

    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    channels: int = 3
    dtype: Any = jnp.float32
    attention: str = "einsum"  # See vit.Attention.
    remat: bool = False

    def setup(self):
        self.vit = ViTEncoder(self.patch_size, self.width, self.depth, self.num_heads, self.mlp_ratio, self.dtype,
                              self.attention, self.remat)
        nn.share_scope(self, self.vit)
        self.decoder_embed = nn.Dense(self.decoder_width, kernel_init=dense_init, dtype=self.dtype)
        self.mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.decoder_width))
        self.decoder = Transformer(self.decoder_depth, self.decoder_heads, self.mlp_ratio, dtype=self.dtype,
                                   attention=self.attention, remat=self.remat)
        self.decoder_pred = nn.Dense(self.patch_size ** 2 * self.channels, kernel_init=dense_init, dtype=self.dtype)

    def embed(self, images):
        """Patch embedding plus fixed 2-D sin-cos positions: the tokens before masking, [B, L, D]."""
        return self.vit.embed(images)

    def forward_encoder(self, tokens):
        """CLS + transformer over whichever tokens are given (visible ones, or all of them): the normed tokens."""
        return self.vit.encode(tokens)["encoded"]

    def forward_decoder(self, latent, ids_restore):
        """Fills removed positions with the mask token, restores order, predicts pixels per patch [B, L, p*p*C]."""
        x = self.decoder_embed(latent)
        cls, visible = x[:, :1], x[:, 1:]
        batch, length = ids_restore.shape
        mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype),
                                       (batch, length - visible.shape[1], x.shape[-1]))
        patches = jnp.take_along_axis(jnp.concatenate([visible, mask_tokens], axis=1), ids_restore[..., None], axis=1)
        grid = int(round(length ** 0.5))
        patches = patches + jnp.asarray(sincos_2d(self.decoder_width, grid), x.dtype)[None]
        x = self.decoder.norm(self.decoder(jnp.concatenate([cls, patches], axis=1)))
        return self.decoder_pred(x[:, 1:])

    def __call__(self, images, keep_scores, num_keep: int):
        """Reconstructs `images` from the `num_keep` tokens with the highest `keep_scores`.

        Returns (pred [B, L, p*p*C], mask [B, L] with 1 = removed).
        """
        visible, mask, ids_restore = topk_masking(self.embed(images), keep_scores, num_keep)
        return self.forward_decoder(self.forward_encoder(visible), ids_restore), mask

    def reconstruct_soft(self, tokens, keep_prob):
        """CL-MAE's masking-module path: every token scaled by its keep-probability, no token dropped."""
        latent = self.forward_encoder(tokens * keep_prob[..., None].astype(tokens.dtype))
        identity = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape[:2])
        return self.forward_decoder(latent, identity)
