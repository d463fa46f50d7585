"""CL-MAE's exact freezing in the quick tier: on a model small enough to compile in seconds, each of the two steps
leaves the other half (its parameters and its AdamW state) bit-identical, two iterations running (the second with
non-zero moments on both halves, where AdamW alone would move a half it was handed zero gradients for)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from clmae_jax import train_clmae
from clmae_jax.models import vit
from clmae_jax.runtime import optim
from clmae_jax.runtime.state import TrainState
from configs import clmae_fashion_mnist

GUARD_SIZE = dict(width=16, depth=1, num_heads=2)  # A ViT ~100x smaller than "mini": the steps compile in seconds.
# Compiling is most of this test: XLA's cheapest CPU settings, which change no bit of what stays frozen.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def small_config():
    """The Fashion-MNIST CL-MAE test config on a one-block ViT, one-block decoder and masking module, batch 8."""
    config = clmae_fashion_mnist.get_config("test")
    config.model.update(size="guard", decoder_width=8, decoder_depth=1, decoder_heads=2)
    config.clmae.update(freeze="exact", loss_group_size=8)
    config.clmae.masker.depth = 1
    config.batch_size = 8
    config.optimizer.schedule = "constant"
    return config


def leaves_equal(a, b) -> bool:
    """Every leaf of `a` bit-identical to `b`'s."""
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_each_step_leaves_the_other_half_and_its_optimizer_state_bit_identical(monkeypatch):
    """Guards freeze="exact": the MAE step never touches the masking module, the module's step never the MAE."""
    monkeypatch.setitem(vit.VIT_SIZES, "guard", GUARD_SIZE)
    config = small_config()
    model, tx = train_clmae.CLMAE(config), train_clmae.half_optimizer(config)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # One compile, not ~10 s of op-by-op initialisers.
    def fresh_state(rng):
        params = model.init(rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state={half: tx.init(p) for half, p in params.items()})

    state = fresh_state(jax.random.PRNGKey(0))
    mae_step, masker_step = (jax.jit(step, compiler_options=FAST_COMPILE) for step in train_clmae.make_steps(
        model, tx, optim.schedule(config.optimizer, 1e-3, 100, 100), config))
    images = jax.random.randint(jax.random.PRNGKey(1), (8, 28, 28, 1), 0, 256).astype(jnp.uint8)
    for _ in range(2):
        after_mae, _ = mae_step(state, {"image": images})
        assert leaves_equal(after_mae.params["masker"], state.params["masker"])
        assert leaves_equal(after_mae.opt_state["masker"], state.opt_state["masker"])
        assert not leaves_equal(after_mae.params["mae"], state.params["mae"])  # The step did train its own half.
        state, _ = masker_step(after_mae, {"image": images}, jnp.float32(1.0))
        assert leaves_equal(state.params["mae"], after_mae.params["mae"])
        assert leaves_equal(state.opt_state["mae"], after_mae.opt_state["mae"])
        assert not leaves_equal(state.params["masker"], after_mae.params["masker"])
    assert int(state.step) == 2
