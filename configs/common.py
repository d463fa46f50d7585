"""What every config file shares: the one dataset table, the variant grammar and the `smoke` variant.

Variants are comma-separated words after the file name (`configs/NAME.py:word1,word2`); each file names the words
it accepts, and `smoke` is accepted everywhere: it shrinks any run (ImageNet ones included) to a few CPU steps of a
tiny model on the same data, to check a config end to end before spending a pod on it.
"""
import ml_collections

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

HALF = (0.5, 0.5, 0.5)  # The CBM code's mean and std for every dataset: masked cells become mid-grey.


def _dataset(source, name, eval_split, image_size, channels=3, mean=HALF, std=HALF) -> dict:
    return dict(source=source, name=name, train_split="train", eval_split=eval_split, image_size=image_size,
                channels=channels, mean=mean, std=std)


# Dataset -> input fields. `source`: tfds (needs the prepared tfds data), image_folder (DATA_DIR/<split>/<class>/*)
# or fashion_mnist_idx (Debian's dataset-fashion-mnist files, offline).
DATASETS = {
    "imagenet2012": _dataset("tfds", "imagenet2012", "validation", 224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "fashion_mnist": _dataset("fashion_mnist_idx", "fashion_mnist", "test", 28, 1, (0.2860,), (0.3530,)),
    "cifar10": _dataset("tfds", "cifar10", "test", 32),
    "cifar100": _dataset("tfds", "cifar100", "test", 32),
    "food101": _dataset("tfds", "food101", "validation", 64),
    "tiny_imagenet": _dataset("image_folder", "", "val", 64),
    "sport_balls": _dataset("image_folder", "", "test", 224),
    "sea_animals": _dataset("image_folder", "", "test", 224),
    "ahe": _dataset("image_folder", "", "test", 128),
}


def input_config(dataset: str, **fields) -> ml_collections.ConfigDict:
    """config.input for `dataset` from DATASETS, with augmentation defaults and `fields` on top."""
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; add it to configs/common.py DATASETS or use one of "
                         f"{', '.join(DATASETS)}.")
    defaults = dict(data_dir="", augment="none", crop_scale=(0.08, 1.0), shuffle_buffer=50_000,
                    eval_transform="center_crop", eval_crop_ratio=1.0)
    return ml_collections.ConfigDict({**defaults, **DATASETS[dataset], **fields})


def vit_classifier(**fields) -> ml_collections.ConfigDict:
    """config.model of a ViT classifier (fine-tuning, CBM's ViT): every field `ViTClassifier` is built from, with
    `fields` on top; attention and remat as in pretraining (see docs/scaling.md)."""
    defaults = dict(name="vit", size="base", patch_size=16, pool="cls", pos_embed="sincos", drop_path=0.0,
                    head_init_std=0.02, dtype="float32", attention="einsum", remat=False, init_from="")
    return ml_collections.ConfigDict({**defaults, **fields})


def parse_variant(variant: str, allowed, file: str) -> set:
    """The set of comma-separated words in `variant`; a word the file does not know is an error naming the known."""
    words = set(filter(None, variant.split(",")))
    unknown = words - set(allowed) - {"smoke"}
    if unknown:
        raise ValueError(f"Unknown variant word(s) {', '.join(sorted(unknown))} for {file}; use a comma-separated "
                         f"subset of {', '.join(sorted(set(allowed) | {'smoke'}))}.")
    return words


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks `config` to 3 steps of a tiny model at batch 8 with every summary, evaluation and save exercised."""
    config.batch_size = 8
    config.total_steps = 3
    config.grad_accum_steps = 1
    config.log_every_steps = config.image_every_steps = config.checkpoint_every_steps = 1
    config.num_summary_images = 2
    if "eval_batch_size" in config:
        config.eval_batch_size = 8
    if "size" in config.model and config.model.get("name", "vit") == "vit":
        config.model.size = "mini"
    if "decoder_width" in config.model:
        config.model.update(decoder_width=32, decoder_depth=1, decoder_heads=2)
    if "width" in config.model and config.model.get("name") == "resnet18":
        config.model.width = 4
    if "clmae" in config:
        config.clmae.update(loss_group_size=8)
        config.clmae.masker.depth = 1
    if "input" in config:
        config.input.shuffle_buffer = 64
    return config
