"""Optimizer recipes: the MAE learning-rate rule, the weight-decay mask, the schedules' shapes."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from clmae_jax.runtime import optim


def recipe(**fields):
    return ml_collections.ConfigDict(dict(name="adamw", lr=0.0, base_lr=1.5e-4, b1=0.9, b2=0.95, weight_decay=0.05,
                                          schedule="cosine", warmup_epochs=2.0, min_lr=0.0, grad_clip=0.0,
                                          momentum=0.9, decay_epochs=(3, 5), decay_factor=0.1) | fields)


def test_learning_rate_is_base_lr_times_batch_over_256_unless_absolute():
    assert optim.learning_rate(recipe(), 4096) == pytest.approx(1.5e-4 * 16)
    assert optim.learning_rate(recipe(lr=0.1), 4096) == 0.1


def test_weight_decay_skips_biases_and_norm_scales():
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "norm": {"scale": jnp.ones(4)},
              "conv": {"kernel": jnp.ones((3, 3, 1, 2))}}
    assert optim.decay_mask(params) == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False},
                                        "conv": {"kernel": True}}
    tx = optim.make_optimizer(recipe(weight_decay=0.5), optax.constant_schedule(1.0))
    zeros = {k: {n: jnp.zeros_like(p) for n, p in v.items()} for k, v in params.items()}
    updates, _ = tx.update(zeros, tx.init(params), params)  # Zero gradients: only weight decay moves anything.
    assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0 and float(jnp.abs(updates["dense"]["bias"]).max()) == 0
    assert float(jnp.abs(updates["norm"]["scale"]).max()) == 0


@pytest.mark.parametrize("mu_dtype,stored", [("", jnp.float32), ("bfloat16", jnp.bfloat16)])
def test_mu_dtype_stores_only_the_first_moment_in_it_and_updates_stay_float32(mu_dtype, stored):
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    tx = optim.make_optimizer(recipe(mu_dtype=mu_dtype), optax.constant_schedule(1e-3))
    state = tx.init(params)
    moments = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert [(m.mu["w"].dtype, m.nu["w"].dtype) for m in moments] == [(stored, jnp.float32)]
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert updates["w"].dtype == jnp.float32 and optax.apply_updates(params, updates)["w"].dtype == jnp.float32


def test_no_decay_names_exempt_whole_subtrees_as_mae_fine_tuning():
    params = {"cls_token": {"cls": jnp.ones((1, 1, 4))}, "pos_embed": {"table": jnp.ones((5, 4))},
              "head": {"kernel": jnp.ones((4, 2))}}
    tx = optim.make_optimizer(recipe(weight_decay=0.5, no_decay=("cls_token", "pos_embed")),
                              optax.constant_schedule(1.0))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    moved = {k: float(jnp.abs(jax.tree.leaves(v)[0]).max()) > 0 for k, v in updates.items()}
    assert moved == {"cls_token": False, "pos_embed": False, "head": True}


def test_cosine_warms_up_linearly_then_decays_to_min_lr():
    schedule = optim.schedule(recipe(min_lr=1e-5), 1.0, steps_per_epoch=10, total_steps=100)
    np.testing.assert_allclose([schedule(0), schedule(10), schedule(20)], [0.0, 0.5, 1.0], atol=1e-7)
    assert schedule(60) < schedule(40) < 1.0 and schedule(100) == pytest.approx(1e-5)


def test_step_schedule_decays_from_the_1_based_epochs():
    schedule = optim.schedule(recipe(schedule="step"), 0.1, steps_per_epoch=10, total_steps=100)
    # "Decay at epoch 3" (1-based) starts at 0-based epoch 2 = step 20.
    np.testing.assert_allclose([schedule(19), schedule(20), schedule(39), schedule(40)],
                               [0.1, 0.01, 0.01, 0.001], rtol=1e-6)
    assert optim.schedule(recipe(schedule="constant"), 0.3, 10, 100)(77) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="config.optimizer.schedule"):
        optim.schedule(recipe(schedule="linear"), 0.1, 10, 100)


def test_sgd_adds_l2_before_momentum():
    tx = optim.make_optimizer(recipe(name="sgd", weight_decay=0.1, momentum=0.9), optax.constant_schedule(1.0))
    params = {"w": jnp.array([2.0, 2.0])}
    updates, _ = tx.update({"w": jnp.array([1.0, 0.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-(1.0 + 0.2), -0.2], rtol=1e-6)
    with pytest.raises(ValueError, match="config.optimizer.name"):
        optim.make_optimizer(recipe(name="lion"), optax.constant_schedule(1.0))


def test_layer_decay_scales_updates_per_vit_layer():
    params = {"patch_embed": {"proj": {"kernel": jnp.ones((2, 2))}}, "cls_token": {"cls": jnp.ones((1, 1, 2))},
              "encoder": {"block0": {"w": jnp.ones(2)}, "block1": {"w": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}},
              "head": {"kernel": jnp.ones((2, 3))}}
    tx = optim.layer_decay(params, depth=2, decay=0.5)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert float(updates["patch_embed"]["proj"]["kernel"][0, 0]) == 0.125  # 0.5 ** 3
    assert float(updates["cls_token"]["cls"][0, 0, 0]) == 0.125
    assert float(updates["encoder"]["block0"]["w"][0]) == 0.25 and float(updates["encoder"]["block1"]["w"][0]) == 0.5
    assert float(updates["encoder"]["norm"]["scale"][0]) == 1.0 and float(updates["head"]["kernel"][0, 0]) == 1.0
