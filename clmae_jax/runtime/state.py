"""The train state shared by every experiment, created directly in its sharding."""
import math
from typing import Any

import flax
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from clmae_jax.runtime.mesh import FSDP_AXIS

# Leaves below this many elements stay replicated under FSDP: biases and norm scales (ViT-B: at most 3072).
MIN_SHARD_SIZE = 2 ** 14


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


def fsdp_spec(shape: tuple, fsdp_size: int, min_shard_size: int) -> P:
    """Splits the largest axis divisible by `fsdp_size` over the fsdp axis; small or indivisible leaves stay whole
    (their all-gathers would cost more latency than they save memory)."""
    if fsdp_size == 1 or math.prod(shape) < min_shard_size:
        return P()
    divisible = [axis for axis in range(len(shape)) if shape[axis] % fsdp_size == 0]
    if not divisible:
        return P()
    axis = max(divisible, key=lambda a: shape[a])
    return P(*[FSDP_AXIS if a == axis else None for a in range(len(shape))])


def state_sharding(mesh, abstract_state, mesh_config=None):
    """Shardings of a train state: replicated on every device (data parallelism, fsdp axis of size 1), or FSDP /
    ZeRO-3: every leaf of at least config.mesh.min_shard_size elements split over the fsdp axis, parameters and
    optimizer moments alike (a moment has its parameter's shape, so it gets the same split)."""
    fsdp_size = dict(mesh.shape).get(FSDP_AXIS, 1)
    min_shard_size = (mesh_config or {}).get("min_shard_size", MIN_SHARD_SIZE)
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp_size, min_shard_size)),
                        abstract_state)
