"""Shared loop pieces: step budget, gradient accumulation equal to one big batch, the non-finite guard."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clmae_jax.runtime import loop


def test_step_budget():
    config = ml_collections.ConfigDict(dict(batch_size=100, num_epochs=3, total_steps=0))
    assert loop.step_budget(config, 1050) == (10, 30)
    config.total_steps = 7
    assert loop.step_budget(config, 1050) == (10, 7)
    config.batch_size = 2000
    with pytest.raises(ValueError, match="exceeds the 1050 training examples"):
        loop.step_budget(config, 1050)


def test_gradient_accumulation_equals_the_full_batch():
    def loss_and_grad(w, batch, rng):
        del rng
        loss_fn = lambda w: (jnp.mean((batch["x"] @ w - batch["y"]) ** 2), {"n": jnp.float32(batch["x"].shape[0])})
        return jax.value_and_grad(loss_fn, has_aux=True)(w)

    batch = {"x": jax.random.normal(jax.random.PRNGKey(0), (12, 3)), "y": jnp.arange(12.0)}
    w = jnp.array([0.5, -1.0, 2.0])
    (loss, _), grads = loss_and_grad(w, batch, None)
    (loss4, aux4), grads4 = loop.accumulate_gradients(loss_and_grad, w, batch, jax.random.PRNGKey(0), 4)
    np.testing.assert_allclose(loss4, loss, rtol=1e-6)
    np.testing.assert_allclose(grads4, grads, rtol=1e-5)
    assert float(aux4["n"]) == 3.0  # Aux is averaged over the 4 micro-batches of 3.
    with pytest.raises(ValueError, match="grad_accum_steps=5"):
        loop.accumulate_gradients(loss_and_grad, w, batch, jax.random.PRNGKey(0), 5)


def test_non_finite_measurements_stop_the_run():
    loop.check_finite({"loss": 1.0}, 3)
    with pytest.raises(FloatingPointError, match="Non-finite loss at step 3"):
        loop.check_finite({"loss": float("nan"), "grad_norm": 1.0}, 3)
