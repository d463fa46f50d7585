"""kNN evaluation of a pretrained MAE / CL-MAE encoder, the CL-MAE code's protocol.

    python main.py --config=configs/eval_knn.py --workdir=runs/knn --config.encoder.checkpoint=runs/clmae_fmnist
    python main.py --config=configs/eval_knn.py:imagenet --config.input.data_dir=TFDS_DIR ...

Official (`engine_zeroshot.py`): mean of the patch tokens, fresh LayerNorm, Euclidean distance, k = 5, majority
vote; Acc@1 and Acc@NN. Variant words (comma-separated): a data set (`fashion_mnist`, the default, `imagenet` or
any name of configs/common.py DATASETS), `cosine` (cosine similarity, k = 20, exp(s/0.07)-weighted vote, DINO's
kNN), `smoke` (a few CPU seconds). `--config.encoder.checkpoint=raw_pixels` gives the pixel baseline.
"""
import ml_collections

from configs import common
from clmae_jax.runtime.errors import UserError

DATASET_WORDS = {"imagenet", *common.DATASETS}


def parse(variant: str, file: str, words=()) -> tuple[str, set]:
    """(data set, the other words) of a variant string; unknown words or two data sets are a UserError."""
    try:
        found = common.parse_variant(variant, DATASET_WORDS | set(words), file)
    except ValueError as e:
        raise UserError(str(e)) from e
    datasets = found & DATASET_WORDS
    if len(datasets) > 1:
        raise UserError(f"Variant {variant!r} of {file} names {len(datasets)} data sets; name at most one.")
    dataset = next(iter(datasets), "fashion_mnist")
    return ("imagenet2012" if dataset == "imagenet" else dataset), found - datasets


def eval_input(dataset: str) -> ml_collections.ConfigDict:
    """config.input of the data set; large images are evaluated as Resize(256/224 x size) + CenterCrop(size)."""
    size = common.DATASETS[dataset]["image_size"]
    return common.input_config(dataset, eval_crop_ratio=0.875 if size >= 128 else 1.0)


def base_config(dataset: str) -> ml_collections.ConfigDict:
    """Everything but config.evals: the encoder, the data, the feature-extraction batch."""
    config = ml_collections.ConfigDict()
    config.experiment = "eval"
    config.seed = 0
    # checkpoint: an MAE / CL-MAE workdir or WORKDIR/checkpoints/<step>, a PyTorch / HF file, or "raw_pixels".
    # step: -1 = newest. size / patch_size: when set, the weights must match (fails before extraction).
    # mean / std: () = the normalisation the encoder was pretrained with. dtype: compute dtype of extraction.
    # attention: "xla" (jax.nn.dot_product_attention) extracts 15% faster than the "einsum" reference on CPU
    # (bench/bench_extract.py), same features within 1e-5; "cudnn" for bf16 extraction on NVIDIA GPUs.
    config.encoder = ml_collections.ConfigDict(dict(checkpoint="", step=-1, size="", patch_size=0, mean=(), std=(),
                                                    dtype="float32", attention="xla"))
    config.input = eval_input(dataset)
    config.model = ml_collections.ConfigDict()  # The encoder's geometry comes from its checkpoint.
    config.batch_size = 1024 if dataset == "imagenet2012" else 500  # Global feature-extraction batch.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.knn_chunk = 4096  # Bank rows per device compared with a query batch at once.
    config.cache_features_on_disk = True  # WORKDIR/features: a rerun (or another protocol later) skips extraction.
    config.evals = ml_collections.ConfigDict()
    return config


def knn_entry(**overrides) -> ml_collections.ConfigDict:
    """The official kNN: gap_norm features, Euclidean, k = 5, majority vote. num_train / num_test > 0: subsets."""
    return ml_collections.ConfigDict({**dict(type="knn", pool="gap_norm", k=5, metric="euclidean", vote="majority",
                                             temperature=0.07, num_train=0, num_test=0, every_steps=0), **overrides})


def cosine(entry: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DINO's weighted kNN: cosine similarity, k = 20, votes weighted by exp(similarity / 0.07)."""
    entry.update(metric="cosine", vote="weighted", k=20, temperature=0.07)
    return entry


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The shared `smoke` shrink plus small subsets, so any eval config runs in a few CPU seconds."""
    config = common.smoke(config)
    for entry in config.evals.values():
        entry.num_test = 64
        if "num_train" in entry:
            entry.num_train = 128
    return config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """kNN on the variant's data set (default Fashion-MNIST)."""
    dataset, words = parse(variant, "eval_knn.py", {"cosine"})
    config = base_config(dataset)
    config.evals.knn = cosine(knn_entry()) if "cosine" in words else knn_entry()
    return shrink(config) if "smoke" in words else config
