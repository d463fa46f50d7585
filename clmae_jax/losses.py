"""CL-MAE losses for the curriculum masking module (Madan et al., 2023, Sec. 3; official `forward_loss_mask`).

Notation: `keep_prob` m in (0,1)^{N x L} is the masking module's output, high = keep (visible); `per_patch_error`
e is the MAE's per-patch MSE. Each loss computes its term for ONE group of images, the way the official code
computes it per GPU over its 256 images; `grouped` applies a loss to consecutive groups of a global batch.
The loss weights (lambda_CL(t), lambda_G, lambda_KL, lambda_div) are applied by the caller.
"""
import math
from typing import Callable

import jax
import jax.numpy as jnp

from clmae_jax.runtime.errors import UserError


def curriculum_loss(per_patch_error, keep_prob):
    """L_rec = sum((1-m) * e) / sum(1-m): reconstruction error weighted by each patch's removal probability."""
    removal = 1.0 - keep_prob.astype(jnp.float32)
    return jnp.sum(removal * per_patch_error.astype(jnp.float32)) / jnp.sum(removal)


def gaussian_loss(keep_prob, sigma: float = 0.12):
    """L_G = mean(exp(-(m-0.5)^2 / (2 sigma^2)) / beta), beta = 1/(sigma sqrt(2 pi)): pushes m towards 0 or 1."""
    # The official code DIVIDES by the Gaussian pdf normaliser beta (i.e. multiplies by sigma*sqrt(2*pi) ~ 0.30),
    # so the peak value at m = 0.5 is 0.30, not the pdf's 3.32. We keep that constant: lambda_G = 1.0 was tuned
    # against it, and "fixing" it would silently scale the term by ~11x.
    beta = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    m = keep_prob.astype(jnp.float32)
    return jnp.mean(jnp.exp(-((m - 0.5) ** 2) / (2.0 * sigma ** 2)) / beta)


def kl_loss(keep_prob, target_keep_ratio: float = 0.25, eps: float = 1e-6):
    """L_KL = sum_n KL(Bernoulli(mean_i m_{n,i}) || Bernoulli(target)): drives each image's keep ratio to target."""
    # Officially the KL is SUMMED over the images of a group (torch.sum over the [N] vector), not averaged, so the
    # term grows with the group size; lambda_KL = 0.1 was tuned for groups of 256. The official target 0.25 is
    # hard-coded (= 1 - mask_ratio 0.75) rather than derived from mask_ratio; we expose it with that default.
    # The official code has no epsilon: a sigmoid mean never reaches 0 or 1 in fp32 at init, but a saturated
    # module (or a bf16 output rounded to 1.0) would give log(0) = -inf and NaN gradients, so we clip.
    p = jnp.clip(jnp.mean(keep_prob.astype(jnp.float32), axis=-1), eps, 1.0 - eps)
    q = target_keep_ratio
    kl = p * jnp.log(p / q) + (1.0 - p) * jnp.log((1.0 - p) / (1.0 - q))
    return jnp.sum(kl)


def diversity_loss(keep_prob, scale: float = 0.1):
    """L_div = mean over pairs i<j of exp(-scale * ||m_i - m_j||_2): penalises similar masks across images."""
    n = keep_prob.shape[0]
    if n < 2:
        raise UserError(f"diversity_loss needs at least 2 images per group, got {n}; "
                        "increase config.clmae.loss_group_size.")
    return jnp.mean(jnp.exp(-scale * pairwise_distances(keep_prob)))


def pairwise_distances(masks):
    """Euclidean distances ||m_i - m_j|| of every pair i < j of rows of `masks` [n, L]: a vector of n(n-1)/2."""
    m = masks.astype(jnp.float32)
    rows, cols = jnp.triu_indices(m.shape[0], k=1)
    squared = jnp.sum((m[rows] - m[cols]) ** 2, axis=-1)
    # sqrt has an infinite derivative at 0 (two identical masks); route those pairs through sqrt(1) and report 0,
    # so the gradient there is 0, as torch.cdist's backward gives for zero distances.
    nonzero = squared > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1.0)), 0.0)


def grouped(loss_fn: Callable, group_size: int) -> Callable:
    """Wraps `loss_fn` to run on consecutive groups of `group_size` images of a global batch and average them.

    Reproduces "each GPU computes the loss on its own images, DDP averages the gradients" independently of the
    number of devices. Keyword arguments of the returned function are passed to `loss_fn` unchanged.
    """
    if group_size < 1:
        raise UserError(f"Loss group size must be >= 1, got {group_size}; fix config.clmae.loss_group_size.")

    def group_mean(*arrays, **params):
        batch = arrays[0].shape[0]
        if batch % group_size:
            raise UserError(f"Global batch {batch} is not divisible by the loss group size {group_size}; "
                            "set config.clmae.loss_group_size to a divisor of the global batch.")
        split = lambda x: x.reshape(batch // group_size, group_size, *x.shape[1:])
        per_group = jax.vmap(lambda *xs: loss_fn(*xs, **params))(*map(split, arrays))
        return jnp.mean(per_group)

    return group_mean
