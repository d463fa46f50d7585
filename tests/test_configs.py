"""Every config file (and each named variant) loads, names a known experiment, and has consistent geometry."""
import glob
import os

import pytest
from ml_collections import config_flags

import main
from conftest import ROOT

CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not p.endswith("__init__.py"))
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
