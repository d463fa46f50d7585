"""CBM MaskIn: mask counts, without-replacement sampling against exact probabilities, and the cell mask."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cbm_jax.masking import mask_images, num_masked_patches, patch_mask, sample_patches, uniform_probs

sample = jax.jit(sample_patches, static_argnums=2)


def _chi_square(observed_counts, expected_probs):
    expected = expected_probs * observed_counts.sum()
    return float(((observed_counts - expected) ** 2 / expected).sum())


def _critical(cells):
    # With the seed fixed the test is deterministic; a correct sampler passes this bound with probability 0.999,
    # while the wrong distributions checked below land orders of magnitude above it.
    return stats.chi2.ppf(0.999, cells - 1)


@pytest.mark.parametrize("ratio,expected", [(0.0, 0), (0.01, 1), (0.07, 1), (0.2, 3), (0.3124, 4), (0.5, 8),
                                            (1.0, 16)])
def test_num_masked_patches_is_the_official_floor(ratio, expected):
    assert num_masked_patches(ratio, 16) == expected


def test_num_masked_patches_rejects_ratios_outside_unit_interval():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        num_masked_patches(1.5, 16)


def test_uniform_probs():
    probs = uniform_probs(3, 16)
    chex.assert_shape(probs, (3, 16))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_samples_are_distinct_and_avoid_zero_mass_cells():
    probs = np.random.default_rng(0).dirichlet(np.ones(16), 4000).astype(np.float32)
    probs[:, ::3] = 0.0  # 6 zero cells, 10 with mass.
    indices = np.asarray(sample(jax.random.PRNGKey(0), probs, 9))
    chex.assert_shape(indices, (4000, 9))
    assert indices.dtype == np.int32
    assert all(len(set(row)) == 9 for row in indices)
    assert not np.any(indices % 3 == 0)


def test_k1_frequencies_match_probs():
    probs = np.arange(16, dtype=np.float32) / np.arange(16).sum()  # Cell 0 has no mass.
    indices = np.asarray(sample(jax.random.PRNGKey(1), jnp.tile(probs, (20000, 1)), 1))[:, 0]
    counts = np.bincount(indices, minlength=16)
    assert counts[0] == 0
    assert _chi_square(counts[1:], probs[1:]) < _critical(15)
    uniform = np.full(15, 1 / 15)
    assert _chi_square(counts[1:], uniform) > 10 * _critical(15)


def test_k2_ordered_pairs_match_sequential_sampling_without_replacement():
    p = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    pairs = list(itertools.permutations(range(5), 2))
    exact = np.array([p[i] * p[j] / (1 - p[i]) for i, j in pairs])  # First draw ~ p, second ~ p renormalised.
    indices = np.asarray(sample(jax.random.PRNGKey(2), jnp.tile(jnp.asarray(p, jnp.float32), (50000, 1)), 2))
    counts = np.array([np.sum((indices[:, 0] == i) & (indices[:, 1] == j)) for i, j in pairs])
    assert counts.sum() == 50000  # Never the same cell twice.
    assert _chi_square(counts, exact) < _critical(len(pairs))
    independent = np.array([p[i] * p[j] for i, j in pairs]) / sum(p[i] * p[j] for i, j in pairs)
    assert _chi_square(counts, independent) > 10 * _critical(len(pairs))


def test_too_few_cells_with_mass_takes_them_first_then_zero_mass_cells_uniformly():
    probs = jnp.tile(jnp.array([0, 0.8, 0, 0, 0.2, 0, 0, 0], jnp.float32), (6000, 1))
    indices = np.asarray(sample(jax.random.PRNGKey(3), probs, 5))
    assert all(set(row[:2]) == {1, 4} and len(set(row)) == 5 for row in indices)
    frequency = np.bincount(indices[:, 2:].ravel(), minlength=8)[[0, 2, 3, 5, 6, 7]] / 6000
    np.testing.assert_allclose(frequency, 0.5, atol=0.03)  # 3 of 6 zero-mass cells; 6 sigma is about 0.04.


def test_sample_rejects_k_above_the_number_of_cells():
    with pytest.raises(ValueError, match="k=17"):
        sample_patches(jax.random.PRNGKey(0), uniform_probs(1, 16), 17)


def _numpy_mask(indices, grid, height, width):
    mask = np.ones((len(indices), height, width, 1), np.float32)
    ch, cw = height // grid, width // grid
    for b, row in enumerate(indices):
        for index in row:
            r, c = divmod(int(index), grid)
            mask[b, r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = 0
    return mask


def test_patch_mask_zeroes_exactly_the_chosen_cells():
    indices = np.array([[0, 9], [15, 6], [4, 1]], np.int32)  # Cell 9 = row 2, col 1; 6 = row 1, col 2.
    mask = np.asarray(jax.jit(patch_mask, static_argnums=(1, 2, 3))(indices, 4, 12, 8))  # 3x2-pixel cells.
    chex.assert_shape(mask, (3, 12, 8, 1))
    np.testing.assert_array_equal(mask, _numpy_mask(indices, 4, 12, 8))
    np.testing.assert_array_equal((mask == 0).sum(axis=(1, 2, 3)), 2 * 3 * 2)
    assert mask[0, 6:9, 2:4].max() == 0 and mask[0, 3:6, 4:6].min() == 1


def test_patch_mask_with_no_cells_is_all_ones():
    np.testing.assert_array_equal(patch_mask(jnp.zeros((2, 0), jnp.int32), 4, 8, 8), np.ones((2, 8, 8, 1)))


@pytest.mark.parametrize("fill", [0.0, -1.0])
def test_mask_images_fills_all_channels_of_the_chosen_cells(fill):
    images = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 12, 3))
    indices = jnp.array([[3, 8], [0, 5]], jnp.int32)
    masked = jax.jit(mask_images, static_argnums=(2, 3))(images, indices, 4, fill)
    keep = _numpy_mask(np.asarray(indices), 4, 8, 12)
    chex.assert_type(masked, images.dtype)
    np.testing.assert_array_equal(masked, np.where(keep > 0, images, fill))
    assert np.sum(np.asarray(masked) != np.asarray(images)) == 2 * 2 * (2 * 3) * 3


def test_patch_mask_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible"):
        patch_mask(jnp.zeros((1, 1), jnp.int32), 4, 10, 8)
