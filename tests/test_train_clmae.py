"""CL-MAE's two alternating steps: exact and official freezing, top-k token counts, device-count invariance,
resume mid-curriculum, and the curriculum position."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clmae_jax import losses, train_clmae
from clmae_jax.runtime import optim
from clmae_jax.runtime.state import TrainState
from configs import clmae_fashion_mnist
from conftest import assert_trees_close, load_params, run_main, train

CONFIG = "clmae_fashion_mnist.py:test"


def small_config(freeze="exact"):
    config = clmae_fashion_mnist.get_config("test")
    config.clmae.freeze = freeze
    config.optimizer.lr = 1e-3
    config.optimizer.schedule = "constant"
    return config


def setup(config):
    model = train_clmae.CLMAE(config)
    tx = train_clmae.half_optimizer(config)
    params = model.init(jax.random.PRNGKey(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state={k: tx.init(v) for k, v in params.items()})
    lr_schedule = optim.schedule(config.optimizer, 1e-3, 100, 100)
    mae_step, masker_step = train_clmae.make_steps(model, tx, lr_schedule, config)
    images = jax.random.randint(jax.random.PRNGKey(1), (config.batch_size, 28, 28, 1), 0, 256).astype(jnp.uint8)
    return model, tx, state, jax.jit(mae_step), jax.jit(masker_step), {"image": images}


def assert_identical(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def assert_changed(a, b):
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_exact_freezing_leaves_the_other_half_bit_identical():
    _, _, state, mae_step, masker_step, batch = setup(small_config("exact"))
    for _ in range(2):  # The second iteration has non-zero Adam moments on both halves.
        after_mae, _ = mae_step(state, batch)
        assert_identical(after_mae.params["masker"], state.params["masker"])
        assert_identical(after_mae.opt_state["masker"], state.opt_state["masker"])
        assert_changed(after_mae.params["mae"], state.params["mae"])
        state, measurements = masker_step(after_mae, batch, jnp.float32(1.0))
        assert_identical(state.params["mae"], after_mae.params["mae"])
        assert_identical(state.opt_state["mae"], after_mae.opt_state["mae"])
        assert_changed(state.params["masker"], after_mae.params["masker"])
    assert int(state.step) == 2


@pytest.mark.slow
def test_official_freezing_moves_the_frozen_half_as_torch_adamw_moves_it():
    config = small_config("official")
    _, _, state, mae_step, masker_step, batch = setup(config)
    after_mae, _ = mae_step(state, batch)
    # Before its first backward pass the module has no .grad, so PyTorch's AdamW skips it.
    assert_identical(after_mae.params["masker"], state.params["masker"])
    state, _ = masker_step(after_mae, batch, jnp.float32(1.0))
    lr = optim.schedule(config.optimizer, 1e-3, 100, 100)
    assert_trees_close(state.params["mae"], torch_zero_gradient_step(config, after_mae, "mae", lr(0)), atol=1e-6)
    assert_changed(state.params["mae"], after_mae.params["mae"])
    # From the second iteration on, the MAE step also moves the module with zero gradients.
    after_mae, _ = mae_step(state, batch)
    assert_trees_close(after_mae.params["masker"], torch_zero_gradient_step(config, state, "masker", lr(1)), atol=1e-6)
    assert_changed(after_mae.params["masker"], state.params["masker"])


def torch_zero_gradient_step(config, state, half: str, lr: float) -> dict:
    """What torch.optim.AdamW does to `half` from the same moments given .grad tensors of zeros, as `zero_grad()`
    left them before torch 2 (the official code's torch): momentum and weight decay only."""
    torch = pytest.importorskip("torch")
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
    adam = next(s for s in jax.tree.leaves(state.opt_state[half], is_leaf=is_adam) if is_adam(s))
    leaves, treedef = jax.tree_util.tree_flatten(state.params[half])
    decays = jax.tree.leaves(optim.decay_mask(state.params[half], tuple(config.optimizer.get("no_decay", ()))))
    params = [torch.nn.Parameter(torch.from_numpy(np.array(leaf))) for leaf in leaves]
    groups = [{"params": [p for p, d in zip(params, decays) if d == want],
               "weight_decay": config.optimizer.weight_decay if want else 0.0} for want in (True, False)]
    adamw = torch.optim.AdamW(groups, lr=float(lr), betas=(config.optimizer.b1, config.optimizer.b2), eps=1e-8)
    for p, mu, nu in zip(params, jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
        p.grad = torch.zeros_like(p)
        adamw.state[p] = {"step": torch.tensor(float(adam.count)), "exp_avg": torch.from_numpy(np.array(mu)),
                          "exp_avg_sq": torch.from_numpy(np.array(nu))}
    adamw.step()
    return jax.tree_util.tree_unflatten(treedef, [p.detach().numpy() for p in params])


def test_topk_keeps_exactly_k_tokens_and_the_encoder_sees_k():
    config = small_config()
    model, _, state, _, _, batch = setup(config)
    images = batch["image"].astype(jnp.float32) / 255.0
    _, keep_prob = model.keep_probabilities(state.params, images)
    chex.assert_shape(keep_prob, (config.batch_size, 49))
    _, (_, mask) = model.learned_mask_loss(state.params["mae"], images, keep_prob)
    k = int(49 * (1 - config.mae.mask_ratio))
    assert model.num_keep == k == 12
    np.testing.assert_array_equal(np.asarray(1 - mask).sum(1), [k] * config.batch_size)
    # The kept tokens are the k most probable ones.
    top = np.argsort(-np.asarray(keep_prob), axis=1)[:, :k]
    np.testing.assert_array_equal(np.sort(top, 1), np.sort(np.argwhere(np.asarray(mask) == 0)[:, 1].reshape(-1, k), 1))
    _, captured = model.mae.apply({"params": state.params["mae"]}, images, keep_prob, model.num_keep,
                                  capture_intermediates=True, mutable=["intermediates"])
    chex.assert_shape(captured["intermediates"]["encoder"]["__call__"][0], (config.batch_size, 1 + k, 128))


def test_masker_objective_combines_weighted_terms():
    config = small_config()
    keep = jax.random.uniform(jax.random.PRNGKey(0), (16, 49))
    errors = jax.random.uniform(jax.random.PRNGKey(1), (16, 49))
    total, terms = train_clmae.masker_objective(config, errors, keep, -0.5)
    c = config.clmae
    expected = (-0.5 * terms["loss_curriculum"] + c.lambda_gaussian * terms["loss_gaussian"]
                + c.lambda_kl * terms["loss_kl"] + c.lambda_diversity * terms["loss_diversity"])
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    # Two groups of 8: the KL is summed within a group and averaged over groups.
    np.testing.assert_allclose(terms["loss_kl"], (losses.kl_loss(keep[:8]) + losses.kl_loss(keep[8:])) / 2, rtol=1e-6)


@pytest.mark.parametrize("stages,steps,expected", [(0, None, None), (4, 8, [1.0, 1.0, 0.5, 0.5, -0.5, -0.5, -1, -1])])
def test_curriculum_position(stages, steps, expected):
    config = small_config()
    config.clmae.curriculum_stages = stages

    class FakeRun:  # Only the budget fields; a Run needs a dataset.
        steps_per_epoch, total_steps = 10, steps or 40

        def epoch(self, step):
            return step // 10

    if expected is None:  # Real epochs: 4 epochs of 10 steps -> +1, +0.5, -0.5, -1.
        got = [train_clmae.curriculum_weight_at(config, FakeRun(), s) for s in (0, 9, 10, 25, 39)]
        assert got == [1.0, 1.0, 0.5, -0.5, -1.0]
    else:
        assert [train_clmae.curriculum_weight_at(config, FakeRun(), s) for s in range(steps)] == expected


@pytest.mark.slow
def test_one_iteration_same_on_1_and_8_devices(tmp_path, scalars):
    runs = {devices: str(tmp_path / f"d{devices}") for devices in (1, 8)}
    train(runs[1], CONFIG, total_steps=1, log_every_steps=1)  # This process has one device.
    run_main(runs[8], CONFIG, "--config.total_steps=1", "--config.log_every_steps=1", devices=8)
    for tag in ("mae_loss", "masker_loss", "loss_kl", "loss_diversity", "mae_loss_random_mask"):
        assert scalars(runs[1], tag)[1] == pytest.approx(scalars(runs[8], tag)[1], abs=1e-5), tag
    assert_trees_close(load_params(runs[1], 1), load_params(runs[8], 1), atol=1e-5)


@pytest.mark.slow
def test_resume_mid_curriculum_equals_uninterrupted(tmp_path, scalars):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    fields = {"total_steps": 4, "clmae.curriculum_stages": 4, "log_every_steps": 1}
    train(straight, CONFIG, **fields)
    train(resumed, CONFIG, **fields, stop_after_steps=2)
    train(resumed, CONFIG, **fields)
    assert scalars(resumed, "lambda_cl") == scalars(straight, "lambda_cl") == {1: 1.0, 2: 0.5, 3: -0.5, 4: -1.0}
    assert_trees_close(load_params(straight, 4), load_params(resumed, 4), atol=1e-6)
