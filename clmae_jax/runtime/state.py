"""The train state shared by every experiment, created directly in its sharding."""
import math
from typing import Any

import flax
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from clmae_jax.runtime.mesh import DATA_AXIS, FSDP_AXIS

# Leaves below this many elements stay replicated when the state is split: biases and norm scales (ViT-B: at most
# 3072).
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


def shard_axes(mesh_shape: dict, mesh_config=None) -> tuple:
    """The mesh axes a large state leaf is split over: fsdp (FSDP over groups of config.mesh.fsdp devices), or with
    config.mesh.shard_optimizer every axis, i.e. every device (ZeRO-1 / weight-update sharding). Empty: replicated."""
    axes = (DATA_AXIS, FSDP_AXIS) if (mesh_config or {}).get("shard_optimizer", False) else (FSDP_AXIS,)
    return tuple(a for a in axes if mesh_shape.get(a, 1) > 1)


def tiled_axes(shape: tuple, size: int) -> list:
    """The axes of `shape` that split over `size` devices into whole TPU tiles (slices a multiple of 128 along the
    last axis, of 8 along another): the ones a TPU reduce-scatters and all-gathers without padding. Split along any
    other axis, the TPU compiler all-reduces zero-padded whole arrays instead (ViT-B over 256 chips: 768 / 256 = 3
    rows)."""
    return [a for a in range(len(shape))
            if shape[a] % size == 0 and (shape[a] // size) % (128 if a == len(shape) - 1 else 8) == 0]


def min_shard_size(mesh_config=None) -> int:
    """Elements below which a leaf stays whole: config.mesh.min_shard_size, else MIN_SHARD_SIZE."""
    return (mesh_config or {}).get("min_shard_size", MIN_SHARD_SIZE)


def largest_tiled_group(shapes, num_devices: int, mesh_config=None, share: float = 0.99) -> int:
    """The most devices (a power of two dividing `num_devices`) over which the leaves `leaf_spec` would split (at
    least `min_shard_size` elements) holding `share` of their elements split into whole TPU tiles: the `mesh.fsdp`
    that shards the update with (almost) no padded collectives. A ViT's patch projection, [p, p, C, W], is the usual
    leaf left out."""
    large = [s for s in shapes if math.prod(s) >= min_shard_size(mesh_config)]
    total = sum(math.prod(s) for s in large)
    size = num_devices & -num_devices  # The largest power of two that divides it.
    while size > 1 and sum(math.prod(s) for s in large if tiled_axes(s, size)) < share * total:
        size //= 2
    return size


def leaf_spec(shape: tuple, mesh_shape: dict, mesh_config=None) -> P:
    """Splits one axis divisible by the shard_axes' device count over them, the largest of those whose slices are
    whole TPU tiles (multiples of 128 along the last axis, of 8 along another) if any, so that a TPU can
    reduce-scatter and all-gather the slices without padding them. Small or indivisible leaves stay whole (their
    collectives would cost more latency than they save)."""
    axes = shard_axes(mesh_shape, mesh_config)
    size = math.prod(mesh_shape[a] for a in axes)
    if size == 1 or math.prod(shape) < min_shard_size(mesh_config):
        return P()
    divisible = [axis for axis in range(len(shape)) if shape[axis] % size == 0]
    if not divisible:
        return P()
    split = max(tiled_axes(shape, size) or divisible, key=lambda a: shape[a])
    return P(*[(axes if len(axes) > 1 else axes[0]) if a == split else None for a in range(len(shape))])


def state_sharding(mesh, abstract_state, mesh_config=None):
    """Shardings of a train state: replicated on every device (data parallelism), or split (`leaf_spec`): FSDP /
    ZeRO-3 over the fsdp axis, or config.mesh.shard_optimizer over every device. Parameters and optimizer moments
    are split alike (a moment has its parameter's shape), so each device updates its own slice of every large
    parameter; the update steps gather the parameters for the forward pass (mesh.gathered) in the dtype the
    computation reads them in, and the gradients are reduce-scattered to the slices (`like_state`)."""
    shape = dict(mesh.shape)
    return jax.tree.map(lambda leaf: NamedSharding(mesh, leaf_spec(leaf.shape, shape, mesh_config)),
                        abstract_state)


def like_state(tree, mesh_config=None):
    """`tree` (gradients or updates: shaped like the parameters) split as the train state splits the parameters,
    when traced under a mesh (mesh.traced_under); unchanged otherwise. Gradients constrained so are reduce-scattered
    instead of all-reduced, and norms over them are taken on each device's slice."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return tree
    shape = dict(mesh.shape)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, leaf_spec(x.shape, shape, mesh_config)), tree)
