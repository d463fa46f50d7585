"""Linear probe of a pretrained MAE / CL-MAE encoder, the CL-MAE code's `main_linprobe.py` recipe.

    python main.py --config=configs/eval_linear.py --workdir=runs/linear --config.encoder.checkpoint=runs/clmae_fmnist
    python main.py --config=configs/eval_linear.py:cached ...     # features extracted once, no augmentation

Official: CLS token after the encoder's norm, BatchNorm (no affine, eps 1e-6) + linear head (trunc-normal 0.01),
LARS, lr 0.1 (not scaled by the batch), weight decay 0, 90 epochs, 10 warm-up, batch 512, RandomResizedCrop + flip.
Variant words: a data set (as eval_knn.py), `cached`, `smoke`.
"""
import ml_collections

from configs import eval_knn


def linear_entry(**overrides) -> ml_collections.ConfigDict:
    """The official probe recipe; lr > 0 is absolute, lr = 0 uses base_lr x batch / 256 (MAE's own rule)."""
    return ml_collections.ConfigDict({**dict(
        type="linear", pool="cls", lr=0.1, base_lr=0.0, batch_size=512, epochs=90, warmup_epochs=10.0,
        weight_decay=0.0, min_lr=0.0, augment="mae", crop_scale=(0.08, 1.0), cache_features=False, num_train=0,
        num_test=0, seed=0, checkpoint=True, every_steps=0), **overrides})


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The linear probe on the variant's data set (default Fashion-MNIST)."""
    dataset, words = eval_knn.parse(variant, "eval_linear.py", {"cached"})
    config = eval_knn.base_config(dataset)
    config.evals.linear = linear_entry(cache_features="cached" in words)
    if "smoke" in words:
        config = eval_knn.shrink(config)
        config.evals.linear.update(batch_size=16, epochs=2, warmup_epochs=1.0)
    return config
