"""Mixup / CutMix and label smoothing: targets are convex mixtures that sum to 1, images mix as the targets say."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cbm_jax import mixup


def mix_config(**fields):
    return ml_collections.ConfigDict(dict(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5, prob=1.0,
                                          label_smoothing=0.0) | fields)


def test_label_smoothing_spreads_mass_uniformly():
    targets = mixup.smooth_targets(jnp.array([0, 2]), 4, 0.1)
    np.testing.assert_allclose(targets, [[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.925, 0.025]], rtol=1e-6)


def test_mixup_mixes_images_and_targets_with_the_same_lambda():
    images = jnp.stack([jnp.zeros((4, 4, 1)), jnp.ones((4, 4, 1))])
    mixed, targets = mixup.mix(jax.random.PRNGKey(0), images, jnp.array([0, 1]), 2, mix_config(mixup_alpha=0.8))
    lam = float(targets[0, 0])
    np.testing.assert_allclose(mixed[0], 1.0 - lam, rtol=1e-5)  # Image 0 (zeros) mixed with image 1 (ones).
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)


def test_cutmix_pastes_a_box_whose_area_sets_the_targets():
    images = jnp.stack([jnp.zeros((16, 16, 1)), jnp.ones((16, 16, 1))])
    for seed in range(5):
        mixed, targets = mixup.mix(jax.random.PRNGKey(seed), images, jnp.array([0, 1]), 2,
                                   mix_config(cutmix_alpha=1.0))
        pasted = float(jnp.mean(mixed[0]))  # Fraction of image 0 covered by image 1's pixels.
        np.testing.assert_allclose(targets[0], [1.0 - pasted, pasted], atol=1e-6)
