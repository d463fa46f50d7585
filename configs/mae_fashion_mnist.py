"""Quickstart: a few minutes of real MAE pretraining on Fashion-MNIST on a laptop CPU, no download.

    python main.py --config=configs/mae_fashion_mnist.py --workdir=runs/mae_fmnist

Reads the IDX files of Debian's `dataset-fashion-mnist` package. 28x28 grey images, 4x4 patches (49 tokens, 12 kept),
a small ViT; PNGs of inputs / masks / reconstructions land in DIR/images, TensorBoard logs in DIR.
"""
import ml_collections

from configs import common, mae_vitb


def fashion_mnist_input() -> ml_collections.ConfigDict:
    """Fashion-MNIST from the offline IDX files, 28x28 grey, light augmentation."""
    return common.input_config("fashion_mnist", augment="mae", crop_scale=(0.5, 1.0), shuffle_buffer=60_000)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """A 4-block width-128 ViT MAE, batch 128, about 600 steps (variants 'test', 'smoke': a handful of steps)."""
    words = common.parse_variant(variant, {"test"}, "mae_fashion_mnist.py")
    config = mae_vitb.get_config()
    config.input = fashion_mnist_input()
    config.batch_size = 128
    config.num_epochs = 1
    config.total_steps = 600
    config.model = ml_collections.ConfigDict(dict(
        size="mini", patch_size=4, decoder_width=64, decoder_depth=2, decoder_heads=4, dtype="float32",
        param_dtype="float32", attention="einsum", remat=False,
        init_from=""))
    config.mae.norm_pix_loss = False  # Fashion-MNIST patches are often flat; per-patch variance would be ~0.
    config.optimizer.base_lr = 1.5e-4 * 10
    config.optimizer.warmup_epochs = 0.1
    config.log_every_steps = 50
    config.image_every_steps = 200
    config.checkpoint_every_steps = 200
    if "test" in words:
        config.batch_size = 16
        config.total_steps = 6
        config.log_every_steps = config.image_every_steps = config.checkpoint_every_steps = 3
    return common.smoke(config) if "smoke" in words else config
