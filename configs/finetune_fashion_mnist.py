"""Fine-tuning a pretrained MAE / CL-MAE encoder on Fashion-MNIST, the MAE recipe (`main_finetune.py`) scaled down.

    python main.py --config=configs/finetune_fashion_mnist.py --workdir=runs/ft_clmae \
        --config.model.init_from=runs/clmae_fmnist
    python main.py --config=configs/finetune_fashion_mnist.py --workdir=runs/ft_scratch   # no init_from: random

The supervised trainer (experiment "finetune": CBM's trainer with masking off) runs it: global pool + fc_norm, a learned position
table started at the pretraining's sin-cos one, head init 2e-5, drop path 0.1, layer-wise lr decay 0.75, AdamW
(0.9, 0.999) with weight decay 0.05 (not on cls_token / pos_embed, as the reference), lr = 5e-4 x batch / 256 (the MAE
ViT-B base lr), warm-up then cosine to 1e-6, label smoothing 0.1, mixup 0.8 / cutmix 1.0 (switch 0.5); best and
final test accuracy land in results.json. The model must be the pretraining run's (here the quickstart's mini ViT,
patch 4); without init_from the same ViT trains from random weights (the no-pretraining row). Not in this recipe:
RandAugment and random erasing (the input pipeline has neither). Variant words: `test`, `smoke`.
"""
import ml_collections

from configs import cbm_paper, common, mae_fashion_mnist


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """5 epochs, batch 128, the quickstart MAE's ViT."""
    words = common.parse_variant(variant, {"test"}, "finetune_fashion_mnist.py")
    config = cbm_paper.base_config()
    config.input = mae_fashion_mnist.fashion_mnist_input()
    config.input.eval_transform = "resize"
    pretrained = mae_fashion_mnist.get_config().model
    config.model = common.vit_classifier(size=pretrained.size, patch_size=pretrained.patch_size, pool="gap_norm",
                                         pos_embed="learned", drop_path=0.1, head_init_std=2e-5)
    config.experiment = "finetune"
    config.cbm.schedule = "none"  # Plain supervised training: no CBM masking.
    config.batch_size = 128
    config.eval_batch_size = 500
    config.num_epochs = 5
    config.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=0.0, base_lr=5e-4, b1=0.9, b2=0.999, weight_decay=0.05, schedule="cosine",
        warmup_epochs=1.0, min_lr=1e-6, grad_clip=0.0, layer_decay=0.75,
        no_decay=("cls_token", "pos_embed")))
    config.mix = ml_collections.ConfigDict(dict(label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0,
                                                switch_prob=0.5, prob=1.0))
    config.log_every_steps = 100
    config.image_every_steps = 0
    config.checkpoint_every_steps = 469
    if "test" in words:
        config.batch_size = 16
        config.total_steps = 4
        config.log_every_steps = config.checkpoint_every_steps = 2
    return common.smoke(config) if "smoke" in words else config
