"""Few-shot evaluation: n training images per class, several seeds, kNN and linear probe on the subset.

The CL-MAE code reports few-shot results but holds no sampler (its linear probe is pointed at a ready-made
few-shot folder), so the protocol here is inferred: for seed s, the first n images of each class in the split's
permutation by numpy `default_rng(s)`. The subset is a function of (labels, n, seed) only, the same on any
device or process count. Every image of the test split is classified; results are the mean and the standard
deviation over seeds.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from clmae_jax.evaluate import bank as bank_lib, knn, linear
from clmae_jax.runtime import mesh as mesh_lib
from clmae_jax.runtime.errors import UserError


def sample_few_shot(labels: np.ndarray, shots: int, seed: int, num_classes: int) -> np.ndarray:
    """Sorted example indices: the first `shots` examples of every class in the seed's permutation of the split."""
    order = np.random.default_rng(seed).permutation(len(labels))
    chosen = []
    for c in range(num_classes):
        of_class = order[labels[order] == c][:shots]
        if len(of_class) < shots:
            raise UserError(f"Class {c} has {len(of_class)} training images, fewer than {shots} shots; lower "
                            "config.evals.<fewshot>.shots.")
        chosen.append(of_class)
    return np.sort(np.concatenate(chosen))


def labels_by_index(train: bank_lib.Bank) -> np.ndarray:
    """Every process gets the label of each example of the split, by example index (the bank's rows, gathered)."""
    index, labels, valid = (np.asarray(multihost_utils.process_allgather(a, tiled=True)).reshape(-1)
                            for a in (train.index, train.labels, train.valid))
    by_index = np.full(int(index.max()) + 1, -1, np.int64)
    by_index[index[valid > 0]] = labels[valid > 0]
    return by_index


def gather_subset(train: bank_lib.Bank, examples: np.ndarray, mesh) -> tuple[jax.Array, jax.Array]:
    """(features, labels) of `examples` (indices into the split), replicated on every device, in index order."""
    index = np.asarray(multihost_utils.process_allgather(train.index, tiled=True)).reshape(-1)
    valid = np.asarray(multihost_utils.process_allgather(train.valid, tiled=True)).reshape(-1) > 0
    row_of = {int(i): r for r, i in enumerate(index) if valid[r]}
    rows = jnp.asarray([row_of[int(e)] for e in examples], jnp.int32)
    take = jax.jit(lambda f, l, r: (f[r], l[r]), out_shardings=mesh_lib.replicated(mesh))
    return take(train.features, train.labels, rows)


def subset_bank(features: jax.Array, labels: jax.Array, mesh) -> bank_lib.Bank:
    """A small kNN bank from replicated subset arrays, padded to one row block per device."""
    n = features.shape[0]
    rows = bank_lib.round_up(n, mesh.size)
    pad = lambda a: jnp.pad(a, [(0, rows - n)] + [(0, 0)] * (a.ndim - 1))
    put = jax.jit(lambda a: pad(a), out_shardings=mesh_lib.batch_sharding(mesh))
    valid = put(jnp.ones((n,), jnp.int32))
    return bank_lib.Bank(features=put(features), labels=put(labels), valid=valid, index=put(jnp.arange(n)),
                         num_examples=n)


def linear_config(fewshot_config, num_examples: int) -> ml_collections.ConfigDict:
    """The probe recipe on a subset: batch min(batch_size, subset), epochs for `linear_steps` steps (inferred)."""
    c = ml_collections.ConfigDict(fewshot_config.linear.to_dict())
    c.batch_size = min(c.batch_size, num_examples)
    steps_per_epoch = num_examples // c.batch_size
    c.epochs = max(1, math.ceil(fewshot_config.linear_steps / steps_per_epoch))
    c.warmup_epochs = c.epochs * fewshot_config.linear.warmup_epochs / fewshot_config.linear.epochs
    return c


def replicated_epochs(features, labels, batch: int, steps_per_epoch: int, seed: int):
    """`epoch -> batches` of a replicated subset, reshuffled each epoch (the same order on every process)."""

    def epoch_batches(epoch):
        order = jnp.asarray(np.random.default_rng([seed, epoch]).permutation(features.shape[0]))
        for i in range(steps_per_epoch):
            rows = order[i * batch:(i + 1) * batch]
            yield {"features": features[rows], "label": labels[rows]}

    return epoch_batches


def fewshot_linear(features, labels, test: bank_lib.Bank, fewshot_config, num_classes: int, seed: int) -> float:
    """Top-1 accuracy (%) of the linear probe trained on the replicated subset."""
    c = linear_config(fewshot_config, features.shape[0])
    steps_per_epoch = features.shape[0] // c.batch_size
    head = linear.ProbeHead(num_classes)
    batches = replicated_epochs(features, labels, c.batch_size, steps_per_epoch, seed)
    state = linear.train_head(head, c, features.shape[1], steps_per_epoch, batches, lambda _, b: b["features"],
                              name=f"fewshot linear seed {seed}")
    return linear.probe_accuracy(head, state, test)["acc1"]


def fewshot_knn(features, labels, test: bank_lib.Bank, fewshot_config, num_classes: int, mesh,
                shots: int) -> float:
    """Top-1 accuracy (%) of kNN with the subset as the bank, k at most the shots per class.

    With more neighbours than images per class, the vote is decided by the other classes: at 1 shot and k = 5 the
    five nearest are five different classes and every vote is a tie.
    """
    bank = subset_bank(features, labels, mesh)
    k = min(fewshot_config.knn.k, shots)
    return knn.knn_accuracy(mesh, bank, test, num_classes, k=k, metric=fewshot_config.knn.metric,
                            vote_kind=fewshot_config.knn.vote, temperature=fewshot_config.knn.temperature)["acc1"]
