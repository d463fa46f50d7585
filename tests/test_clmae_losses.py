"""Tests for the CL-MAE masking-module losses against numpy re-computations and toy optimisations."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clmae_jax import losses


def _probs(seed, n=6, length=10):
    return np.random.default_rng(seed).uniform(0.01, 0.99, size=(n, length)).astype(np.float32)


def test_curriculum_loss_matches_numpy():
    m = _probs(0)
    e = np.random.default_rng(1).uniform(0.0, 2.0, size=m.shape).astype(np.float32)
    expected = np.sum((1 - m.astype(np.float64)) * e) / np.sum(1 - m.astype(np.float64))
    np.testing.assert_allclose(losses.curriculum_loss(jnp.asarray(e), jnp.asarray(m)), expected, rtol=1e-6)


def test_curriculum_loss_ignores_kept_patches():
    m = np.array([[1.0, 0.0, 0.5]], np.float32)
    e = np.array([[100.0, 2.0, 4.0]], np.float32)
    # Weights (0, 1, 0.5): (2 + 2) / 1.5.
    np.testing.assert_allclose(losses.curriculum_loss(e, m), 4.0 / 1.5, rtol=1e-6)


def test_gaussian_loss_peak_and_tails():
    sigma = 0.12
    peak = losses.gaussian_loss(jnp.full((2, 5), 0.5), sigma)
    np.testing.assert_allclose(peak, sigma * math.sqrt(2 * math.pi), rtol=1e-6)
    assert losses.gaussian_loss(jnp.array([[0.0, 1.0]]), sigma) < 1e-4
    m = _probs(2)
    expected = np.mean(np.exp(-(m - 0.5) ** 2 / (2 * sigma ** 2))) * sigma * math.sqrt(2 * math.pi)
    np.testing.assert_allclose(losses.gaussian_loss(jnp.asarray(m), sigma), expected, rtol=1e-5)


def test_kl_loss_zero_at_target_and_positive_elsewhere():
    at_target = jnp.array([[0.125, 0.375, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]])
    assert float(losses.kl_loss(at_target)) == 0.0
    assert float(losses.kl_loss(jnp.full((3, 4), 0.5), target_keep_ratio=0.5)) == 0.0
    assert float(losses.kl_loss(jnp.full((3, 4), 0.3))) > 0.0


def test_kl_loss_matches_numpy_and_sums_over_images():
    m = _probs(3)
    p = m.astype(np.float64).mean(axis=1)
    per_image = p * np.log(p / 0.25) + (1 - p) * np.log((1 - p) / 0.75)
    np.testing.assert_allclose(losses.kl_loss(jnp.asarray(m)), per_image.sum(), rtol=1e-5)


def test_kl_loss_finite_at_saturation():
    m = jnp.ones((2, 4))
    value, grad = jax.value_and_grad(losses.kl_loss)(m)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_diversity_loss_matches_double_loop():
    m = _probs(4, n=7, length=12).astype(np.float64)
    n = m.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            total += math.exp(-0.1 * math.sqrt(np.sum((m[i] - m[j]) ** 2)))
    expected = total / (n * (n - 1) / 2)
    np.testing.assert_allclose(losses.diversity_loss(jnp.asarray(m, jnp.float32)), expected, atol=1e-6)


def test_diversity_loss_gradient_finite_for_identical_masks():
    m = jnp.asarray(_probs(5, n=4))
    m = m.at[1].set(m[0])
    value, grad = jax.value_and_grad(losses.diversity_loss)(m)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    assert np.any(grad != 0)


def test_diversity_loss_needs_two_images():
    with pytest.raises(ValueError, match="at least 2"):
        losses.diversity_loss(jnp.full((1, 4), 0.5))


def test_grouped_equals_plain_call_and_group_mean():
    m = jnp.asarray(_probs(6, n=8))
    e = jnp.asarray(_probs(7, n=8))
    for fn, args in [(losses.curriculum_loss, (e, m)), (losses.kl_loss, (m,)), (losses.diversity_loss, (m,)),
                     (losses.gaussian_loss, (m,))]:
        plain = jax.jit(fn)
        np.testing.assert_allclose(jax.jit(losses.grouped(fn, 8))(*args), plain(*args), rtol=1e-6)
        halves = [plain(*(a[:4] for a in args)), plain(*(a[4:] for a in args))]
        np.testing.assert_allclose(jax.jit(losses.grouped(fn, 4))(*args), np.mean(halves), rtol=1e-6)


def test_grouped_passes_keyword_arguments():
    m = jnp.asarray(_probs(8, n=4))
    np.testing.assert_allclose(losses.grouped(losses.kl_loss, 4)(m, target_keep_ratio=0.5),
                               losses.kl_loss(m, target_keep_ratio=0.5), rtol=1e-6)


def test_grouped_rejects_indivisible_batch():
    with pytest.raises(ValueError, match=r"10 .* 4.*loss_group_size"):
        losses.grouped(losses.kl_loss, 4)(jnp.full((10, 3), 0.5))


def _optimise(loss_fn, logits, steps, learning_rate=0.05):
    """Adam on free logits with m = sigmoid(logits); returns the final keep-probabilities."""
    opt = optax.adam(learning_rate)

    @jax.jit
    def step(carry, _):
        logits, state = carry
        grad = jax.grad(lambda z: loss_fn(jax.nn.sigmoid(z)))(logits)
        updates, state = opt.update(grad, state)
        return (optax.apply_updates(logits, updates), state), None

    (logits, _), _ = jax.lax.scan(step, (logits, opt.init(logits)), None, length=steps)
    return jax.nn.sigmoid(logits)


def _logits(scale):
    return scale * jax.random.normal(jax.random.PRNGKey(0), (16, 49))


def test_kl_alone_sets_keep_ratio():
    m = _optimise(losses.kl_loss, _logits(1.0), steps=300)
    chex.assert_shape(m, (16, 49))
    np.testing.assert_allclose(m.mean(axis=1), 0.25, atol=0.01)


def test_gaussian_alone_makes_probabilities_decisive():
    m = _optimise(losses.gaussian_loss, _logits(0.1), steps=300)
    decisive = np.mean((m < 0.1) | (m > 0.9))
    assert decisive >= 0.95, decisive


def _mean_pairwise_distance(m):
    m = np.asarray(m, np.float64)
    distances = np.linalg.norm(m[:, None] - m[None], axis=-1)
    return distances[np.triu_indices(len(m), k=1)].mean()


def test_diversity_alone_spreads_masks():
    start = _logits(0.1)
    m = _optimise(losses.diversity_loss, start, steps=200)
    assert _mean_pairwise_distance(m) > 2 * _mean_pairwise_distance(jax.nn.sigmoid(start))
