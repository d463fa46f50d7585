"""Per-process data shards as a pod slice cuts them, without starting processes: jax.process_count / process_index
are patched to 2, 3, 4 and 64 and every process's source, training stream and evaluation stream are read in turn.

A shard off by one row (overlapping its neighbour, or leaving a gap) trains and evaluates without an error on any
number of hosts, so only a test that accounts for every row catches it. Sources: the real Fashion-MNIST IDX test
split (10,000 rows), a tfds dataset prepared offline and an image folder (301 rows each: uneven for every count).
"""
import collections
import dataclasses
import functools
import io
import math
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clmae_jax.runtime import data, mesh as mesh_lib
from configs import mae_fashion_mnist

ROWS = 301  # Rows of the hand-made sources: 301 = 150.5 x 2 = 100.3 x 3 = 75.25 x 4 = 4.7 x 64.
SIDE = 4  # Their images are 4x4 grey, the row number written into the first two pixels.
# A TPU slice with that many hosts (4 chips each), whose batch sharding bench/tpu.py checks for input layout.
TOPOLOGIES = {2: "v5e:2x4", 3: "v4:2x2x3", 4: "v5e:4x4", 64: "v5e-256"}
CHIPS_PER_HOST = 4


def image_of(row: int) -> np.ndarray:
    """A 4x4 grey image that carries `row` in its first two pixels."""
    image = np.zeros((SIDE, SIDE, 1), np.uint8)
    image[0, 0, 0], image[0, 1, 0] = divmod(row, 256)
    return image


def rows_of(images: np.ndarray) -> list:
    """The row numbers written into a batch of image_of images."""
    return (images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 1, 0]).tolist()


class GuardShardRows(tfds.core.GeneratorBasedBuilder):
    """A tfds dataset of ROWS image_of images, prepared offline (no download), one 'train' split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(SIDE, SIDE, 1)), "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for row in range(ROWS):
            yield row, {"image": image_of(row), "label": row % 3}


@dataclasses.dataclass(frozen=True)
class Rows:
    """A source under test: its input config and split, every row in split order, how to read rows off a batch of
    images, and how many images per chip a global batch takes (a process's share must fit in its smallest block)."""

    config: object
    split: str
    order: list
    rows_of: object
    per_chip: int


def hand_made_input(**fields):
    """Input config that leaves a 4x4 grey image's pixels as they are (no crop, flip or resampling)."""
    config = mae_fashion_mnist.fashion_mnist_input()
    config.update(dict(image_size=SIDE, channels=1, augment="none", eval_transform="resize", shuffle_buffer=1000,
                       **fields))
    return config


def idx_source() -> Rows:
    """The real Fashion-MNIST test split; a row is known by its pixels (as the first row with the same image: the
    split holds a few duplicates, counted as such)."""
    config = mae_fashion_mnist.fashion_mnist_input()
    config.update(dict(augment="none", eval_transform="resize", shuffle_buffer=1000))
    images = data._read_idx(os.path.join(data.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
    first = {}
    order = [first.setdefault(image.tobytes(), row) for row, image in enumerate(images)]
    return Rows(config, "test", order, lambda batch: [first[image[..., 0].tobytes()] for image in batch], 16)


def tfds_source(folder) -> Rows:
    """GuardShardRows prepared in `folder`; its order is the one tfds wrote (tfds shuffles on write)."""
    builder = GuardShardRows(data_dir=str(folder))
    builder.download_and_prepare()
    stored = builder.as_dataset(split="train").batch(ROWS).get_single_element()["image"].numpy()
    return Rows(hand_made_input(source="tfds", name=builder.name, data_dir=str(folder)), "train", rows_of(stored),
                rows_of, 1)


def folder_source(folder) -> Rows:
    """An image folder train/c<k>/<row>.png whose listing order is the row order."""
    for row in range(ROWS):
        os.makedirs(folder / "train" / f"c{row * 3 // ROWS}", exist_ok=True)
        Image.fromarray(image_of(row)[..., 0]).save(folder / "train" / f"c{row * 3 // ROWS}" / f"{row:04d}.png")
    return Rows(hand_made_input(source="image_folder", data_dir=str(folder)), "train", list(range(ROWS)), rows_of, 1)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """kind -> Rows, each made on first use (an xdist worker makes only the kinds its tests read)."""
    makers = {"idx": idx_source, "tfds": lambda: tfds_source(tmp_path_factory.mktemp("tfds")),
              "image_folder": lambda: folder_source(tmp_path_factory.mktemp("folder"))}
    made = {}

    def get(kind: str) -> Rows:
        if kind not in made:
            made[kind] = makers[kind]()
        return made[kind]
    return get


def as_process(monkeypatch, index: int, count: int):
    """This test process plays process `index` of `count` (each with CHIPS_PER_HOST devices) for the data code."""
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(jax, "device_count", lambda: count * CHIPS_PER_HOST)


def tfds_ranges(split: str, num_examples: int, count: int) -> list:
    """[start, stop) of every process as tfds.split_for_jax_process cuts a split of `num_examples`."""
    infos = tfds.core.SplitDict([tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0)])
    ranges = []
    for index in range(count):
        (cut,) = tfds.split_for_jax_process(split, process_index=index, process_count=count).to_absolute(infos)
        ranges.append((cut.from_ or 0, num_examples if cut.to is None else cut.to))
    return ranges


def source_rows(source: data.Source, rows_of_images) -> list:
    """The rows of a process's source, in its order, read straight from the dataset (images decoded here)."""
    images = [batch["image"] for batch in source.dataset.batch(1024).as_numpy_iterator()]
    if source.encoded:
        images = [np.stack([np.asarray(Image.open(io.BytesIO(b)))[..., None] for b in batch]) for batch in images]
    return [row for batch in images for row in rows_of_images(batch)]


def streams(config, source: data.Source, rows_of_images, local_batch: int) -> dict:
    """The rows of a process's evaluation stream (in order, padding left out) and its batch count, of its first
    training epoch, and of its first training batch."""
    batches, num_batches = data.eval_iterator(config, source, 64)
    batches = list(batches)
    evaluated = [r for b in batches for r in rows_of_images(b["image"][b["mask"] == 1])]
    size = int(source.dataset.cardinality())
    # Epochs follow each other in the stream, so its first `size` examples are epoch 0, however the batches fall.
    stream = data.train_iterator(config, source, local_batch, seed=0)
    trained = [rows_of_images(next(stream)["image"]) for _ in range(math.ceil(size / local_batch))]
    return {"evaluated": evaluated, "eval_batches": (num_batches, len(batches)),
            "epoch": [r for b in trained for r in b][:size], "first": trained[0]}


def sampled(count: int) -> list:
    """The processes whose streams are read: all of up to 5, else both ends and the middle (each stream costs
    ~0.25 s of tf.data tracing; the source split itself is checked for every process)."""
    return sorted({0, 1, count // 2, count - 2, count - 1})


@pytest.mark.parametrize("count", [2, 3, 4, 64])
@pytest.mark.parametrize("kind", ["idx", "tfds", "image_folder"])
def test_every_process_reads_its_own_contiguous_block_and_together_every_row_once(sources, monkeypatch, kind,
                                                                                   count):
    """Guards the per-process split of every source: each row in one process, contiguous blocks, read whole."""
    rows = sources(kind)
    config, split, order = rows.config, rows.split, rows.order
    # The IDX file is read again for every process; a cached read keeps 64 of them fast (same arrays).
    monkeypatch.setattr(data, "_read_idx", functools.lru_cache(data._read_idx))
    blocks, read = [], {}
    for index in range(count):
        as_process(monkeypatch, index, count)
        source = data.load_source(config, split)
        assert source.num_examples == len(order)
        blocks.append(source_rows(source, rows.rows_of))
        if index in sampled(count):
            # Each process's share of the global batch, as the training loop asks for it.
            local_batch = mesh_lib.local_batch_size(count * CHIPS_PER_HOST * rows.per_chip)
            read[index] = streams(config, source, rows.rows_of, local_batch)
    # The blocks, in process order, are the split in its own order: each row once, each block contiguous.
    assert [r for block in blocks for r in block] == order, f"{sum(map(len, blocks))} rows for {len(order)}"
    # Cut as tfds.split_for_jax_process cuts the split: the same blocks (the remainder goes to the first processes).
    assert [len(block) for block in blocks] == [stop - start for start, stop in tfds_ranges(split, len(order), count)]
    # Evaluation reads exactly its block, in order, in as many batches as every other process (collectives wait).
    per_process = math.ceil(len(order) / count)
    for index, got in read.items():
        assert got["evaluated"] == blocks[index]
        assert got["eval_batches"] == (math.ceil(per_process / 64),) * 2
    # Training: each process's first epoch is its block reshuffled; its first batch is its share of the global one.
    for index, got in read.items():
        assert collections.Counter(got["epoch"]) == collections.Counter(blocks[index])
        assert len(got["first"]) == CHIPS_PER_HOST * rows.per_chip and set(got["first"]) <= set(blocks[index])


@pytest.mark.parametrize("count", [2, 3, 4, 64])
def test_the_global_batch_holds_each_process_rows_in_the_block_the_input_layout_check_expects(monkeypatch, count):
    """Guards that the rows each process feeds land where bench/tpu.py's input-layout check says they must."""
    pytest.importorskip("libtpu", reason="TPU topologies need libtpu: pip install -r requirements-tpu.txt")
    from bench import tpu
    devices = tpu.topology_devices(TOPOLOGIES[count])
    assert len({d.process_index for d in devices}) == count and len(devices) == count * CHIPS_PER_HOST
    batch = len(devices)  # One image per chip, as the test above asks of the small sources.
    sharding = mesh_lib.batch_sharding(mesh_lib.make_mesh(None, devices))
    assert tpu.input_layout_problems(sharding, batch) == []
    held = tpu.process_rows(sharding, batch)
    for index in range(count):
        as_process(monkeypatch, index, count)
        local = mesh_lib.local_batch_size(batch)
        # mesh.to_global puts process p's local batch (rows of data block p, test above) at rows p*local...
        assert held[index] == list(range(index * local, (index + 1) * local))
