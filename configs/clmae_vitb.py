"""CL-MAE ViT-B/16 pretraining on ImageNet-1k with the official recipe (github.com/ristea/cl-mae, main_pretrain.py).

    python main.py --config=configs/clmae_vitb.py --workdir=DIR --config.input.data_dir=TFDS_DIR

Its MAE baseline with the same budget is configs/mae_vitb.py:clmae_budget.
"""
import ml_collections

from configs import common, mae_vitb


def clmae_defaults() -> ml_collections.ConfigDict:
    """The masking module, its four losses and the curriculum, as in the official code."""
    return ml_collections.ConfigDict(dict(
        curriculum="linear",  # lambda_CL +1 -> -1 per epoch, skipping 0; or "partner" / "adversary" / "neutral".
        curriculum_stages=0,  # > 0: lambda_CL changes this many times over the run instead of once per epoch.
        lambda_gaussian=1.0, lambda_kl=0.1, lambda_diversity=2.0,
        gaussian_sigma=0.12, target_keep_ratio=0.25, diversity_scale=0.1,
        loss_group_size=256,  # Official KL / diversity / L_rec are per GPU over 256 images.
        freeze="exact",  # "official": one AdamW whose zero gradients still move the frozen half (torch < 2).
        # The masking module's hyperparameters: models/masker.py's CurriculumMasker fields, passed to it as they are.
        # temperature and logit_bound are not official (1.0 and 0.0 are the official sigmoid; see docs/clmae.md).
        masker=dict(depth=5, num_heads=4, temperature=1.0, logit_bound=0.0),
        # Not official, off by default (see docs/clmae.md): a faster module step and its own learning-rate schedule
        # ("follow" the MAE's, "constant" peak after the warm-up, "rewarm" at the switch to lambda_CL < 0).
        masker_lr_scale=1.0, masker_lr_schedule="follow"))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """CL-MAE ViT-B/16: 200 epochs, blr 1e-3, 40 warm-up epochs, mask ratio 0.75, no norm_pix_loss ('smoke')."""
    words = common.parse_variant(variant, (), "clmae_vitb.py")
    config = mae_vitb.get_config("clmae_budget")
    config.experiment = "clmae"
    config.clmae = clmae_defaults()
    return common.smoke(config) if "smoke" in words else config
