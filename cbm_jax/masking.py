"""CBM's MaskIn: zero k salience-sampled grid cells of every (normalised) training image.

Official models/resnet.py: k = int(16 * max(r, 0.07)) for r > 0, `torch.multinomial(P, k)` draws k distinct cells
per image (without replacement, each draw proportional to the remaining weights), and those cells are set to 0 in
every channel of the normalised input. Cells are indexed row-major (row * grid + col) on a grid x grid split.
"""
import jax
import jax.numpy as jnp

from clmae_jax.runtime.errors import UserError, check_tiling

MIN_RATIO = 0.07  # Official floor for any non-zero ratio: at least one of 16 cells is masked.


def num_masked_patches(ratio, num_patches):
    """Official k = int(num_patches * max(ratio, 0.07)) for ratio > 0, else 0 (a Python int: static under jit)."""
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"Masking ratio must be in [0, 1], got {ratio}; fix the masking schedule.")
    return int(num_patches * max(ratio, MIN_RATIO)) if ratio > 0 else 0


def uniform_probs(batch, num_patches):
    """Uniform cell probabilities [batch, num_patches]: the random-masking ablation (official fallback for P=None)."""
    return jnp.full((batch, num_patches), 1.0 / num_patches, jnp.float32)


def sample_patches(rng, probs, k):
    """k distinct cells per row of non-negative weights `probs` [B,n], as torch.multinomial(probs, k); -> [B,k] int32.

    Gumbel top-k: argsorting log p_i + Gumbel noise gives the sequential without-replacement draw order exactly
    (Plackett-Luce), so the result equals sequential multinomial sampling, first draw first.
    Where fewer than k cells have mass, all of them are taken and the rest are drawn uniformly among the zero-mass
    cells (torch.multinomial raises instead); a flat cell of a mostly flat image is the realistic case.
    """
    if not 0 <= k <= probs.shape[-1]:
        raise UserError(f"Cannot draw k={k} distinct cells out of {probs.shape[-1]}; use 0 <= k <= {probs.shape[-1]}.")
    gumbel = jax.random.gumbel(rng, probs.shape, jnp.float32)
    # log(p) >= -104 for any positive float32, |gumbel| < 20: a -1e3 offset ranks zero-mass cells last, in random order.
    keys = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)) + gumbel, gumbel - 1e3)
    return jax.lax.top_k(keys, k)[1].astype(jnp.int32)


def patch_mask(indices, grid, height, width):
    """Multiplicative mask [B,H,W,1] float32: 0 on the cells in `indices` [B,k], 1 elsewhere."""
    check_tiling(height, width, grid, f"the {grid}x{grid} patch grid",
                 f"resize the images to a multiple of {grid} or change config.cbm.grid")
    masked = jax.nn.one_hot(indices, grid * grid, dtype=jnp.float32).sum(axis=1) > 0  # [B, grid^2]
    keep = (~masked).astype(jnp.float32).reshape(-1, grid, 1, grid, 1)
    cells = jnp.broadcast_to(keep, (keep.shape[0], grid, height // grid, grid, width // grid))
    return cells.reshape(-1, height, width, 1)


def mask_images(images, indices, grid, fill=0.0):
    """Sets the cells in `indices` [B,k] of normalised images [B,H,W,C] to `fill` in all channels (0 = official)."""
    mask = patch_mask(indices, grid, images.shape[1], images.shape[2])
    return jnp.where(mask > 0, images, jnp.asarray(fill, images.dtype))
