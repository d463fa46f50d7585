"""Every config file (and each named variant) loads, names a known experiment, passes the config check main.py
runs and has consistent geometry; the shared variant grammar rejects unknown words; `smoke` shrinks every config,
ImageNet ones included."""
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import main
from clmae_jax.runtime import loop, mesh as mesh_lib, validate
from clmae_jax.train_clmae import CLMAEExperiment
from clmae_jax.train_mae import MAE
from conftest import ROOT

CONFIG_NAMES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                      if f.endswith(".py") and f not in ("__init__.py", "common.py"))
VARIANTS = {"mae_vitb": ["clmae_budget"], "mae_fashion_mnist": ["test"], "clmae_fashion_mnist": ["test", "adversarial"],
            "cbm_fashion_mnist": ["test", "baseline", "random", "light", "baseline,test"],
            "cbm_paper": ["cvt13,food101,baseline", "wrn_52_2,cifar10,random"],
            "cbm_resnet18_cifar100": ["baseline", "random"], "cbm_vit_cifar100": ["baseline"]}


def load(name, variant=""):
    """configs/<name>.py's config for `variant` (its default when empty)."""
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(variant) if variant else module.get_config()


def check(config):
    """The check main.py runs before anything is built, with the experiment's own option lists (image-folder data
    sets need the --config.input.data_dir every user of them passes)."""
    if config.input.source == "image_folder" and not config.input.data_dir:
        config.input.data_dir = "/data/images"
    experiment = importlib.import_module(main.EXPERIMENTS[config.experiment][0])
    validate.check_config(config, options=getattr(experiment, "OPTIONS", {}))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads(name):
    for variant in [""] + VARIANTS.get(name, []):
        config = load(name, variant)
        check(config)
        if "patch_size" in config.model:
            assert config.input.image_size % config.model.patch_size == 0
        if config.experiment == "cbm":
            assert config.input.image_size % config.cbm.grid == 0
        assert config.batch_size % max(config.get("grad_accum_steps", 1), 1) == 0


def test_variant_table_names_real_files():
    assert set(CONFIG_NAMES) >= set(VARIANTS)


def test_paper_recipes():
    clmae = load("clmae_vitb")
    assert (clmae.num_epochs, clmae.optimizer.base_lr, clmae.optimizer.warmup_epochs) == (200, 1e-3, 40)
    assert (clmae.clmae.lambda_gaussian, clmae.clmae.lambda_kl, clmae.clmae.lambda_diversity) == (1.0, 0.1, 2.0)
    assert (clmae.mae.mask_ratio, clmae.clmae.loss_group_size, clmae.clmae.freeze) == (0.75, 256, "exact")
    mae = load("mae_vitb")
    assert (mae.num_epochs, mae.batch_size, mae.optimizer.base_lr, mae.mae.norm_pix_loss) == (800, 4096, 1.5e-4, True)
    assert (mae.model.decoder_width, mae.model.decoder_depth, mae.model.size) == (512, 8, "base")


def smoke_variant(name):
    """The smoke variant of a config file (cbm_paper.py needs a model and a dataset first)."""
    return "resnet18,cifar10,smoke" if name == "cbm_paper" else "smoke"


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_has_a_smoke_variant_that_passes_the_check_and_rejects_unknown_words(name):
    config = load(name, smoke_variant(name))
    assert (config.total_steps, config.batch_size, config.checkpoint_every_steps) == (3, 8, 1)
    check(config)
    with pytest.raises(ValueError, match="smoke"):
        load(name, smoke_variant(name).replace("smoke", "smok"))


@pytest.mark.slow
@pytest.mark.parametrize("name,experiment", [("mae_vitb", MAE), ("clmae_vitb", CLMAEExperiment)])
def test_imagenet_configs_take_a_smoke_step(name, experiment):
    config = load(name, "smoke")
    budget = loop.Budget(config, steps_per_epoch=10, total_steps=3)
    run = experiment(config, mesh_lib.make_mesh(), budget)
    state = run.create_train_state()
    images = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3)).astype(np.uint8)
    state, measurements = run.train_step(state, {"image": jnp.asarray(images)}, 1)
    assert int(state.step) == 1 and all(np.isfinite(float(v)) for v in jax.device_get(measurements).values())
