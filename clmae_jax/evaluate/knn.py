"""k-nearest-neighbour classification against a feature bank sharded over the mesh.

Official CL-MAE (`engine_zeroshot.py`): Euclidean distance, k = 5, majority vote (`torch.mode`: ties go to the
smallest label) for Acc@1, and Acc@NN = the true label is among the k neighbours' labels. The common alternative
(DINO's `knn_classifier`): cosine similarity, k = 20, votes weighted by exp(similarity / T), T = 0.07.

The bank is never gathered: each device keeps its rows, finds the k best of them for a replicated batch of queries
in chunks (a running top-k merged with each chunk's), and only the k candidates per device are all-gathered and
merged. Ties go to the lower bank row, as a stable sort of the distances does.
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from clmae_jax.evaluate.bank import add_counts
from clmae_jax.runtime.errors import UserError

METRICS = ("euclidean", "cosine")
VOTES = ("majority", "weighted")
CHUNK = 4096  # Bank rows per device compared with a query batch at once (config.knn_chunk of the eval configs).


def check_options(metric: str, vote: str):
    """UserError for an unknown metric or vote."""
    if metric not in METRICS:
        raise UserError(f"Unknown kNN metric {metric!r}; use one of {METRICS}.")
    if vote not in VOTES:
        raise UserError(f"Unknown kNN vote {vote!r}; use one of {VOTES}.")


def prepare(features, metric: str):
    """Features as the metric compares them: L2-normalised for cosine, unchanged for Euclidean."""
    if metric == "cosine":
        return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    return features


def similarity(queries, bank, metric: str):
    """[Q, N] scores, higher = nearer: cosine similarity, or -||q - b||^2 up to the per-query constant ||q||^2."""
    dots = jnp.einsum("qd,nd->qn", queries, bank, precision=jax.lax.Precision.HIGHEST)
    if metric == "cosine":
        return dots
    return 2 * dots - jnp.sum(bank * bank, axis=-1)[None]


def merge_top_k(scores, labels, k: int):
    """The k best (score, label) pairs of each row; among equal scores the earlier column wins."""
    top, index = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(labels, index, axis=1)


def local_top_k(queries, bank, bank_labels, bank_valid, k: int, chunk: int, metric: str):
    """Top-k of this device's bank rows for every query, scanning `chunk` rows at a time: ([Q,k], [Q,k])."""
    num_queries, rows = queries.shape[0], bank.shape[0]
    chunks = (bank.reshape(rows // chunk, chunk, -1), bank_labels.reshape(rows // chunk, chunk),
              bank_valid.reshape(rows // chunk, chunk))

    def step(best, chunk_rows):
        rows_, labels, valid = chunk_rows
        scores = jnp.where(valid[None], similarity(queries, rows_, metric), -jnp.inf)
        both = (jnp.concatenate([best[0], scores], axis=1),
                jnp.concatenate([best[1], jnp.broadcast_to(labels, scores.shape)], axis=1))
        return merge_top_k(*both, k), None

    init = (jnp.full((num_queries, k), -jnp.inf), jnp.zeros((num_queries, k), jnp.int32))
    best, _ = jax.lax.scan(step, init, chunks)
    return best


def nearest_neighbours(mesh, queries, bank, bank_labels, bank_valid, k: int, chunk: int, metric: str):
    """(scores, labels) [Q, k] of the k nearest bank rows of each query; bank rows sharded over every mesh axis,
    queries replicated. Rows with bank_valid == 0 (padding) are never neighbours."""
    axes = tuple(mesh.axis_names)

    def per_device(queries, bank, bank_labels, bank_valid):
        scores, labels = local_top_k(queries, bank, bank_labels, bank_valid, k, chunk, metric)
        # k candidates per device, in device (= bank row) order, so ties still go to the lower row.
        scores = jax.lax.all_gather(scores, axes, axis=1, tiled=True)
        labels = jax.lax.all_gather(labels, axes, axis=1, tiled=True)
        return merge_top_k(scores, labels, k)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axes), P(axes), P(axes)), out_specs=(P(), P()),
                         check_vma=False)(queries, bank, bank_labels, bank_valid)


def vote(scores, labels, num_classes: int, vote_kind: str, temperature: float):
    """Predicted class per query: majority (ties to the smallest label, as torch.mode) or exp(s/T)-weighted."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if vote_kind == "weighted":
        # Shifted by the best score: the same argmax, and no overflow.
        weights = jnp.exp((scores - scores[:, :1]) / temperature)
        return jnp.argmax(jnp.einsum("qk,qkc->qc", weights, one_hot), axis=-1)
    return jnp.argmax(one_hot.sum(axis=1), axis=-1)


@functools.partial(jax.jit, static_argnames=("mesh", "k", "chunk", "metric", "vote_kind", "num_classes"))
def knn_counts(mesh, queries, query_labels, query_mask, bank, bank_labels, bank_valid, *, k: int, chunk: int,
               metric: str, vote_kind: str, num_classes: int, temperature: float = 0.07):
    """{"correct", "correct_nn", "count"} of one batch of queries (padding queries, mask 0, are not counted)."""
    queries = prepare(queries, metric)
    scores, labels = nearest_neighbours(mesh, queries, bank, bank_labels, bank_valid, k, chunk, metric)
    predicted = vote(scores, labels, num_classes, vote_kind, temperature)
    real = query_mask.astype(jnp.float32)
    return {"correct": jnp.sum((predicted == query_labels) * real),
            "correct_nn": jnp.sum(jnp.any(labels == query_labels[:, None], axis=1) * real),
            "count": jnp.sum(real)}


@functools.partial(jax.jit, static_argnums=(1,))
def query_slice(arrays, size: int, start):
    """Rows [start, start + size) of each of the test bank's arrays."""
    return [jax.lax.dynamic_slice_in_dim(a, start, size, axis=0) for a in arrays]


def knn_accuracy(mesh, train, test, num_classes: int, k: int = 5, metric: str = "euclidean",
                 vote_kind: str = "majority", temperature: float = 0.07, chunk: int = CHUNK,
                 query_batch: int = 1024) -> dict:
    """{"acc1", "accnn"} in percent (and "count", the queries counted) of every valid row of bank `test`
    classified by its k nearest rows of bank `train`.

    `train` rows per device must be a multiple of min(chunk, rows); `test` rows are taken `query_batch` at a time.
    """
    check_options(metric, vote_kind)
    chunk = min(chunk, train.rows_per_device)
    size = min(query_batch, test.rows_per_device)
    if train.rows_per_device % chunk or test.features.shape[0] % size:
        raise ValueError("bank rows do not tile into kNN chunks / query batches; build them with bank.build_banks.")
    bank = (prepare(train.features, metric), train.labels, train.valid)
    totals = None
    for start in range(0, test.features.shape[0], size):
        queries, labels, mask = query_slice((test.features, test.labels, test.valid), size, jnp.int32(start))
        counts = knn_counts(mesh, queries, labels, mask, *bank, k=k, chunk=chunk, metric=metric,
                            vote_kind=vote_kind, num_classes=num_classes, temperature=temperature)
        totals = counts if totals is None else add_counts(totals, counts)  # On device: no sync per batch.
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"acc1": 100 * float(totals["correct"]) / count, "accnn": 100 * float(totals["correct_nn"]) / count,
            "count": count}
