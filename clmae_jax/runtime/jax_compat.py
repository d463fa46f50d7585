"""The private JAX interfaces the runtime relies on, each behind a check that explains itself in one line.

JAX has no public API for these; a release that moves them makes the feature fail with a UserError naming the
JAX version and the way around it, not an AttributeError deep inside a run.
"""
import jax

from clmae_jax.runtime.errors import UserError


def private(what: str, workaround: str) -> UserError:
    """The error for a private interface this JAX release does not have."""
    return UserError(f"jax {jax.__version__} lacks {what}, which this project was written against (jax 0.10); "
                     f"{workaround}, or install the pinned jax.")


def cluster_types() -> list:
    """The cluster environments JAX's own detection knows (jax._src.clusters.ClusterEnv subclasses)."""
    try:
        from jax._src import clusters
        return list(clusters.ClusterEnv._cluster_types)
    except (ImportError, AttributeError) as e:
        raise private("jax._src.clusters.ClusterEnv._cluster_types (cluster detection)",
                      "pass --distributed=on (or off) instead of auto") from e


def has_coordination_service() -> bool:
    """True once jax.distributed.initialize() connected this process to the coordination service."""
    try:
        from jax._src import distributed
        return distributed.global_state.client is not None
    except (ImportError, AttributeError) as e:
        raise private("jax._src.distributed.global_state.client (the coordination service's client)",
                      "run one process per host") from e


def cudnn_attention_checks():
    """JAX's cuDNN attention module, whose compute-capability checks a compile-only process answers for its target
    GPU (bench/gpu.py)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
        fused.check_compute_capability, fused.is_cuda_compute_capability_equal  # noqa: B018  (present?)
        return fused
    except (ImportError, AttributeError) as e:
        raise private("jax._src.cudnn.fused_attention_stablehlo's compute-capability checks",
                      "compile for a GPU on a machine with that GPU") from e


TESTED_ABORT_BEHAVIOUR = (0, 10)  # The jax release whose coordination service was seen to abort() survivors.


def abort_ends_lost_peers() -> bool:
    """True on the jax release whose coordination service ends the survivors of a lost peer with abort(), which
    peers.py turns into one line; other releases get JAX's own report instead (and a warning that says so)."""
    return tuple(int(x) for x in jax.__version__.split(".")[:2]) == TESTED_ABORT_BEHAVIOUR
