"""Feature banks: features of a whole split, built on device batch by batch and kept sharded over the mesh.

Each device keeps the rows of every batch that it computed (no all-to-all to put rows in dataset order): device d
holds rows [d * R, (d + 1) * R) of the bank, the d-th slice of batch 0, then of batch 1, and so on. With every
row go its label, a `valid` flag (0 for the padding that evens out the last batch) and its example index in the
split, so anything that must not depend on the layout (the few-shot subsets) works on example indices.

An ImageNet bank (1.28M x 768 float32, 3.9 GB) is split over all devices of all processes; no host holds it.
Banks can be cached on disk per process (`save` / `load`) so a rerun skips the extraction.
"""
import dataclasses
import functools
import io
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from clmae_jax.runtime import data, mesh as mesh_lib, paths

FIELDS = ("features", "labels", "valid", "index")


@dataclasses.dataclass
class Bank:
    """Global arrays sharded on the row axis over every mesh axis: features [N, D] float32, labels, valid, index."""

    features: jax.Array
    labels: jax.Array
    valid: jax.Array
    index: jax.Array
    num_examples: int  # Real (valid) rows.

    @property
    def rows_per_device(self) -> int:
        """Rows each device holds (a multiple of the kNN chunk)."""
        return self.features.addressable_shards[0].data.shape[0]


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def empty_bank(mesh, rows_per_device: int, dims: dict) -> dict:
    """Zero arrays (valid = 0) with `rows_per_device` rows on every device: labels, valid, index, and one
    "features:<name>" [rows, dim] per entry of `dims`."""
    rows = rows_per_device * mesh.size
    shapes = (("labels", (rows,), jnp.int32), ("valid", (rows,), jnp.int32), ("index", (rows,), jnp.int32),
              *((f"features:{k}", (rows, d), jnp.float32) for k, d in sorted(dims.items())))
    return zeros_maker(mesh, shapes)()


@functools.lru_cache
def zeros_maker(mesh, shapes: tuple):
    """A compiled maker of the zero arrays `shapes` ((name, shape, dtype), ...) laid out by rows over `mesh`; cached,
    so an evaluation that runs every epoch traces and compiles it once."""
    return jax.jit(lambda: {k: jnp.zeros(shape, dtype) for k, shape, dtype in shapes},
                   out_shardings=mesh_lib.batch_sharding(mesh))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def write_rows(mesh, bank: dict, rows: dict, offset):
    """Writes each device's slice of a batch (`rows`, sharded like the bank) at `offset` of its own bank rows."""
    axes = tuple(mesh.axis_names)

    def per_device(bank, rows, offset):
        return {k: jax.lax.dynamic_update_slice_in_dim(bank[k], rows[k].astype(bank[k].dtype), offset, axis=0)
                for k in bank}

    spec = {k: P(axes) for k in bank}
    rows = jax.lax.with_sharding_constraint(rows, mesh_lib.batch_sharding(mesh))
    return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, P()), out_specs=spec)(bank, rows, offset)


@jax.jit
def add_counts(totals: dict, counts: dict) -> dict:
    """Sums two dicts of device scalars (jitted: eager arithmetic on arrays spanning processes would hang)."""
    return jax.tree.map(jnp.add, totals, counts)


class Progress:
    """Logs images done, images/s and ETA about every `every_s` seconds: extraction is the long part."""

    def __init__(self, name: str, total: int, every_s: float = 10.0):
        self.name, self.total, self.every_s = name, total, every_s
        self.start = self.last = time.time()

    def __call__(self, done: int):
        now = time.time()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        logging.info("%s: %d/%d images (%.0f%%), %.0f images/s, ETA %.0f s", self.name, done, self.total,
                     100 * done / max(self.total, 1), rate, (self.total - done) / max(rate, 1e-9))


def build_banks(mesh, batches, num_batches: int, batch_size: int, featurize, chunk: int,
                name: str = "bank") -> dict:
    """{pool: Bank} of `featurize(global batch) -> {pool: [B, D]}` over `num_batches` global batches that carry
    "label", "mask" and "index". Rows per device are padded to a multiple of min(chunk, rows), padding invalid."""
    per_device = batch_size // mesh.size
    rows = num_batches * per_device
    rows_per_device = round_up(rows, min(chunk, rows))
    bank, count, progress = None, 0, Progress(name, num_batches * batch_size)
    for i, batch in enumerate(batches):
        features = featurize(batch)
        if bank is None:
            bank = empty_bank(mesh, rows_per_device, {k: v.shape[-1] for k, v in features.items()})
        rows_of_batch = {"labels": batch["label"], "valid": batch["mask"], "index": batch["index"],
                         **{f"features:{k}": v for k, v in features.items()}}
        bank = write_rows(mesh, bank, rows_of_batch, jnp.int32(i * per_device))
        count += batch_size
        progress(count)
    num_examples = int(jax.device_get(jax.jit(jnp.sum)(bank["valid"])))
    return {k.split(":", 1)[1]: Bank(v, bank["labels"], bank["valid"], bank["index"], num_examples)
            for k, v in bank.items() if k.startswith("features:")}


def with_index(iterator, source: data.Source, local_batch: int):
    """Adds each example's index in the split ("index") to process-local eval batches (padding gets -1)."""
    start = data._process_range(source.num_examples)[0]
    for b, batch in enumerate(iterator):
        index = start + b * local_batch + np.arange(len(batch["label"]), dtype=np.int32)
        yield {**batch, "index": np.where(batch["mask"] > 0, index, -1).astype(np.int32)}


def split_banks(mesh, input_config, source: data.Source, batch_size: int, featurize, chunk: int, name: str,
                limit: int = 0) -> dict:
    """{pool: Bank} of a whole split (un-augmented eval transform), or of its first `limit` batches if > 0."""
    local = mesh_lib.local_batch_size(batch_size)
    iterator, num_batches = data.eval_iterator(input_config, source, local)
    if limit:
        num_batches = min(num_batches, limit)
        iterator = (b for b, _ in zip(iterator, range(num_batches)))
    batches = mesh_lib.prefetch_to_mesh(with_index(iterator, source, local), mesh)
    return build_banks(mesh, batches, num_batches, batch_size, featurize, chunk, name)


def cache_paths(folder: str, name: str) -> tuple[str, str]:
    """(this process's .npz, the layout .json) of a cached bank."""
    stem = paths.join(folder, f"{name}.p{jax.process_index()}of{jax.process_count()}")
    return stem + ".npz", stem + ".json"


def layout(mesh) -> dict:
    """What must match for a cached bank to load into this mesh."""
    return {"devices": [d.id for d in mesh.devices.reshape(-1)], "processes": jax.process_count()}


def save(bank: Bank, folder: str, name: str, mesh):
    """Writes this process's rows of `bank` (its devices' shards, in mesh order) to folder/name.p*.npz."""
    paths.makedirs(folder)
    npz, meta = cache_paths(folder, name)
    arrays = {k: np.stack([np.asarray(s.data) for s in sorted(getattr(bank, k).addressable_shards,
                                                               key=lambda s: s.index[0].start)]) for k in FIELDS}
    content = io.BytesIO()
    np.savez(content, **arrays)
    paths.write_bytes(npz, content.getvalue())
    paths.write_text(meta, json.dumps({**layout(mesh), "num_examples": bank.num_examples}))


def load(folder: str, name: str, mesh) -> Bank | None:
    """The cached bank folder/name for this mesh, or None when there is none or its layout differs."""
    npz, meta = cache_paths(folder, name)
    if not (paths.exists(npz) and paths.exists(meta)):
        return None
    saved = json.loads(paths.read_text(meta))
    if {k: saved[k] for k in ("devices", "processes")} != layout(mesh):
        logging.warning("Cached features %s were written for another device layout; extracting again.", npz)
        return None
    arrays = np.load(io.BytesIO(paths.read_bytes(npz)))
    sharding = mesh_lib.batch_sharding(mesh)
    local_devices = sorted(sharding.addressable_devices_indices_map(
        (arrays["labels"].size * jax.process_count(),)).items(), key=lambda kv: kv[1][0].start)
    fields = {}
    for k in FIELDS:
        shards = arrays[k]
        shape = (shards.shape[0] * shards.shape[1] * jax.process_count(), *shards.shape[2:])
        pieces = [jax.device_put(shards[i], device) for i, (device, _) in enumerate(local_devices)]
        fields[k] = jax.make_array_from_single_device_arrays(shape, sharding, pieces)
    logging.info("Loaded cached features %s", npz)
    return Bank(**fields, num_examples=saved["num_examples"])
