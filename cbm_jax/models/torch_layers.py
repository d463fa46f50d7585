"""PyTorch-compatible layers shared by the CBM models (ResNet, Wide-ResNet, CvT): BatchNorm2d, padding and the
default initialisers, so weights and numbers match the official PyTorch code."""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's default Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)), is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# PyTorch pads a 3x3 conv by one pixel on every side; flax's "SAME" pads (0, 1) when striding by 2 on even
# sizes, which would shift the sampling grid of every downsampling conv by a pixel.
TORCH_PAD_3X3 = ((1, 1), (1, 1))


def batch_norm(train: bool, dtype: Any, momentum: float = 0.9):
    """BatchNorm as torch.nn.BatchNorm2d: flax momentum 0.9 is PyTorch's 0.1, eps 1e-5."""
    # axis_name=None is synchronised BN here: the step is jitted over the mesh with global-batch semantics,
    # so XLA reduces the batch statistics over the whole global batch, across devices.
    # Flax keeps the biased batch variance in its running average where PyTorch keeps the unbiased one; the factor
    # n / (n - 1) with n = batch * height * width (>= 1024 for batch 64 at 32x32) is negligible.
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=momentum, epsilon=1e-5,
                             axis_name=None, dtype=dtype)


def torch_default_bias_init(fan_in: int):
    """PyTorch's default bias init for a layer with `fan_in` inputs: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_conv(features: int, kernel: int, fan_in: int, dtype: Any, **kwargs):
    """A biased conv with PyTorch's default initialisation; `fan_in` is in_channels * kernel**2."""
    return nn.Conv(features, (kernel, kernel), kernel_init=torch_default_kernel_init,
                   bias_init=torch_default_bias_init(fan_in), dtype=dtype, **kwargs)
