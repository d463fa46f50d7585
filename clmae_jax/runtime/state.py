"""The train state shared by every experiment, created directly in its sharding."""
from typing import Any

import flax
import jax
from jax.sharding import NamedSharding, PartitionSpec as P


@flax.struct.dataclass
class TrainState:
    """Step, parameters, optimizer state and non-trained model state (e.g. BatchNorm statistics)."""

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any = flax.core.FrozenDict()


def tree_size(tree) -> int:
    """Number of scalars in a pytree."""
    return sum(x.size for x in jax.tree.leaves(tree))


def state_sharding(mesh, abstract_state, mesh_config=None):
    """Shardings of a train state: replicated on every device (data parallelism)."""
    del mesh_config
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda _: replicated, abstract_state)
