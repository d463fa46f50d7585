"""MAE / CL-MAE pretraining from pretrained weights (config.model.init_from): official CL-MAE files give both
halves bit for bit, MAE files and encoder-only files leave the rest fresh, another geometry is one line."""
import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from clmae_jax import train_clmae, train_mae  # noqa: E402
from clmae_jax.evaluate.encoder import ENCODER_KEYS  # noqa: E402
from clmae_jax.interop import params_geometry, save_fbmae  # noqa: E402
from clmae_jax.runtime import loop, mesh as mesh_lib  # noqa: E402
from clmae_jax.runtime.errors import UserError  # noqa: E402
from configs import clmae_fashion_mnist, mae_fashion_mnist  # noqa: E402


def experiment(config_module, experiment_cls, init_from="", seed=0, **model):
    """A test-sized MAE or CL-MAE experiment on one device."""
    config = config_module.get_config("test")
    config.seed = seed
    config.model.update(init_from=init_from, **model)
    return experiment_cls(config, mesh_lib.make_mesh(), loop.Budget(config, 10, 10))


def exported(tmp_path, params, name="weights.pth"):
    """`params` (an MAE or CL-MAE tree) written as a facebookresearch/mae (+ masking_net) .pth."""
    path = str(tmp_path / name)
    save_fbmae(jax.device_get(params), params_geometry(jax.device_get(params), image_size=28, num_heads=4,
                                                      decoder_heads=4), path)
    return path


def assert_trees_equal(a, b):
    """Same structure, every leaf bit for bit."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_official_clmae_file_starts_both_halves_bit_for_bit(tmp_path):
    source = experiment(clmae_fashion_mnist, train_clmae.CLMAEExperiment, seed=7).create_train_state().params
    path = exported(tmp_path, source)
    state = experiment(clmae_fashion_mnist, train_clmae.CLMAEExperiment, init_from=path).create_train_state()
    assert_trees_equal(state.params, source)
    assert int(state.step) == 0
    assert all(float(np.abs(m).max()) == 0 for m in jax.tree.leaves(state.opt_state) if np.ndim(m))


def test_mae_file_or_encoder_alone_leaves_the_rest_fresh(tmp_path):
    source = experiment(mae_fashion_mnist, train_mae.MAE, seed=7).create_train_state().params
    fresh = experiment(clmae_fashion_mnist, train_clmae.CLMAEExperiment).create_train_state().params
    clmae = experiment(clmae_fashion_mnist, train_clmae.CLMAEExperiment, init_from=exported(tmp_path, source))
    started = clmae.create_train_state().params
    assert_trees_equal(started["mae"], source)
    assert_trees_equal(started["masker"], fresh["masker"])
    encoder_only = {k: source[k] for k in ENCODER_KEYS}
    mae = experiment(mae_fashion_mnist, train_mae.MAE, init_from=exported(tmp_path, encoder_only, "encoder.pth"))
    started = mae.create_train_state().params
    assert_trees_equal({k: started[k] for k in ENCODER_KEYS}, encoder_only)
    fresh = experiment(mae_fashion_mnist, train_mae.MAE).create_train_state().params
    assert_trees_equal(started["decoder"], fresh["decoder"])


def test_weights_of_another_geometry_are_one_line_naming_the_leaf(tmp_path):
    source = experiment(mae_fashion_mnist, train_mae.MAE, seed=7).create_train_state().params
    path = exported(tmp_path, source)
    with pytest.raises(UserError, match=r"mae/patch_embed/proj/kernel has shape \(4, 4, 1, 128\) but the config's "
                                        r"model has \(7, 7, 1, 128\)") as error:
        experiment(mae_fashion_mnist, train_mae.MAE, init_from=path, patch_size=7).create_train_state()
    assert "\n" not in str(error.value)
