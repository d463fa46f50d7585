"""MAE ViT-B/16 pretraining on ImageNet-1k with the paper's recipe (He et al., 2021, Table 8).

    python main.py --config=configs/mae_vitb.py --workdir=DIR --config.input.data_dir=TFDS_DIR
    python main.py --config=configs/mae_vitb.py:clmae_budget ...   # the CL-MAE paper's MAE baseline budget

Variants (comma-separated): `clmae_budget`, `smoke` (3 CPU steps of a tiny model, see configs/common.py).
The variant `clmae_budget` trains 200 epochs with blr 1e-3 and no norm_pix_loss, exactly the budget and loss of
configs/clmae_vitb.py, so the two runs differ only in how patches are masked.
"""
import ml_collections

from configs import common


def imagenet_input() -> ml_collections.ConfigDict:
    """tfds imagenet2012 with the MAE augmentation (RandomResizedCrop(0.2, 1) + flip)."""
    return common.input_config("imagenet2012", augment="mae", crop_scale=(0.2, 1.0), shuffle_buffer=250_000,
                               eval_crop_ratio=0.875)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """MAE ViT-B/16, 800 epochs at batch 4096 (variant 'clmae_budget': 200 epochs as CL-MAE)."""
    words = common.parse_variant(variant, {"clmae_budget"}, "mae_vitb.py")
    config = ml_collections.ConfigDict()
    config.experiment = "mae"
    config.seed = 0
    config.batch_size = 4096  # Global, over all devices and processes.
    config.grad_accum_steps = 1
    config.num_epochs = 800
    config.total_steps = 0  # > 0 overrides num_epochs.
    config.stop_after_steps = 0  # > 0 ends this invocation early (preemption drills); resume continues.
    config.input = imagenet_input()
    config.model = ml_collections.ConfigDict(dict(
        size="base", patch_size=16, decoder_width=512, decoder_depth=8, decoder_heads=16, dtype="bfloat16",
        param_dtype="float32", attention="einsum", remat=False,
        init_from=""))
    config.mae = ml_collections.ConfigDict(dict(mask_ratio=0.75, norm_pix_loss=True))
    config.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=0.0, base_lr=1.5e-4, b1=0.9, b2=0.95, weight_decay=0.05, schedule="cosine",
        warmup_epochs=40.0, min_lr=0.0, grad_clip=0.0, mu_dtype=""))  # mu_dtype: see runtime/optim.py.
    # Device mesh: data parallelism over every device; fsdp > 1 also splits the train state (FSDP / ZeRO-3) over
    # groups of that many devices, for ViT-L/H. -1 takes the devices left over. shard_optimizer: ZeRO-1 /
    # weight-update sharding (Xu et al. 2020; big_vision's fsdp(axis="data")): the float32 parameters and the
    # optimizer moments split over every device, each updating its slice; the step gathers the parameters in the
    # compute dtype and reduce-scatters the gradients (the bytes of the all-reduce it replaces). See docs/scaling.md.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, shard_optimizer=False))
    config.evals = ml_collections.ConfigDict()  # Encoder evaluators during pretraining, e.g. kNN (see eval_knn.py).
    config.nonfinite = "stop"  # Or "skip": drop non-finite updates and count them.
    config.log_every_steps = 100
    config.image_every_steps = 5000
    config.checkpoint_every_steps = 5000
    config.keep_checkpoints = 3
    config.num_summary_images = 8
    if "clmae_budget" in words:
        config.batch_size = 256 * 8  # 256 per GPU on the CL-MAE authors' 8 GPUs (inferred; the code says 256/GPU).
        config.num_epochs = 200
        config.optimizer.base_lr = 1e-3
        config.mae.norm_pix_loss = False
    return common.smoke(config) if "smoke" in words else config
