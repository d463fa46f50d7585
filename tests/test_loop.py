"""The shared loop: step budget, gradient accumulation equal to one big batch, the non-finite guard on every
step (a NaN between two logging steps is never checkpointed)."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clmae_jax.runtime import loop
from clmae_jax.runtime.state import TrainState
from clmae_jax.train_mae import MAE
from configs import mae_fashion_mnist


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


def test_health_names_the_first_non_finite_step_and_what():
    health = loop.Health("stop")
    params = {"w": jnp.ones(3)}
    health.update(1, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(2.0)}, params)
    health.check(None)
    health.update(2, {"loss": jnp.float32(np.nan), "grad_norm": jnp.float32(np.inf)}, params)
    health.update(3, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)}, {"w": jnp.full(3, np.nan)})
    with pytest.raises(FloatingPointError, match=r"Non-finite grad_norm, loss at step 2.*No checkpoint was saved\.$"):
        health.check(None)
    with pytest.raises(FloatingPointError, match=r"Checkpoint step 1 is untouched\.$"):
        health.check(1)
    measured = loop.Health("stop")  # A step that measures param_norm: its finiteness stands for the parameters'.
    measured.update(1, {"loss": jnp.float32(1.0), "param_norm": jnp.float32(np.inf)}, params)
    with pytest.raises(FloatingPointError, match=r"Non-finite param_norm, params at step 1"):
        measured.check(None)
    skipping = loop.Health("skip")  # Skipped updates are expected to be non-finite; only parameters count.
    skipping.update(1, {"loss": jnp.float32(np.nan), "skipped_update": jnp.float32(1.0)}, params)
    skipping.check(None)
    assert skipping.skipped() == 1.0
    with pytest.raises(ValueError, match="config.nonfinite"):
        loop.Health("ignore")


def test_skip_nonfinite_keeps_the_state_and_advances_the_step():
    def step_fn(state, scale):
        params = jax.tree.map(lambda p: p * scale, state.params)
        return state.replace(step=state.step + 1, params=params), {"loss": jnp.sum(params["w"])}

    state = TrainState(step=jnp.int32(0), params={"w": jnp.ones(2)}, opt_state=())
    guarded = jax.jit(loop.skip_nonfinite(step_fn))
    state, measured = guarded(state, jnp.float32(2.0))
    assert float(measured["skipped_update"]) == 0.0 and state.params["w"].tolist() == [2.0, 2.0]
    state, measured = guarded(state, jnp.float32(np.nan))
    assert float(measured["skipped_update"]) == 1.0 and state.params["w"].tolist() == [2.0, 2.0]
    assert int(state.step) == 2


class NaNAtStep2(MAE):
    """MAE whose parameters turn NaN in its second update, between two logging steps (the update starts from NaN
    parameters, so the step's own measurements see it, as they would see an overflow)."""

    def train_step(self, state, batch, step):
        if step == 2:
            state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        return super().train_step(state, batch, step)


@pytest.mark.slow
def test_nan_between_logging_steps_is_never_checkpointed(tmp_path):
    config = mae_fashion_mnist.get_config("test")
    config.update(total_steps=4, log_every_steps=100, checkpoint_every_steps=1, image_every_steps=0)
    workdir = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"Non-finite .*\bparams\b.* at step 2;"):
        loop.train(config, workdir, NaNAtStep2)
    # Step 1 was saved; the NaN state of step 2 never was.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
