"""Curriculum Masking Module of CL-MAE (official `MaskingNet`): scores every patch with a keep-probability.

It reads the MAE's embedded tokens, so of the ViT encoder it shares the pieces (ClsToken, Transformer), not
vit.ViTEncoder, which embeds patches itself; its blocks are named `blocks` as MaskingNet's.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clmae_jax.models.vit import ClsToken, Transformer, dense_init


class CurriculumMasker(nn.Module):
    """Tokens [N,L,D] -> keep-probabilities m [N,L] in (0,1), float32; high = keep (visible), low = mask."""

    depth: int = 5
    num_heads: int = 4
    mlp_ratio: float = 4.0
    # The official MaskingNet is built without `norm_layer`, so it uses torch's LayerNorm default eps 1e-5,
    # unlike the MAE's 1e-6.
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    attention: str = "einsum"  # See vit.Attention.
    remat: bool = False  # See vit.Transformer.
    # Not official (1.0 and 0.0 are the official sigmoid): keep_prob = sigmoid(bound * tanh(logits / T / bound)).
    # Levers against saturation: T > 1 softens the sigmoid; a bound > 0 keeps every probability within
    # (sigmoid(-bound), sigmoid(bound)), so no token's soft mask reaches exactly 0 or 1.
    temperature: float = 1.0
    logit_bound: float = 0.0

    @nn.compact
    def __call__(self, tokens):
        # `tokens` is the MAE's patch embedding plus its position embedding; the CLS token's position embedding
        # is all zeros officially, so nothing is added to it.
        num_tokens = tokens.shape[1]
        x = ClsToken(name="cls_token")(tokens.astype(self.dtype))
        # Transformer's final LayerNorm is the head's LayerNorm: MaskingNet has no norm after its blocks, only
        # `mlp_head = LayerNorm -> Linear -> Sigmoid`, and LayerNorm acts per token, so normalising every token
        # and reading the CLS equals normalising the CLS alone.
        blocks = Transformer(self.depth, self.num_heads, self.mlp_ratio, self.norm_eps, self.dtype, self.attention,
                             self.remat, name="blocks")
        x = blocks.norm(blocks(x))
        # The head runs in float32 so the probabilities (and the losses built on them) keep full precision.
        logits = nn.Dense(num_tokens, kernel_init=dense_init, dtype=jnp.float32, name="head")(
            x[:, 0].astype(jnp.float32)) / self.temperature
        if self.logit_bound > 0:
            logits = self.logit_bound * jnp.tanh(logits / self.logit_bound)
        return nn.sigmoid(logits)
