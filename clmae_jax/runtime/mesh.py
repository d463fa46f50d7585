"""Device mesh, shardings and global arrays: the one place that knows how devices are laid out."""
import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clmae_jax.runtime.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1):
    """Joins a multi-process run: explicit coordinator flags, or what the cluster environment describes.

    With no flags, `jax.distributed.initialize()` auto-detects TPU pods and SLURM; a single process needs nothing.
    """
    if coordinator_address:
        # CPU processes exchange collectives over gloo; other platforms ignore this option.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_NUM_NODES", "TPU_WORKER_HOSTNAMES")):
        jax.distributed.initialize()
    logging.info("process %d/%d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes, on the data axis."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis, everything else whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Whole array on every device (parameters and optimizer state for data parallelism)."""
    return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of the global batch; the global batch must split evenly over devices."""
    if global_batch_size % jax.device_count():
        raise UserError(f"config.batch_size={global_batch_size} is not divisible by the {jax.device_count()} "
                        "devices; choose a multiple of the device count.")
    return global_batch_size // jax.process_count()


def to_global(batch: dict, mesh: Mesh) -> dict:
    """Process-local numpy batch -> global jax.Arrays sharded on the data axis."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch_to_mesh(iterator, mesh: Mesh, size: int = 2):
    """Yields global batches, keeping `size` of them already transferred so the devices never wait on copies."""
    queue = []
    for batch in iterator:
        queue.append(to_global(batch, mesh))
        if len(queue) > size:
            yield queue.pop(0)
    yield from queue
