"""The private JAX interfaces the project relies on (runtime/jax_compat.py): present on the pinned release, and one
line naming the release and the way around it where one is missing."""
import jax
import pytest

from clmae_jax.runtime import jax_compat
from clmae_jax.runtime.errors import UserError


def test_every_private_interface_is_there_on_the_pinned_release():
    assert "slurm" in {env.name for env in jax_compat.cluster_types()}
    assert jax_compat.has_coordination_service() is False  # One process, never initialized.
    assert callable(jax_compat.cudnn_attention_checks().check_compute_capability)
    assert jax_compat.abort_ends_lost_peers()


def test_a_release_without_cluster_detection_is_one_line_naming_the_way_around(monkeypatch):
    from jax._src import clusters
    monkeypatch.delattr(clusters.ClusterEnv, "_cluster_types")
    with pytest.raises(UserError, match=rf"^jax {jax.__version__} lacks jax._src.clusters.ClusterEnv._cluster_types "
                                        r"\(cluster detection\).*; pass --distributed=on \(or off\) instead of auto, "
                                        r"or install the pinned jax\.$"):
        jax_compat.cluster_types()


def test_a_release_without_the_coordination_client_is_one_line(monkeypatch):
    from jax._src import distributed
    monkeypatch.delattr(distributed, "global_state")
    with pytest.raises(UserError, match=r"lacks jax._src.distributed.global_state.client"):
        jax_compat.has_coordination_service()


def test_the_lost_peer_line_is_tied_to_the_release_it_was_verified_on(monkeypatch):
    monkeypatch.setattr(jax, "__version__", "0.11.2")
    assert not jax_compat.abort_ends_lost_peers()
