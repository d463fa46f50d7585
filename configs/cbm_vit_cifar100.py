"""CBM with the library's ViT on CIFAR-100: not a paper experiment (the paper trains no ViT), our recipe.

    python main.py --config=configs/cbm_vit_cifar100.py[:baseline] --workdir=DIR

ViT-S with 4x4-pixel patches on 32x32 images (64 tokens; the CBM grid stays 4x4, so a masked cell hides 4x4
tokens), AdamW with warm-up and cosine decay as usual for ViTs trained from scratch; the CBM side (batch 64, no
augmentation, mean/std 0.5, linear-repeat "40", salience at 64 px) is the official CIFAR setting.
"""
import ml_collections

from configs import cbm_paper, common


def get_config(variant: str = ""):
    """CBM (''), conventional training ('baseline') or random masking ('random'); 'smoke' shrinks any of them."""
    words = common.parse_variant(variant, cbm_paper.MODES, "cbm_vit_cifar100.py")
    config = cbm_paper.paper_config("resnet18", "cifar100", ",".join(sorted(words - {"smoke"})))
    config.model = common.vit_classifier(size="small", patch_size=4, pool="cls")
    config.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=5e-4, base_lr=0.0, b1=0.9, b2=0.999, weight_decay=0.05, schedule="cosine",
        warmup_epochs=10.0, min_lr=1e-6, grad_clip=1.0))
    return common.smoke(config) if "smoke" in words else config
