"""The three protocols (kNN, linear probe, few-shot) on one encoder, sharing extracted features.

PROTOCOLS maps each type to `run_<type>(eval_config, features, prefix, resume) -> {"<prefix>_...": percent}`;
`features` is a `FeatureSets` that extracts each split once (every pool the run needs in one forward pass) and can
cache it on disk. The "eval" experiment and the evaluators inside pretraining both run protocols through it.
"""
import dataclasses
from typing import Callable

import jax
import numpy as np
from absl import logging

from clmae_jax.evaluate import bank as bank_lib, fewshot, knn, linear
from clmae_jax.evaluate.encoder import Encoder, feature_pool
from clmae_jax.runtime import checkpoint, data, mesh as mesh_lib, paths
from clmae_jax.runtime.errors import UserError, check_choice

DEFAULT_POOL = {"knn": "gap_norm", "linear": "cls"}  # The official choices (see encoder.py).


@dataclasses.dataclass(frozen=True)
class Resume:
    """What lets a protocol continue an interrupted run: the linear probe's checkpoint folder (`workdir`), few-shot
    results already on record (`done`) and a callback after each new one (`on_result`). Empty: start afresh."""
    workdir: str = ""
    done: dict = dataclasses.field(default_factory=dict)
    on_result: Callable[[dict], None] | None = None


def protocol_type(name: str, eval_config) -> str:
    """eval_config.type (default: the entry's name), checked."""
    return check_choice(f"evals.{name}.type", eval_config.get("type") or name, PROTOCOLS)


def pools_needed(kind: str, eval_config) -> set:
    """The feature pools a protocol reads."""
    if kind == "fewshot":
        return pools_needed("knn", eval_config.knn) | pools_needed("linear", eval_config.linear)
    return {feature_pool(eval_config, DEFAULT_POOL[kind])}


class FeatureSets:
    """Feature banks of one encoder's parameters, extracted on first use and memoised per (split, limit)."""

    def __init__(self, mesh, input_config, encoder: Encoder, params, pools: set, batch_size: int,
                 chunk: int = knn.CHUNK, cache_dir: str = ""):
        self.mesh, self.input_config, self.encoder, self.params = mesh, input_config, encoder, params
        self.pools, self.batch_size, self.chunk, self.cache_dir = sorted(pools), batch_size, chunk, cache_dir
        self.sources, self.banks = {}, {}
        pools_ = self.pools
        self.featurize_fn = jax.jit(lambda p, images: {k: v for k, v in encoder.features(p, images).items()
                                                       if k in pools_})

    def source(self, split: str) -> data.Source:
        """The data source of `split` (loaded once)."""
        if split not in self.sources:
            self.sources[split] = data.load_source(self.input_config, split)
        return self.sources[split]

    @property
    def num_classes(self) -> int:
        """Classes of the evaluation data set."""
        return self.source(self.input_config.train_split).num_classes

    def get(self, split: str, pool: str, limit_examples: int = 0) -> bank_lib.Bank:
        """The bank of `pool` features of `split` (its first `limit_examples`, rounded up to batches, if > 0)."""
        limit = -(-limit_examples // self.batch_size) if limit_examples else 0
        key = (split, limit)
        if key not in self.banks:
            self.banks[key] = self.cached(split, limit) or self.extract(split, limit)
        return self.banks[key][pool]

    def cache_name(self, split: str, limit: int) -> str:
        """File stem of a cached bank: split, limit, pool and the encoder's step."""
        return f"{split}-{limit or 'all'}-{'+'.join(self.pools)}-step{self.encoder.step}-b{self.batch_size}"

    def cached(self, split: str, limit: int):
        """{pool: Bank} from the disk cache, or None."""
        if not self.cache_dir:
            return None
        banks = {p: bank_lib.load(self.cache_dir, f"{self.cache_name(split, limit)}-{p}", self.mesh)
                 for p in self.pools}
        return banks if all(b is not None for b in banks.values()) else None

    def extract(self, split: str, limit: int) -> dict:
        """Runs the encoder over the split; writes the disk cache when there is one."""
        banks = bank_lib.split_banks(self.mesh, self.input_config, self.source(split), self.batch_size,
                                     lambda batch: self.featurize_fn(self.params, batch["image"]), self.chunk,
                                     f"features {split} ({self.encoder.name})", limit)
        if self.cache_dir:
            for pool, b in banks.items():
                bank_lib.save(b, self.cache_dir, f"{self.cache_name(split, limit)}-{pool}", self.mesh)
        return banks


def run_knn(eval_config, features: FeatureSets, prefix: str = "knn", resume: Resume = Resume()) -> dict:
    """kNN Acc@1 / Acc@NN (%) of the eval split against the train split."""
    pool = feature_pool(eval_config, DEFAULT_POOL["knn"])
    train = features.get(features.input_config.train_split, pool, eval_config.get("num_train", 0))
    test = features.get(features.input_config.eval_split, pool, eval_config.get("num_test", 0))
    result = knn.knn_accuracy(features.mesh, train, test, features.num_classes, k=eval_config.k,
                              metric=eval_config.metric, vote_kind=eval_config.vote,
                              temperature=eval_config.temperature, chunk=features.chunk)
    return {f"{prefix}_acc1": result["acc1"], f"{prefix}_accnn": result["accnn"]}


def image_epochs(features: FeatureSets, eval_config, steps_per_epoch: int):
    """`epoch -> global batches` of augmented training images (config.input.augment), the official protocol."""
    input_config = features.input_config.copy_and_resolve_references()
    input_config.augment = eval_config.get("augment", "mae")
    input_config.crop_scale = tuple(eval_config.get("crop_scale", (0.08, 1.0)))
    source = features.source(input_config.train_split)
    local = mesh_lib.local_batch_size(eval_config.batch_size)

    def epoch_batches(epoch):
        iterator = data.train_iterator(input_config, source, local, eval_config.get("seed", 0),
                                       epoch * steps_per_epoch)
        batches = (b for b, _ in zip(iterator, range(steps_per_epoch)))
        return mesh_lib.prefetch_to_mesh(batches, features.mesh)

    return epoch_batches


def run_linear(eval_config, features: FeatureSets, prefix: str = "linear", resume: Resume = Resume()) -> dict:
    """Linear-probe top-1 / top-5 (%) on the eval split; cached features or the official augmented images. With
    resume.workdir the probe checkpoints each epoch under it and continues from there."""
    pool = feature_pool(eval_config, "cls")
    test = features.get(features.input_config.eval_split, pool, eval_config.get("num_test", 0))
    head = linear.ProbeHead(features.num_classes)
    cache = eval_config.get("cache_features", False)
    if cache:
        train = features.get(features.input_config.train_split, pool, eval_config.get("num_train", 0))
        steps_per_epoch = train.num_examples // eval_config.batch_size
        local_features, local_labels = linear.local_rows(train)
        batches = linear.cached_epochs(local_features, local_labels, mesh_lib.local_batch_size(eval_config.batch_size),
                                       steps_per_epoch, eval_config.get("seed", 0),
                                       lambda b: mesh_lib.to_global(b, features.mesh))
        featurize = lambda _, batch: batch["features"]
    else:
        num_train = eval_config.get("num_train", 0) or features.source(features.input_config.train_split).num_examples
        steps_per_epoch = num_train // eval_config.batch_size
        batches = image_epochs(features, eval_config, steps_per_epoch)
        featurize = lambda params, batch: features.encoder.features(params, batch["image"])[pool]
    if steps_per_epoch == 0:
        raise UserError(f"The linear probe's batch of {eval_config.batch_size} exceeds its training examples; "
                        "lower config.evals.<linear>.batch_size.")
    checkpointer = None
    if resume.workdir and eval_config.get("checkpoint", True):
        checkpointer = checkpoint.Checkpointer(paths.join(resume.workdir, prefix), keep=1)
    state = linear.train_head(head, eval_config, test.features.shape[1], steps_per_epoch, batches, featurize,
                              features.params, checkpointer, name=prefix)
    result = linear.probe_accuracy(head, state, test)
    return {f"{prefix}_acc1": result["acc1"], f"{prefix}_acc5": result["acc5"]}


def run_fewshot(eval_config, features: FeatureSets, prefix: str = "fewshot", resume: Resume = Resume()) -> dict:
    """Few-shot kNN and linear top-1 (%) per shot count: mean and std over seeds (plus each seed's value).

    resume.done holds per-seed results of an earlier, interrupted run, which are not recomputed;
    resume.on_result(scalars) is called after each seed so a rerun can resume.
    """
    results = dict(resume.done)
    train_split, test_split = features.input_config.train_split, features.input_config.eval_split
    knn_pool = feature_pool(eval_config.knn, DEFAULT_POOL["knn"])
    linear_pool = feature_pool(eval_config.linear, DEFAULT_POOL["linear"])
    tests = {p: features.get(test_split, p, eval_config.get("num_test", 0)) for p in (knn_pool, linear_pool)}
    trains = {p: features.get(train_split, p, eval_config.get("num_train", 0)) for p in (knn_pool, linear_pool)}
    labels = fewshot.labels_by_index(trains[knn_pool])
    for shots in eval_config.shots:
        for seed in eval_config.seeds:
            examples = fewshot.sample_few_shot(labels, shots, seed, features.num_classes)
            for method in eval_config.methods:
                key = f"{prefix}_{shots}shot_{method}_seed{seed}_acc1"
                if key in results:
                    continue
                pool = knn_pool if method == "knn" else linear_pool
                subset = fewshot.gather_subset(trains[pool], examples, features.mesh)
                if method == "knn":
                    results[key] = fewshot.fewshot_knn(*subset, tests[pool], eval_config, features.num_classes,
                                                       features.mesh, shots)
                else:
                    results[key] = fewshot.fewshot_linear(*subset, tests[pool], eval_config, features.num_classes,
                                                          seed)
                logging.info("%s: %.2f", key, results[key])
                if resume.on_result:
                    resume.on_result(results)
        for method in eval_config.methods:
            values = [results[f"{prefix}_{shots}shot_{method}_seed{s}_acc1"] for s in eval_config.seeds]
            results[f"{prefix}_{shots}shot_{method}_acc1"] = float(np.mean(values))
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0  # Sample standard deviation.
            results[f"{prefix}_{shots}shot_{method}_acc1_std"] = std
    return results


PROTOCOLS = {"knn": run_knn, "linear": run_linear, "fewshot": run_fewshot}
