"""Wide-ResNet of the CBM code (taken there from the Curriculum-by-Smoothing repository).

The paper calls this model "Wide-ResNet-50", but the official runs build `Wide_ResNet(depth=52,
widen_factor=2, dropout_rate=0.3)`: in Zagoruyko & Komodakis' naming that is WRN-52-2, with (52 - 4) / 6 = 8
pre-activation blocks per stage. The defaults of `WideResNet` are that WRN-52-2.

Details of the official code, kept here:
- every conv has a bias, and the projection shortcut is a bare 1x1 conv on the raw block input (no BatchNorm);
- a block strides in its second conv;
- the final BatchNorm is built with PyTorch momentum=0.9, so its running statistics follow the latest batch
  almost entirely (flax momentum 0.1); the blocks' BatchNorms keep the PyTorch default (flax 0.9).
`conv_init` is defined but never applied there, so all weights use PyTorch's default initialisation.

CBM's MaskIn layer is not part of this model: the training step masks the normalised images before the call.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cbm_jax.models.torch_layers import (TORCH_PAD_3X3, batch_norm, torch_conv, torch_default_bias_init,
                                         torch_default_kernel_init)
from clmae_jax.runtime.errors import UserError

WRN_52_2 = dict(depth=52, widen_factor=2, dropout_rate=0.3)  # The model CBM calls "Wide-ResNet-50".


class WideBasic(nn.Module):
    """conv3x3_s(relu(BN(dropout(conv3x3(relu(BN(x))))))) + shortcut(x), shortcut = 1x1 conv on a shape change."""

    features: int
    dropout_rate: float
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        norm = batch_norm(train, self.dtype)
        in_features = x.shape[-1]
        y = nn.relu(norm(name="bn1")(x))
        y = torch_conv(self.features, 3, 9 * in_features, self.dtype, padding=TORCH_PAD_3X3, name="conv1")(y)
        y = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(y)
        y = nn.relu(norm(name="bn2")(y))
        y = torch_conv(self.features, 3, 9 * self.features, self.dtype, strides=self.stride,
                       padding=TORCH_PAD_3X3, name="conv2")(y)
        shortcut = x
        if self.stride != 1 or in_features != self.features:
            shortcut = torch_conv(self.features, 1, in_features, self.dtype, strides=self.stride,
                                  padding="VALID", name="shortcut_conv")(x)
        return y + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k classifier: 3x3 stem, three stages of 16k/32k/64k channels, BN-ReLU, average pool, linear."""

    num_classes: int
    depth: int = WRN_52_2["depth"]
    widen_factor: int = WRN_52_2["widen_factor"]
    dropout_rate: float = WRN_52_2["dropout_rate"]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool):
        if self.depth < 10 or (self.depth - 4) % 6:
            raise UserError(f"Wide-ResNet depth must be 6n+4 with n >= 1 (10, 16, ..., 52), got {self.depth}.")
        blocks_per_stage = (self.depth - 4) // 6
        x = torch_conv(16, 3, 9 * images.shape[-1], self.dtype, padding=TORCH_PAD_3X3, name="conv_stem")(images)
        for stage, width in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                x = WideBasic(width * self.widen_factor, self.dropout_rate, stride, self.dtype,
                              name=f"stage{stage + 1}_block{block}")(x, train)
        x = nn.relu(batch_norm(train, self.dtype, momentum=0.1)(name="bn_final")(x))
        features = x.astype(jnp.float32).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=torch_default_kernel_init,
                        bias_init=torch_default_bias_init(features.shape[-1]), dtype=jnp.float32,
                        name="head")(features)
