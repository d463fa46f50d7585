"""The train state shared by every experiment, created directly in its sharding."""
from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
    """Step, parameters, optimizer state and non-trained model state (e.g. BatchNorm statistics)."""

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any = flax.core.FrozenDict()


def create_state(init_fn, sharding, *args):
    """Runs `init_fn(*args) -> TrainState` under jit so parameters are born on the devices, in `sharding`."""
    return jax.jit(init_fn, out_shardings=sharding)(*args)


def tree_size(tree) -> int:
    """Number of scalars in a pytree."""
    return sum(x.size for x in jax.tree.leaves(tree))
