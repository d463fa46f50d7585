"""CBM's paper experiments (Jarca et al., 2024), recipes from the official code (github.com/CroitoruAlin/CBM).

    python main.py --config=configs/cbm_paper.py:resnet18,cifar100 --workdir=DIR
    python main.py --config=configs/cbm_resnet18_cifar100.py --workdir=DIR          # the same run
    python main.py --config=configs/cbm_resnet18_cifar100.py:baseline --workdir=DIR # same pipeline, no masking
    python main.py --config=configs/cbm_resnet18_cifar100.py:random --workdir=DIR   # uniform instead of salience

Variant: "MODEL,DATASET[,baseline|random][,smoke]". Models: resnet18, wrn_52_2, cvt13. Datasets: cifar10, cifar100, food101
(tfds names), tiny_imagenet, sport_balls, sea_animals, ahe (image folders under config.input.data_dir).
Every run: batch 64, no augmentation, mean/std 0.5 (masked cells are mid-grey), a 4x4 grid, the linear-repeat
curriculum with the official preset, evaluation on the test split every epoch (best and final accuracy reported).
"""
import ml_collections

from configs import common

SCHEDULE_PRESET = {  # experiments/*.py: which linear-repeat preset ("40": 1,2,3,4,6 cells; "60": 1,3,5,7,9).
    "resnet18": {"cifar10": "40", "cifar100": "40", "tiny_imagenet": "60", "food101": "60"},
    "wrn_52_2": {"cifar10": "40", "cifar100": "40", "tiny_imagenet": "40", "food101": "60"},
    "cvt13": {"cifar10": "40", "cifar100": "60", "tiny_imagenet": "60", "food101": "60", "sport_balls": "60",
              "sea_animals": "60", "ahe": "60"},
}
CNN_WEIGHT_DECAY = {  # (ResNet-18, WRN-52-2)
    "cifar10": (5e-4, 5e-4), "cifar100": (5e-4, 1e-4), "tiny_imagenet": (1e-4, 1e-4), "food101": (5e-4, 1e-4)}
# Input sizes per dataset (the data itself is in configs/common.py DATASETS): (CNN input size, CvT input size,
# salience size; 0 = input size). The official code measures CIFAR salience on a 64 px resize and Food-101's at
# 224 px whatever the model sees.
IMAGE_SIZES = {
    "cifar10": (32, 64, 64),
    "cifar100": (32, 64, 64),
    "food101": (64, 224, 224),
    "tiny_imagenet": (64, 64, 0),
    "sport_balls": (None, 224, 0),
    "sea_animals": (None, 224, 0),
    "ahe": (None, 128, 0),
}
MODES = ("baseline", "random")
CVT13_WEIGHTS = "CvT-13-224x224-IN-1k.pth"  # microsoft/CvT model zoo; the paper fine-tunes from it.


def base_config() -> ml_collections.ConfigDict:
    """Every field a CBM run reads, at the official defaults (ResNet-18 on CIFAR-100)."""
    config = ml_collections.ConfigDict()
    config.experiment = "cbm"
    config.seed = 0
    config.batch_size = 64
    config.eval_batch_size = 256
    config.grad_accum_steps = 1
    config.num_epochs = 200
    config.total_steps = 0  # > 0 overrides num_epochs.
    config.stop_after_steps = 0
    config.input = common.input_config("cifar100", eval_transform="resize")
    config.model = ml_collections.ConfigDict(dict(name="resnet18", width=64, dtype="float32", init_from="",
                                                  size="small", patch_size=4, pool="cls"))
    config.cbm = ml_collections.ConfigDict(dict(
        schedule="linear_repeat", preset="40", r_min=ml_collections.FieldReference(None, field_type=float),
        r_max=ml_collections.FieldReference(None, field_type=float), salience="sobel", grid=4, salience_size=64))
    config.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", lr=0.1, base_lr=0.0, momentum=0.9, weight_decay=5e-4, schedule="step",
        decay_epochs=(32, 62, 92), decay_factor=0.1, grad_clip=0.0))
    # Device mesh: data parallelism over every device; fsdp > 1 also splits the train state (FSDP / ZeRO-3) over
    # groups of that many devices, for ViT-L/H. -1 takes the devices left over. shard_optimizer: ZeRO-1 /
    # weight-update sharding (Xu et al. 2020; big_vision's fsdp(axis="data")): the float32 parameters and the
    # optimizer moments split over every device, each updating its slice; the step gathers the parameters in the
    # compute dtype and reduce-scatters the gradients (the bytes of the all-reduce it replaces). See docs/scaling.md.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, shard_optimizer=False))
    # Evaluators (name -> config): test accuracy once per epoch (every_steps 0) and at the end, best and final kept.
    config.evals = ml_collections.ConfigDict(dict(test=dict(type="classification", every_steps=0, split="")))
    config.nonfinite = "stop"  # Or "skip": drop non-finite updates and count them.
    config.log_every_steps = 100
    config.image_every_steps = 5000
    config.checkpoint_every_steps = 5000
    config.keep_checkpoints = 2
    config.num_summary_images = 8
    return config


def paper_config(model: str, dataset: str, variant: str = "") -> ml_collections.ConfigDict:
    """The official recipe of `model` on `dataset`; variant words: 'baseline' or 'random', and 'smoke'."""
    if model not in SCHEDULE_PRESET or dataset not in SCHEDULE_PRESET[model]:
        pairs = [f"{m},{d}" for m, ds in SCHEDULE_PRESET.items() for d in ds]
        raise ValueError(f"No CBM paper experiment {model},{dataset}; choose one of {', '.join(pairs)}.")
    words = common.parse_variant(variant, MODES, f"the CBM {model},{dataset} config")
    if len(words & set(MODES)) > 1:
        raise ValueError(f"Variant {variant!r}: choose one of {', '.join(MODES)}, not both.")
    config = base_config()
    cnn_size, cvt_size, salience_size = IMAGE_SIZES[dataset]
    config.input = common.input_config(dataset, eval_transform="resize")
    config.cbm.preset = SCHEDULE_PRESET[model][dataset]
    config.cbm.salience_size = salience_size
    config.model.name = model
    if model == "cvt13":
        # cvt_base_pretrained.py: ImageNet-1k weights, Adamax 5e-4 for every parameter, no lr schedule, 40 epochs.
        config.input.image_size = cvt_size
        config.model.init_from = CVT13_WEIGHTS
        config.num_epochs = 40
        config.optimizer = ml_collections.ConfigDict(dict(name="adamax", lr=5e-4, base_lr=0.0, schedule="constant",
                                                          grad_clip=0.0))
    else:
        config.input.image_size = cnn_size
        config.num_epochs = 100 if dataset == "tiny_imagenet" else 200
        config.optimizer.weight_decay = CNN_WEIGHT_DECAY[dataset][model == "wrn_52_2"]
    if "baseline" in words:
        config.cbm.schedule = "none"
    if "random" in words:
        config.cbm.salience = "uniform"
    return common.smoke(config) if "smoke" in words else config


def get_config(variant: str = "resnet18,cifar100") -> ml_collections.ConfigDict:
    """`MODEL,DATASET[,baseline|random][,smoke]`."""
    model, dataset, *rest = variant.split(",") + [""]
    return paper_config(model, dataset, ",".join(rest))
