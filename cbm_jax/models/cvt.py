"""CvT, the Convolutional vision Transformer (Wu et al. 2021) of microsoft/CvT `lib/models/cls_cvt.py`.

Three stages, each a strided conv token embedding + LayerNorm followed by pre-norm transformer blocks whose
q, k and v come from a depthwise 3x3 conv + BatchNorm over the token grid ("dw_bn"), k and v strided by 2,
then a linear projection. Only the last stage carries a class token; it bypasses the conv projections. There
is no position embedding. The logits are a linear head on the final LayerNorm of the class token.

Parameter names follow the official checkpoint (`stage2.blocks.0.attn.conv_proj_q.bn` is
`stage2/blocks_0/attn/conv_proj_q/bn`), so `cbm_jax.interop.cvt_torch` maps ImageNet weights one to one.

Details of the reference kept here:
- the attention scale is width**-0.5, not head_dim**-0.5;
- LayerNorm eps is 1e-5 (the official `get_cls_model`, CBM and Hugging Face all use it);
- the official ImageNet training used QuickGELU, but CBM builds `ConvolutionalVisionTransformer(spec=...)`
  directly, whose default is exact-erf `nn.GELU` (as Hugging Face's port); `quick_gelu=False` is therefore the
  faithful CBM setting, and True reproduces the official ImageNet model;
- stochastic depth rises linearly from 0 within a stage, to 0.1 in the last stage only.

CBM's MaskIn layer is not part of this model: the training step masks the normalised images before the call.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from clmae_jax.models.vit import Mlp, exact_gelu
from cbm_jax.models.torch_layers import batch_norm, torch_default_bias_init, torch_default_kernel_init
from clmae_jax.runtime.errors import UserError

# Stage layouts of experiments/imagenet/cvt/cvt-{13,21}-224x224.yaml; `CvT(num_classes, **CVT_21)` builds CvT-21.
CVT_13 = dict(embed_dim=(64, 192, 384), num_heads=(1, 3, 6), depth=(1, 2, 10), drop_path_rate=(0.0, 0.0, 0.1))
CVT_21 = dict(embed_dim=(64, 192, 384), num_heads=(1, 3, 6), depth=(1, 4, 16), drop_path_rate=(0.0, 0.0, 0.1))

# The official `_init_weights_trunc_normal`: Linear weights trunc_normal(0.02) with zero bias; convs keep
# PyTorch's default initialisation.
dense_init = nn.initializers.truncated_normal(0.02)


def head_bias_init(width: int):
    """The official head keeps nn.Linear's default bias, U(+-1/sqrt(width)); only its weight is trunc_normal."""
    return torch_default_bias_init(width)


def quick_gelu(x):
    """x * sigmoid(1.702 x), the activation of the official CvT ImageNet training."""
    return x * nn.sigmoid(1.702 * x)


class ConvEmbed(nn.Module):
    """Overlapping strided conv + LayerNorm: [B,H,W,C] -> [B,H/stride,W/stride,width]."""

    width: int
    patch_size: int
    stride: int
    padding: int
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1] * self.patch_size ** 2
        pad = ((self.padding, self.padding),) * 2
        x = nn.Conv(self.width, (self.patch_size,) * 2, strides=self.stride, padding=pad,
                    kernel_init=torch_default_kernel_init, bias_init=torch_default_bias_init(fan_in),
                    dtype=self.dtype, name="proj")(x)
        return nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm")(x)


class ConvProjection(nn.Module):
    """The "dw_bn" projection: depthwise 3x3 conv (no bias) + BatchNorm, flattened to [B,T,C]."""

    stride: int
    kernel_size: int = 3
    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, grid, train: bool):
        channels = grid.shape[-1]
        pad = ((self.padding, self.padding),) * 2
        x = nn.Conv(channels, (self.kernel_size,) * 2, strides=self.stride, padding=pad,
                    feature_group_count=channels, use_bias=False, kernel_init=torch_default_kernel_init,
                    dtype=self.dtype, name="conv")(grid)
        # batch_norm is PyTorch's BatchNorm2d (momentum 0.1, eps 1e-5) on the `batch_stats` collection; under
        # jit over the mesh with global-batch semantics its statistics are global, i.e. synchronised BN.
        x = batch_norm(train, self.dtype)(name="bn")(x)
        return x.reshape(x.shape[0], -1, channels)


class ConvAttention(nn.Module):
    """Multi-head attention over conv-projected q, k, v; the class token skips the convs."""

    num_heads: int
    with_cls_token: bool
    stride_kv: int = 2
    stride_q: int = 1
    qkv_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, grid_shape, train: bool):
        batch, _, width = x.shape
        cls_token, tokens = (x[:, :1], x[:, 1:]) if self.with_cls_token else (None, x)
        grid = tokens.reshape(batch, *grid_shape, width)

        def project(name, stride):
            y = ConvProjection(stride, dtype=self.dtype, name=f"conv_proj_{name}")(grid, train)
            if cls_token is not None:
                y = jnp.concatenate([cls_token.astype(y.dtype), y], axis=1)
            y = nn.Dense(width, use_bias=self.qkv_bias, kernel_init=dense_init, dtype=self.dtype,
                         name=f"proj_{name}")(y)
            return y.reshape(batch, y.shape[1], self.num_heads, -1)

        q, k, v = project("q", self.stride_q), project("k", self.stride_kv), project("v", self.stride_kv)
        # The reference scales by the full width, not the head width.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * width ** -0.5
        weights = nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, -1, width)
        return nn.Dense(width, kernel_init=dense_init, dtype=self.dtype, name="proj")(out)


class Block(nn.Module):
    """x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    num_heads: int
    with_cls_token: bool
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    quick_gelu: bool = False
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, grid_shape, train: bool):
        norm = lambda name: nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name=name)
        # Dropout shared over tokens and channels drops a sample's whole branch: stochastic depth, 'dropout' rng.
        drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
        attn = ConvAttention(self.num_heads, self.with_cls_token, dtype=self.dtype, name="attn")
        x = x + drop_path(attn(norm("norm1")(x), grid_shape, train))
        mlp = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, quick_gelu if self.quick_gelu else exact_gelu,
                  dense_init, name="mlp")
        return x + drop_path(mlp(norm("norm2")(x)))


class Stage(nn.Module):
    """Conv embedding, optional class token, `depth` blocks: returns the token grid and the class token."""

    width: int
    depth: int
    num_heads: int
    patch_size: int
    stride: int
    padding: int
    with_cls_token: bool
    drop_path_rate: float = 0.0
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        grid = ConvEmbed(self.width, self.patch_size, self.stride, self.padding, self.norm_eps, self.dtype,
                         name="patch_embed")(x)
        batch, height, width, _ = grid.shape
        x = grid.reshape(batch, height * width, self.width)
        if self.with_cls_token:
            cls_token = self.param("cls_token", dense_init, (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, self.width)).astype(x.dtype), x], axis=1)
        for j, drop_path in enumerate(np.linspace(0.0, self.drop_path_rate, self.depth)):
            x = Block(self.num_heads, self.with_cls_token, self.mlp_ratio, float(drop_path), self.quick_gelu,
                      self.norm_eps, self.dtype, name=f"blocks_{j}")(x, (height, width), train)
        cls_token, x = (x[:, :1], x[:, 1:]) if self.with_cls_token else (None, x)
        return x.reshape(batch, height, width, self.width), cls_token


class CvT(nn.Module):
    """CvT classifier (CvT-13 by default): images [B,H,W,3] normalised, NHWC -> float32 logits [B,num_classes]."""

    num_classes: int
    embed_dim: Sequence[int] = CVT_13["embed_dim"]
    num_heads: Sequence[int] = CVT_13["num_heads"]
    depth: Sequence[int] = CVT_13["depth"]
    drop_path_rate: Sequence[float] = CVT_13["drop_path_rate"]
    patch_size: Sequence[int] = (7, 3, 3)
    patch_stride: Sequence[int] = (4, 2, 2)
    patch_padding: Sequence[int] = (2, 1, 1)
    mlp_ratio: float = 4.0
    quick_gelu: bool = False  # CBM's model uses exact GELU; True matches the official ImageNet training.
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool):
        stages = (self.embed_dim, self.num_heads, self.depth, self.drop_path_rate, self.patch_size,
                  self.patch_stride, self.patch_padding)
        if len({len(s) for s in stages}) != 1:
            raise UserError(f"CvT stage settings differ in length: {[tuple(s) for s in stages]}; give one "
                            "entry per stage to embed_dim, num_heads, depth, drop_path_rate and the patch lists.")
        if any(width % heads for width, heads in zip(self.embed_dim, self.num_heads)):
            raise UserError(f"CvT embed_dim {tuple(self.embed_dim)} must be divisible by num_heads "
                            f"{tuple(self.num_heads)} stage by stage; change one of them.")
        x, last = images.astype(self.dtype), len(self.depth) - 1
        for i, (width, heads, depth, dpr, patch, stride, pad) in enumerate(zip(*stages)):
            x, cls_token = Stage(width, depth, heads, patch, stride, pad, with_cls_token=i == last,
                                 drop_path_rate=dpr, mlp_ratio=self.mlp_ratio, quick_gelu=self.quick_gelu,
                                 norm_eps=self.norm_eps, dtype=self.dtype, name=f"stage{i}")(x, train)
        features = nn.LayerNorm(epsilon=self.norm_eps, dtype=jnp.float32, name="norm_final")(cls_token[:, 0])
        return nn.Dense(self.num_classes, kernel_init=dense_init, bias_init=head_bias_init(features.shape[-1]),
                        dtype=jnp.float32, name="head")(features)
