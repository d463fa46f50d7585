"""Vision Transformer pieces shared by MAE, CL-MAE and CBM: the one ViT of the project.

Layouts follow timm 0.3.2 (used by facebookresearch/mae and the CL-MAE code): one fused `qkv`
projection, pre-norm blocks, exact-erf GELU, xavier-uniform linear weights, zero biases, fixed 2-D
sin-cos position embeddings with a zero embedding for the CLS token.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clmae_jax.runtime.errors import UserError, check_choice, check_tiling

# Encoder sizes: width, depth, heads (ViT paper, Table 1; tiny from DeiT).
VIT_SIZES = {
    "mini": dict(width=128, depth=4, num_heads=4),  # For CPU quickstarts and tests, not a published size.
    "tiny": dict(width=192, depth=12, num_heads=3),
    "small": dict(width=384, depth=12, num_heads=6),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
    "huge": dict(width=1280, depth=32, num_heads=16),
}

dense_init = nn.initializers.xavier_uniform()
# MAE initialises the patch projection as a flattened linear layer: fan-in over (p, p, C).
patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)


def vit_size(name: str) -> dict:
    """Width, depth and heads of a named ViT size (tiny/small/base/large/huge)."""
    return VIT_SIZES[check_choice("model.size", name, VIT_SIZES)]


def sincos_1d(width: int, positions: np.ndarray) -> np.ndarray:
    """1-D sin-cos embedding of `positions`: half sines, half cosines, MAE's frequencies."""
    omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
    angles = np.einsum("p,f->pf", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(width: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid_size**2, width], row-major, as in MAE."""
    if width % 4:
        raise UserError(f"sin-cos position embeddings need a width divisible by 4, got {width}.")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    # MAE embeds the column (w) coordinate in the first half and the row (h) in the second.
    emb = np.concatenate([sincos_1d(width // 2, cols), sincos_1d(width // 2, rows)], axis=1)
    return emb.astype(np.float32)


def resize_positions(table, grid: int) -> np.ndarray:
    """A learned [1 + L, D] position table (CLS row first) for a grid x grid patch grid: the patch rows resized
    bicubically over their 2-D grid, the CLS row kept (facebookresearch/mae's interpolate_pos_embed)."""
    table = np.asarray(table, np.float32)
    old = int(round((table.shape[0] - 1) ** 0.5))
    if old == grid:
        return table
    patches = jax.image.resize(table[1:].reshape(old, old, -1), (grid, grid, table.shape[1]), "cubic",
                               antialias=False)
    return np.concatenate([table[:1], np.asarray(patches).reshape(grid * grid, -1)])


def patchify(images, patch_size: int):
    """[B,H,W,C] -> [B, L, p*p*C], patches row-major, pixels (p, p, C) within a patch as in MAE.

    A row of a patch is read as one run of p*C values ([B, H/p, p, W/p, p*C]), so the only transpose is of those
    runs: on a TPU the (W, C) layout's 3-wide minor axis is never transposed by itself. With `PatchEmbed` reading
    these patches, the ViT-B MAE step's image work (embedding, targets) is 1.0 -> 0.67 ms on a v5e:2x2 compile and
    the step 16.8 -> 16.2 ms on v5e-256 with `mesh.fsdp=32` (compiler estimates, 16 images per chip)."""
    b, h, w, c = images.shape
    p = patch_size
    rows = images.reshape(b, h // p, p, w // p, p * c)
    return jnp.einsum("bhpwq->bhwpq", rows).reshape(b, (h // p) * (w // p), p * p * c)


class PatchProjection(nn.Module):
    """The patch embedding's stride-p convolution (kernel [p, p, C, width], bias [width]: timm's `proj`) applied as
    one matmul to patches from `patchify`, which order pixels as the kernel does."""

    patch_size: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches):
        p, channels = self.patch_size, patches.shape[-1] // self.patch_size ** 2
        kernel = self.param("kernel", patch_init, (p, p, channels, self.width))
        bias = self.param("bias", nn.initializers.zeros, (self.width,))
        patches, kernel, bias = nn.dtypes.promote_dtype(patches, kernel, bias, dtype=self.dtype)
        return patches @ kernel.reshape(-1, self.width) + bias


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches projected to `width` channels: [B,H,W,C] -> [B,L,width]."""

    patch_size: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        check_tiling(images.shape[1], images.shape[2], p, f"patch size {p}",
                     "change config.input.image_size or config.model.patch_size")
        return PatchProjection(p, self.width, self.dtype, name="proj")(patchify(images, p))


ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")
# Widest head cuDNN's fused attention takes (Hopper and later; 128 before): wider ones (ViT-H's masking module,
# 1280 / 4 heads = 320) run jax.nn.dot_product_attention's XLA implementation instead.
CUDNN_MAX_HEAD_DIM = 256


def einsum_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v over [B, L, H, D] inputs, the softmax in float32.

    Heads are moved before tokens once, so every product is a plain batched matmul, and the softmax is normalised
    after the product with v (an [L, D] division instead of an [L, L] one): the same numbers, fewer passes over
    the [L, L] scores, which dominate attention's cost on CPU.
    """
    q, k, v = (x.swapaxes(1, 2) for x in (q * np.float32(q.shape[-1] ** -0.5).astype(q.dtype), k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v) / weights.sum(axis=-1, keepdims=True)
    return out.astype(q.dtype).swapaxes(1, 2)


@jax.custom_vjp
def softmax_attention(q, k, v):
    """softmax(q k^T) v over heads-first [B, H, L, D] inputs, q already scaled by 1/sqrt(D): `einsum_attention`'s
    numbers with a hand-written backward pass that reads the unnormalised probabilities exp(logits - max) stored in
    the compute dtype. Under bfloat16 the [L, L] tensors between fusions stay bfloat16 and no exponential is
    recomputed (the TPU step's attention: float32 probabilities cost it twice their bytes); float32 gives the
    textbook numbers (tested). The scores are held keys-first, [B, H, L_k, L_q]: the softmax then reduces over
    the second-minor axis and the backward pass's score gradient fuses into its matmuls instead of being written
    out (v5e, one ViT-B decoder layer at 16 images per chip: 1077 -> 941 us)."""
    return _attention_forward(q, k, v)[0]


def _attention_forward(q, k, v):
    logits = jnp.einsum("bhkd,bhqd->bhkq", k, q)
    shifted = logits.astype(jnp.float32) - logits.max(axis=-2, keepdims=True).astype(jnp.float32)
    weights = jnp.exp(shifted).astype(v.dtype)
    total = weights.sum(axis=-2, dtype=jnp.float32)[..., None]
    out = (jnp.einsum("bhkq,bhkd->bhqd", weights, v) / total).astype(v.dtype)
    return out, (q, k, v, weights, total, out)


def _attention_backward(residuals, d_out):
    # With P = weights / total and G = v d_out^T (keys-first, as P): d_logits = P * (G - rowsum(d_out * out)), the
    # row sum broadcast over keys; 1 / total is folded into d_out, so P is never materialised.
    q, k, v, weights, total, out = residuals
    d_scaled = d_out.astype(jnp.float32) / total
    g = jnp.einsum("bhkd,bhqd->bhkq", v, d_scaled.astype(v.dtype))
    row = jnp.sum(d_scaled * out.astype(jnp.float32), axis=-1)[:, :, None, :]
    d_logits = (weights.astype(jnp.float32) * (g.astype(jnp.float32) - row)).astype(q.dtype)
    return (jnp.einsum("bhkq,bhkd->bhqd", d_logits, k), jnp.einsum("bhkq,bhqd->bhkd", d_logits, q),
            jnp.einsum("bhkq,bhqd->bhkd", weights, d_scaled.astype(v.dtype)))


softmax_attention.defvjp(_attention_forward, _attention_backward)


def padded_attention(q, k, v, implementation: str, multiple: int = 2):
    """`jax.nn.dot_product_attention` over [B, L, H, D] with L padded up to a multiple of `multiple`: the padded
    keys are masked out (key_value_seq_lengths), the padded query rows dropped, so the numbers are those of L.

    cuDNN's fused kernel is refused for odd lengths once differentiated (jax 0.10: "Unsupported sequence length
    Q 197, KV 197"), and the project's ViTs run 197 tokens (a 14 x 14 grid and the CLS token).
    """
    length = q.shape[1]
    padded = -(-length // multiple) * multiple
    if padded == length:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
    lengths = jnp.full((q.shape[0],), length, jnp.int32)
    out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out[:, :length]


def compile_platform() -> str:
    """The platform the program being traced compiles for: that of the mesh it is traced under (a GPU that is not
    attached included, see bench/gpu.py), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def cudnn_attention(q, k, v):
    """cuDNN's fused (flash) attention on an NVIDIA GPU in bfloat16 / float16, at any length, for heads up to
    CUDNN_MAX_HEAD_DIM wide (XLA's attention beyond); anywhere else, or in float32, a one-line error naming it."""
    platform = compile_platform()
    if platform != "gpu":
        raise UserError(f"config.model.attention='cudnn' is cuDNN's fused attention for NVIDIA GPUs, but this "
                        f"program compiles for {platform}; use 'einsum' or 'xla'.")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(f"config.model.attention='cudnn' computes in bfloat16 or float16, not {q.dtype}; set "
                        "config.model.dtype='bfloat16' or use 'einsum' or 'xla'.")
    if q.shape[-1] > CUDNN_MAX_HEAD_DIM:
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    return padded_attention(q, k, v, "cudnn")


def heads_in_matmuls() -> bool:
    """Whether the einsum attention runs its TPU form: projections whose matmuls write and read heads-first
    activations (`FusedQKV`, `HeadProjection`) and `softmax_attention`, or elsewhere the plain [B, L, W] matmuls
    with heads split off and merged by transposes around `einsum_attention`. On a TPU the transposes are layout
    copies and the float32 probabilities bytes (together 18% of the ViT-B MAE step); on a CPU the plain form is 3%
    faster."""
    return compile_platform() == "tpu"


class FusedQKV(nn.Module):
    """timm's fused qkv projection (one `qkv` Linear: kernel [W, 3W], bias [3W]) returning q, k and v split into
    heads: each [B, H, L, W / H] with `heads_first`, else [B, L, H, W / H]. Where `heads_in_matmuls`, three
    matmuls over the kernel's thirds, each output reshaped and transposed to heads-first (the compiler folds the
    transpose into the matmul). On a TPU this beats one matmul for all three, whose backward pass transposed the
    stacked [3, B, H, L, D] gradient, and einsums that write heads-first directly, whose kernel gradients the
    compiler turned into convolutions over the batch under `mesh.fsdp` (ViT-B MAE, v5e-256, `mesh.fsdp=32`: the
    projection's backward 2.5 -> 1.4 ms, the step 16.2 -> 15.3 ms). Elsewhere one [B, L, 3W] matmul."""

    num_heads: int
    dtype: Any = jnp.float32
    heads_first: bool = True

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        split = (*x.shape[:2], self.num_heads, width // self.num_heads)
        kernel = self.param("kernel", dense_init, (width, 3 * width))
        bias = self.param("bias", nn.initializers.zeros, (3 * width,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if heads_in_matmuls():
            thirds = [slice(i * width, (i + 1) * width) for i in range(3)]
            qkv = [(x @ kernel[:, third] + bias[third]).reshape(split) for third in thirds]
            return tuple(t.swapaxes(1, 2) if self.heads_first else t for t in qkv)
        qkv = (x @ kernel + bias).reshape(*split[:2], 3, *split[2:])
        return qkv.transpose(2, 0, 3, 1, 4) if self.heads_first else jnp.moveaxis(qkv, 2, 0)


class HeadProjection(nn.Module):
    """The attention's output projection (timm's `proj` Linear: kernel [W, W], bias [W]) of per-head outputs
    [B, H, L, W / H] (`heads_first`) or [B, L, H, W / H]: one einsum over heads and head dims where
    `heads_in_matmuls`, else heads merged, then a [B, L, W] matmul."""

    dtype: Any = jnp.float32
    heads_first: bool = True

    @nn.compact
    def __call__(self, out):
        heads, dim = out.shape[1 if self.heads_first else 2], out.shape[-1]
        kernel = self.param("kernel", dense_init, (heads * dim, heads * dim))
        bias = self.param("bias", nn.initializers.zeros, (heads * dim,))
        out, kernel, bias = nn.dtypes.promote_dtype(out, kernel, bias, dtype=self.dtype)
        if not heads_in_matmuls():
            merged = out.swapaxes(1, 2) if self.heads_first else out
            return merged.reshape(*merged.shape[:2], heads * dim) @ kernel + bias
        layout = "bhld" if self.heads_first else "blhd"
        return jnp.einsum(f"{layout},hdo->blo", out, kernel.reshape(heads, dim, heads * dim)) + bias


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm layout, `FusedQKV`).

    `implementation`: "einsum" (portable, the default: `einsum_attention`, or on a TPU `softmax_attention` between
    projections that keep the heads, see `heads_in_matmuls`), or `jax.nn.dot_product_attention` with "xla" or
    "cudnn" (fused flash attention on NVIDIA GPUs, bfloat16/float16 only; see `cudnn_attention`).
    """

    num_heads: int
    dtype: Any = jnp.float32
    implementation: str = "einsum"

    @nn.compact
    def __call__(self, x):
        check_choice("model.attention", self.implementation, ATTENTION_IMPLEMENTATIONS)
        heads_first = self.implementation == "einsum" and heads_in_matmuls()
        q, k, v = FusedQKV(self.num_heads, self.dtype, heads_first, name="qkv")(x)
        if heads_first:
            out = softmax_attention(q * np.float32(q.shape[-1] ** -0.5).astype(q.dtype), k, v)
        elif self.implementation == "einsum":
            out = einsum_attention(q, k, v)
        elif self.implementation == "cudnn":
            out = cudnn_attention(q, k, v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation="xla")
        return HeadProjection(self.dtype, heads_first, name="proj")(out)


def exact_gelu(x):
    """GELU with the erf, as torch.nn.GELU: x/2 (1 + erf(x / sqrt 2)) (flax's default is the tanh approximation;
    its exact form goes through erfc, which XLA evaluates with an exp and costs twice as much on CPU)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1 / np.sqrt(2))).astype(x.dtype))


class Mlp(nn.Module):
    """Two-layer MLP: fc1 -> activation (exact GELU by default) -> fc2."""

    hidden: int
    dtype: Any = jnp.float32
    activation: Callable = exact_gelu
    kernel_init: Callable = dense_init

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Dense(self.hidden, kernel_init=self.kernel_init, dtype=self.dtype, name="fc1")(x)
        x = self.activation(x)
        return nn.Dense(width, kernel_init=self.kernel_init, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))).

    DropPath (stochastic depth, fine-tuning only) zeroes a branch for a whole image with probability `drop_path`
    and scales the kept ones by 1 / (1 - drop_path); it needs a "dropout" rng unless `deterministic`.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    attention: str = "einsum"
    drop_path: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        norm = lambda name: nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name=name)
        drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=self.deterministic)
        x = x + drop(Attention(self.num_heads, self.dtype, self.attention, name="attn")(norm("norm1")(x)))
        hidden = int(x.shape[-1] * self.mlp_ratio)
        return x + drop(Mlp(hidden, dtype=self.dtype, name="mlp")(norm("norm2")(x)))


class Transformer(nn.Module):
    """A stack of `depth` pre-norm blocks (`__call__`: the last block's tokens) and its final LayerNorm `norm`,
    which the owner applies (created only when applied: MAE fine-tuning's global pool drops it).

    `remat` recomputes each block's activations in the backward pass: less memory for ViT-L/H, same numbers.
    `drop_path` is the last block's stochastic-depth rate, rising linearly from 0 at the first block (as timm).
    """

    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    attention: str = "einsum"
    remat: bool = False
    drop_path: float = 0.0
    deterministic: bool = True

    def setup(self):
        block = nn.remat(Block) if self.remat else Block
        for i, rate in enumerate(np.linspace(0.0, self.drop_path, self.depth)):
            # Named block0, block1, ... (fb/mae's blocks.0, blocks.1, ...), hence setattr.
            setattr(self, f"block{i}", block(self.num_heads, self.mlp_ratio, self.norm_eps, self.dtype,
                                             self.attention, float(rate), self.deterministic))
        self.norm = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype)

    def __call__(self, x):
        for i in range(self.depth):
            x = getattr(self, f"block{i}")(x)
        return x


class ClsToken(nn.Module):
    """Prepends a learnable CLS token (N(0, 0.02) init, zero position embedding)."""

    @nn.compact
    def __call__(self, x):
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, x.shape[-1]))
        cls = jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
        return jnp.concatenate([cls, x], axis=1)


POSITION_EMBEDDINGS = ("sincos", "learned")


class LearnedPositions(nn.Module):
    """A learnable [1 + L, D] position table added after the CLS token, started at the fixed sin-cos table with
    a zero CLS row: MAE fine-tuning (timm's `pos_embed` parameter, loaded from the pretraining checkpoint)."""

    @nn.compact
    def __call__(self, x):
        width, grid = x.shape[-1], int(round((x.shape[1] - 1) ** 0.5))
        start = lambda _: jnp.concatenate([jnp.zeros((1, width)), sincos_2d(width, grid)])
        return x + self.param("table", start)[None].astype(x.dtype)


class ViTEncoder(nn.Module):
    """The ViT encoder of every model here: patches + positions, CLS, pre-norm blocks, final LayerNorm.

    `__call__(images)` = `encode(embed(images))`; the MAE masks tokens between the two. A parent shares its scope
    (`nn.share_scope`), so the parameters keep the MAE encoder's names: patch_embed, cls_token, [pos_embed,] encoder.
    pos_embed: "sincos" (fixed, added in `embed`, before masking) or "learned" (fine-tuning: a table over the CLS
    and every patch, added in `encode`). See `Transformer` for remat and drop_path; `final_norm` False leaves the
    final LayerNorm out (MAE fine-tuning's global pool) and "encoded" out of `encode`'s dict.
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    attention: str = "einsum"  # See Attention.
    remat: bool = False
    drop_path: float = 0.0
    deterministic: bool = True
    pos_embed: str = "sincos"
    final_norm: bool = True

    def setup(self):
        check_choice("model.pos_embed", self.pos_embed, POSITION_EMBEDDINGS)
        self.patch_embed = PatchEmbed(self.patch_size, self.width, self.dtype)
        self.cls_token = ClsToken()
        if self.pos_embed == "learned":
            self.positions = LearnedPositions(name="pos_embed")
        self.encoder = Transformer(self.depth, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                                   attention=self.attention, remat=self.remat, drop_path=self.drop_path,
                                   deterministic=self.deterministic)

    def embed(self, images):
        """Patch embedding plus fixed 2-D sin-cos positions (a learned table waits for `encode`): [B, L, D]."""
        x = self.patch_embed(images)
        if self.pos_embed == "learned":
            return x
        grid = int(round(x.shape[1] ** 0.5))
        return x + jnp.asarray(sincos_2d(self.width, grid), self.dtype)[None]

    def encode(self, tokens):
        """CLS (+ the learned table) and the blocks over the given tokens: {"pre_norm", "encoded"} [B, 1 + L, D]."""
        x = self.cls_token(tokens)
        if self.pos_embed == "learned":
            x = self.positions(x)
        out = {"pre_norm": self.encoder(x)}
        if self.final_norm:
            out["encoded"] = self.encoder.norm(out["pre_norm"])
        return out

    def __call__(self, images):
        return self.encode(self.embed(images))


# What each pool computes from a ViTEncoder's `out` (facebookresearch/mae models_vit.py names the last two
# global_pool False / True); "gap_norm"'s LayerNorm is the classifier's trained `fc_norm`, or in evaluation a fresh
# one (the official kNN feature).
POOLS = {"cls": "the CLS token after the final LayerNorm",
         "gap": "the mean of the patch tokens after the final LayerNorm",
         "gap_norm": "the mean of the last block's patch tokens, then a LayerNorm"}


def pool_features(out, kind: str, norm: Callable):
    """The feature `kind` of POOLS from a ViTEncoder's out dict; `norm` is gap_norm's LayerNorm: [B, D]."""
    if kind == "cls":
        return out["encoded"][:, 0]
    if kind == "gap":
        return out["encoded"][:, 1:].mean(axis=1)
    return norm(out["pre_norm"][:, 1:].mean(axis=1))


class ViTClassifier(nn.Module):
    """ViT for supervised classification: the ViT encoder, a pooled feature (POOLS), a linear head.

    pool "gap_norm" is MAE fine-tuning's global pool: the final norm is dropped and `fc_norm` is trained instead.
    pos_embed: "sincos" (fixed, as in pretraining) or "learned" (MAE / timm / Hugging Face classifiers train it).
    The parameter names are the MAE encoder's (patch_embed, cls_token, encoder), so pretrained weights drop in.
    """

    num_classes: int
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pool: str = "cls"
    dtype: Any = jnp.float32
    drop_path: float = 0.0
    head_init_std: float = 0.02  # MAE fine-tuning: 2e-5.
    pos_embed: str = "sincos"
    attention: str = "einsum"  # See Attention.
    remat: bool = False  # See Transformer.

    @nn.compact
    def __call__(self, images, train: bool = False):
        check_choice("model.pool", self.pool, POOLS)
        encoder = ViTEncoder(self.patch_size, self.width, self.depth, self.num_heads, self.mlp_ratio, self.dtype,
                             self.attention, self.remat, drop_path=self.drop_path, deterministic=not train, pos_embed=self.pos_embed,
                             final_norm=self.pool != "gap_norm")
        nn.share_scope(self, encoder)
        fc_norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="fc_norm")
        features = pool_features(encoder(images), self.pool, fc_norm)
        head_init = nn.initializers.truncated_normal(self.head_init_std)
        return nn.Dense(self.num_classes, kernel_init=head_init, dtype=jnp.float32, name="head")(features)
