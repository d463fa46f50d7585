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
