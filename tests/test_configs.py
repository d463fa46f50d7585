"""Every config file (and each named variant) loads, names a known experiment, and has consistent geometry; the
shared variant grammar rejects unknown words; `smoke` shrinks every config, ImageNet ones included."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_flags

import main
from clmae_jax.runtime import loop, mesh as mesh_lib
from clmae_jax.train_clmae import CLMAEExperiment
from clmae_jax.train_mae import MAE
from conftest import ROOT

CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not p.endswith(("__init__.py", "common.py")))
VARIANTS = {"mae_vitb.py": ["clmae_budget"], "mae_fashion_mnist.py": ["test"], "clmae_fashion_mnist.py": ["test"],
            "cbm_fashion_mnist.py": ["test", "baseline", "random", "baseline,test"],
            "cbm_paper.py": ["cvt13,food101,baseline", "wrn_52_2,cifar10,random"],
            "cbm_resnet18_cifar100.py": ["baseline", "random"], "cbm_vit_cifar100.py": ["baseline"]}


def load(path, variant=""):
    module = config_flags.config_flags._LoadConfigModule("config_under_test", path)
    return module.get_config(variant) if variant else module.get_config()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads(path):
    for variant in [""] + VARIANTS.get(os.path.basename(path), []):
        config = load(path, variant)
        assert config.experiment in main.EXPERIMENTS
        if "patch_size" in config.model:
            assert config.input.image_size % config.model.patch_size == 0
        if config.experiment == "cbm":
            assert config.input.image_size % config.cbm.grid == 0
        assert config.batch_size % max(config.get("grad_accum_steps", 1), 1) == 0


def test_variant_table_names_real_files():
    assert {os.path.basename(p) for p in CONFIG_FILES} >= set(VARIANTS)


def test_paper_recipes():
    clmae = load(os.path.join(ROOT, "configs", "clmae_vitb.py"))
    assert (clmae.num_epochs, clmae.optimizer.base_lr, clmae.optimizer.warmup_epochs) == (200, 1e-3, 40)
    assert (clmae.clmae.lambda_gaussian, clmae.clmae.lambda_kl, clmae.clmae.lambda_diversity) == (1.0, 0.1, 2.0)
    assert (clmae.mae.mask_ratio, clmae.clmae.loss_group_size, clmae.clmae.freeze) == (0.75, 256, "exact")
    mae = load(os.path.join(ROOT, "configs", "mae_vitb.py"))
    assert (mae.num_epochs, mae.batch_size, mae.optimizer.base_lr, mae.mae.norm_pix_loss) == (800, 4096, 1.5e-4, True)
    assert (mae.model.decoder_width, mae.model.decoder_depth, mae.model.size) == (512, 8, "base")


def smoke_variant(path):
    """The smoke variant of a config file (cbm_paper.py needs a model and a dataset first)."""
    return "resnet18,cifar10,smoke" if path.endswith("cbm_paper.py") else "smoke"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_has_a_smoke_variant_and_rejects_unknown_words(path):
    config = load(path, smoke_variant(path))
    assert (config.total_steps, config.batch_size, config.checkpoint_every_steps) == (3, 8, 1)
    assert config.experiment in main.EXPERIMENTS
    with pytest.raises(ValueError, match="smoke"):
        load(path, smoke_variant(path).replace("smoke", "smok"))


@pytest.mark.parametrize("name,experiment", [("mae_vitb.py", MAE), ("clmae_vitb.py", CLMAEExperiment)])
def test_imagenet_configs_take_a_smoke_step(name, experiment):
    config = load(os.path.join(ROOT, "configs", name), "smoke")
    budget = loop.Budget(config, steps_per_epoch=10, total_steps=3)
    run = experiment(config, mesh_lib.make_mesh(), budget)
    state = run.create_train_state()
    images = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3)).astype(np.uint8)
    state, measurements = run.train_step(state, {"image": jnp.asarray(images)}, 1)
    assert int(state.step) == 1 and all(np.isfinite(float(v)) for v in jax.device_get(measurements).values())
