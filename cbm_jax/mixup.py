"""Mixup / CutMix with label smoothing, as timm's `Mixup` in batch mode (the MAE fine-tuning recipe).

One mixing coefficient per batch; each image is mixed with its mirror in the batch (image i with image B-1-i).
"""
import jax
import jax.numpy as jnp


def smooth_targets(labels, num_classes: int, smoothing: float):
    """One-hot targets with `smoothing` of the mass spread uniformly over the classes."""
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + smoothing / num_classes


def cutmix_box(rng, lam, height: int, width: int):
    """A [H, W] boolean box of area about (1 - lam) at a uniform centre, clipped; and the area-corrected lam."""
    cut = jnp.sqrt(1.0 - lam)
    cy, cx = jax.random.uniform(rng, (2,)) * jnp.array([height, width])
    y0, y1 = jnp.clip(cy - cut * height / 2, 0, height), jnp.clip(cy + cut * height / 2, 0, height)
    x0, x1 = jnp.clip(cx - cut * width / 2, 0, width), jnp.clip(cx + cut * width / 2, 0, width)
    y0, y1, x0, x1 = (jnp.round(v).astype(jnp.int32) for v in (y0, y1, x0, x1))
    ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    return box, 1.0 - jnp.sum(box) / (height * width)


def mix(rng, images, labels, num_classes: int, config):
    """(mixed images, soft targets) for config (mixup_alpha, cutmix_alpha, switch_prob, prob, label_smoothing)."""
    targets = smooth_targets(labels, num_classes, config.label_smoothing)
    if not (config.mixup_alpha > 0 or config.cutmix_alpha > 0):
        return images, targets
    apply_rng, switch_rng, mixup_rng, cutmix_rng, box_rng = jax.random.split(rng, 5)
    if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(switch_rng) < config.switch_prob
    else:
        use_cutmix = jnp.asarray(config.cutmix_alpha > 0)
    lam_mixup = jax.random.beta(mixup_rng, max(config.mixup_alpha, 1e-3), max(config.mixup_alpha, 1e-3))
    lam_cutmix = jax.random.beta(cutmix_rng, max(config.cutmix_alpha, 1e-3), max(config.cutmix_alpha, 1e-3))
    box, lam_box = cutmix_box(box_rng, lam_cutmix, images.shape[1], images.shape[2])
    flipped = images[::-1]
    mixed = jnp.where(use_cutmix, jnp.where(box[None, :, :, None], flipped, images),
                      lam_mixup * images + (1.0 - lam_mixup) * flipped)
    lam = jnp.where(use_cutmix, lam_box, lam_mixup)
    applied = jax.random.uniform(apply_rng) < config.prob
    lam = jnp.where(applied, lam, 1.0)
    return jnp.where(applied, mixed, images), lam * targets + (1.0 - lam) * targets[::-1]
