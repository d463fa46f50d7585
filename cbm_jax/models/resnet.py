"""CIFAR-style ResNet-18 of the CBM code (taken there from the Curriculum-by-Smoothing repository).

A 3x3 stride-1 stem without max-pool keeps the 32x32 resolution for the first stage; four stages of
post-activation BasicBlocks (64/128/256/512 channels, strides 1/2/2/2); global average pool; linear head.
Initialisation as the official `_initialize_weights`: Kaiming-normal (fan_in, ReLU gain) convs without bias,
BatchNorm scale 1 / bias 0, head weights N(0, 0.01) and zero bias.

CBM's MaskIn layer is not part of this model: the training step masks the normalised images before the call.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cbm_jax.models.torch_layers import TORCH_PAD_3X3, batch_norm
from clmae_jax.runtime.errors import UserError

# torch.nn.init.kaiming_normal_(mode='fan_in', nonlinearity='relu') draws from an untruncated normal.
conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
head_init = nn.initializers.normal(0.01)


class BasicBlock(nn.Module):
    """relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + shortcut(x)), shortcut = 1x1 conv + BN on a shape change."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
        norm = batch_norm(train, self.dtype)
        y = conv(self.features, (3, 3), strides=self.stride, padding=TORCH_PAD_3X3, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(self.features, (3, 3), padding=TORCH_PAD_3X3, name="conv2")(y)
        y = norm(name="bn2")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, (1, 1), strides=self.stride, padding="VALID", name="shortcut_conv")(x)
            shortcut = norm(name="shortcut_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """CIFAR ResNet classifier: ResNet-18 by default, ResNet-34 with stage_sizes=(3, 4, 6, 3).

    `width` scales the stem and the four stages (width, 2, 4, 8 x width); 64 is the paper's model, smaller values
    give a laptop-sized ResNet-18 with the same depth.
    """

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool):
        if len(self.stage_sizes) != 4 or min(self.stage_sizes) < 1:
            raise UserError(f"ResNet needs 4 positive stage sizes, got {tuple(self.stage_sizes)}; "
                            "use (2, 2, 2, 2) for ResNet-18 or (3, 4, 6, 3) for ResNet-34.")
        x = nn.Conv(self.width, (3, 3), padding=TORCH_PAD_3X3, use_bias=False, kernel_init=conv_init,
                    dtype=self.dtype, name="conv_stem")(images)
        x = nn.relu(batch_norm(train, self.dtype)(name="bn_stem")(x))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(self.width * 2**stage, stride, self.dtype,
                               name=f"stage{stage + 1}_block{block}")(x, train)
        features = x.astype(jnp.float32).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=head_init, dtype=jnp.float32, name="head")(features)
