"""Input pipelines: tfds / Fashion-MNIST IDX / image-folder sources -> per-process tf.data -> numpy batches.

Every source yields {"image": uint8 [H,W,C] or encoded bytes, "label": int} for this process's contiguous shard.
Training streams are a pure function of (seed, step): epoch e is the shard shuffled with seed (seed, e), and the
augmentation of the i-th example of epoch e is seeded by (seed, e, i). Resuming at step s therefore starts at epoch
s*b // n and skips s*b % n undecoded records, and continues the exact sequence of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epy

with epy.lazy_imports():  # TensorFlow loads with the first pipeline: update steps and benches run without it.
    import tensorflow as tf
    import tensorflow_datasets as tfds

from clmae_jax.runtime import paths
from clmae_jax.runtime.errors import MissingInputError, UserError, check_choice

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SOURCES = ("tfds", "fashion_mnist_idx", "image_folder")
SOURCE_NAMES = {"fashion_mnist_idx": "fashion_mnist"}  # The config.input.name a source that reads no name accepts.
AUGMENTATIONS = ("mae", "crop_flip", "none")
EVAL_TRANSFORMS = ("center_crop", "resize")


@dataclasses.dataclass(frozen=True)
class Source:
    """A process-local, unshuffled dataset of raw examples and the size of the whole split."""

    dataset: tf.data.Dataset
    num_examples: int  # Global, over all processes.
    num_classes: int
    encoded: bool  # True when "image" holds encoded bytes (decoded after shuffling/skipping, so skips are cheap).
    files: tuple = ()  # The image files, in label order, when the source is a folder (to name one that fails).


def _process_range(num_examples: int) -> tuple[int, int]:
    """This process's contiguous [start, stop) slice of a split, as tfds.split_for_jax_process cuts it (the first
    num_examples % process_count processes take one example more)."""
    size, extra = divmod(num_examples, jax.process_count())
    index = jax.process_index()
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def _read_idx(path: str) -> np.ndarray:
    """Reads a (gzipped) IDX file of unsigned bytes, the MNIST file format."""
    data = paths.read_bytes(path)
    data = gzip.decompress(data) if path.endswith(".gz") else data
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file; reinstall dataset-fashion-mnist.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_idx(split: str, data_dir: str | None) -> Source:
    """Fashion-MNIST from its original IDX files (Debian's dataset-fashion-mnist package), no download."""
    data_dir = data_dir or FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise UserError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}; fix config.input splits.")
    files = [paths.join(data_dir, f"{prefix}-{kind}-idx{n}-ubyte") for kind, n in (("images", 3), ("labels", 1))]
    files = [f if paths.exists(f) else f + ".gz" for f in files]
    missing = [f for f in files if not paths.exists(f)]
    if missing:
        raise MissingInputError(
            f"Fashion-MNIST IDX file {missing[0]} not found; install it with `apt-get install dataset-fashion-mnist` "
            f"or point config.input.data_dir at a folder with the IDX files.")
    images, labels = _read_idx(files[0]), _read_idx(files[1])
    start, stop = _process_range(len(labels))
    dataset = tf.data.Dataset.from_tensor_slices(
        {"image": images[start:stop, :, :, None], "label": labels[start:stop].astype(np.int32)})
    return Source(dataset, len(labels), 10, encoded=False)


def tfds_source(name: str, split: str, data_dir: str | None) -> Source:
    """A prepared tfds dataset by name; images stay encoded until after shuffling."""
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise UserError(f"Unknown tfds dataset {name!r}; fix config.input.name.") from e
    if not paths.exists(builder.data_dir):
        raise MissingInputError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir}; run `tfds build {name} "
            f"--data_dir=DIR` (ImageNet needs its manual download) and set config.input.data_dir=DIR.")
    if split not in builder.info.splits:
        raise UserError(f"tfds dataset {name!r} has splits {list(builder.info.splits)}, not {split!r}.")
    num_examples = builder.info.splits[split].num_examples
    start, stop = _process_range(num_examples)
    dataset = builder.as_dataset(split=f"{split}[{start}:{stop}]", decoders={"image": tfds.decode.SkipDecoding()})
    dataset = dataset.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)})
    return Source(dataset, num_examples, builder.info.features["label"].num_classes, encoded=True)


IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")  # JPEG, PNG, GIF, BMP.


def not_an_image(path: str) -> str | None:
    """Why `path` is not an image by its first bytes ("empty", "not an image"), or None: a cheap check that keeps
    text files and failed downloads named .jpg out of the stream without decoding every image."""
    with paths.open_file(path) as f:
        head = f.read(8)
    if not head:
        return "empty"
    return None if head.startswith(IMAGE_MAGIC) else "not an image"


def list_images(root: str, classes: list) -> tuple[list, list, dict]:
    """(files, labels, skipped) under root/<class>/**; skipped maps each left-out file to the reason."""
    files, labels, skipped = [], [], {}
    for label, name in enumerate(classes):
        # Recursive, so Tiny ImageNet's train/<wnid>/images/*.JPEG is read as it is unpacked; folder by folder.
        class_folder = paths.join(root, name)
        for rel in sorted(paths.files_under(class_folder), key=lambda rel: (os.path.dirname(rel), rel)):
            path = paths.join(class_folder, rel)
            reason = "not an image file name" if not rel.lower().endswith(IMAGE_EXTENSIONS) else not_an_image(path)
            if reason:
                skipped[path] = reason
            else:
                files.append(path)
                labels.append(label)
    return files, labels, skipped


def image_folder(split: str, data_dir: str) -> Source:
    """`data_dir/split/<class>/**/<image>` folders (Tiny ImageNet, transfer sets); classes sorted by name.

    Files that are not images (by name or by their first bytes) are skipped and counted in the log; an empty class
    folder keeps its label, so every split numbers the classes alike. Every process lists and checks all files,
    so all agree on the split.
    """
    root = paths.join(data_dir, split) if data_dir else split
    if not paths.isdir(root):
        raise MissingInputError(f"Image folder {root} not found; set config.input.data_dir to a folder holding "
                                f"{split}/<class>/<image> files.")
    classes = [d for d in paths.listdir(root) if paths.isdir(paths.join(root, d))]
    files, labels, skipped = list_images(root, classes)
    if not files:
        raise MissingInputError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<class>/.")
    if skipped:
        examples = ", ".join(f"{os.path.relpath(p, root)} ({r})" for p, r in list(skipped.items())[:3])
        logging.warning("%s: skipped %d of %d files that are not images, e.g. %s", root, len(skipped),
                        len(files) + len(skipped), examples)
    present = set(labels)
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        logging.warning("%s: class folder(s) %s hold no images; they keep their label", root, ", ".join(empty))
    start, stop = _process_range(len(files))
    dataset = tf.data.Dataset.from_tensor_slices((files[start:stop], np.asarray(labels[start:stop], np.int32)))
    dataset = dataset.map(lambda f, y: {"image": tf.io.read_file(f), "label": y})
    return Source(dataset, len(files), len(classes), encoded=True, files=tuple(files[start:stop]))


def load_source(config, split: str) -> Source:
    """The source named by config.input.source for `split`."""
    kind = check_choice("input.source", config.source, SOURCES)
    if kind == "fashion_mnist_idx":
        return fashion_mnist_idx(split, config.data_dir)
    if kind == "tfds":
        return tfds_source(config.name, split, config.data_dir)
    return image_folder(split, config.data_dir)


def _decode_bytes(image, channels: int):
    """uint8 [H,W,channels] from JPEG / PNG / GIF / BMP bytes of any colour type: grey, RGB, RGBA, palette."""
    if channels == 3:
        return tf.io.decode_image(image, channels=3, expand_animations=False)
    # GIF and BMP decode only to RGB; JPEG and PNG decode to grey directly (exactly, without a colour round trip).
    grey_decoder = tf.io.is_jpeg(image) | tf.equal(tf.strings.substr(image, 0, 4), b"\x89PNG")
    return tf.cond(grey_decoder, lambda: tf.io.decode_image(image, channels=1, expand_animations=False),
                   lambda: tf.image.rgb_to_grayscale(tf.io.decode_image(image, channels=3, expand_animations=False)))


def _decode(image, encoded: bool, channels: int):
    """uint8 [H,W,channels] from encoded bytes or a raw array (grey images are repeated to RGB when asked)."""
    if encoded:
        image = _decode_bytes(image, channels)
    elif image.shape[-1] != channels:
        image = tf.image.grayscale_to_rgb(image) if channels == 3 else tf.image.rgb_to_grayscale(image)
    return image


def _resize(image, size: int):
    """Bicubic resize to size x size, back to uint8 (torchvision's PIL resize, in tf)."""
    image = tf.image.resize(tf.cast(image, tf.float32), (size, size), method="bicubic")
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def random_resized_crop(image, seed, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop: a random area/aspect crop resized (bicubic) to size x size."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=ratio, area_range=scale, max_attempts=10, use_image_if_no_bounding_boxes=True)
    return _resize(tf.slice(image, begin, crop_size), size)


def pad_crop(image, seed, size: int, padding: int = 4):
    """CIFAR-style augmentation: resize, zero-pad by `padding`, random size x size crop."""
    image = tf.pad(_resize(image, size), [[padding, padding], [padding, padding], [0, 0]])
    return tf.image.stateless_random_crop(image, (size, size, image.shape[-1]), seed=seed)


def center_crop(image, size: int, crop_ratio: float):
    """Eval transform: resize the shorter side to size/crop_ratio, take the central size x size."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / crop_ratio / tf.reduce_min(shape)
    new_shape = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(tf.cast(image, tf.float32), new_shape, method="bicubic")
    top, left = (new_shape[0] - size) // 2, (new_shape[1] - size) // 2
    image = image[top:top + size, left:left + size]
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def preprocess_train(example, seed, config, encoded: bool):
    """Decode and augment one training example with stateless randomness from `seed` (shape [2])."""
    image = _decode(example["image"], encoded, config.channels)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    augment = check_choice("input.augment", config.augment, AUGMENTATIONS)
    if augment == "mae":
        image = random_resized_crop(image, crop_seed, config.image_size, tuple(config.crop_scale))
    elif augment == "crop_flip":
        image = pad_crop(image, crop_seed, config.image_size)
    else:
        image = _resize(image, config.image_size)
    if augment != "none":
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image.set_shape((config.image_size, config.image_size, config.channels))
    return {"image": image, "label": example["label"]}


def train_iterator(config, source: Source, batch_size: int, seed: int, start_step: int = 0):
    """Infinite iterator of process-local training batches of `source`, positioned at `start_step`."""
    local_examples = int(source.dataset.cardinality())  # Known for every source: each is a slice of a split.
    if local_examples < batch_size:
        raise UserError(f"This process's shard has {local_examples} training examples, fewer than its batch "
                        f"of {batch_size}; lower config.batch_size.")
    first = start_step * batch_size
    start_epoch, offset = divmod(first, local_examples)

    def epoch(e):
        shuffled = source.dataset.shuffle(config.shuffle_buffer, seed=seed * 1_000_003 + e)
        return shuffled.enumerate().map(lambda i, ex: (tf.stack([seed * 1_000_003 + e, i]), ex))

    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch).skip(offset)
    ds = ds.map(lambda s, ex: preprocess_train(ex, s, config, source.encoded), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    return numpy_batches(ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE), source, config)


def eval_iterator(config, source: Source, batch_size: int):
    """Process-local eval batches over the whole split, padded so every process runs the same number of batches.

    Padding examples carry mask == 0. Returns (iterator, num_batches).
    """
    per_process = -(-source.num_examples // jax.process_count())
    num_batches = -(-per_process // batch_size)
    transform = check_choice("input.eval_transform", config.eval_transform, EVAL_TRANSFORMS)

    def prepare(ex):
        image = _decode(ex["image"], source.encoded, config.channels)
        if transform == "resize":  # CBM's official eval: the same squashing Resize as training, no crop.
            image = _resize(image, config.image_size)
        else:
            image = center_crop(image, config.image_size, config.eval_crop_ratio)
        image.set_shape((config.image_size, config.image_size, config.channels))
        return {"image": image, "label": ex["label"], "mask": tf.constant(1, tf.int32)}

    ds = source.dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    pad = {"image": tf.zeros((config.image_size, config.image_size, config.channels), tf.uint8),
           "label": tf.constant(0, tf.int32), "mask": tf.constant(0, tf.int32)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(num_batches * batch_size)
    return numpy_batches(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE), source, config), num_batches


def undecodable(files, channels: int) -> tuple[str, str] | None:
    """(file, reason) of the first file the pipeline's decoder rejects, or None."""
    for path in files:
        try:
            _decode_bytes(tf.io.read_file(path), channels)
        except tf.errors.OpError as e:
            return path, e.message.strip().splitlines()[0]
    return None


def numpy_batches(dataset: tf.data.Dataset, source: Source, config):
    """Yields the dataset's batches as numpy; an image that fails to decode is a one-line error naming the file
    (tf.data's own error names neither the file nor the fix)."""
    iterator = dataset.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            found = undecodable(source.files, config.channels) if source.encoded else None
            if found:
                raise UserError(f"{found[0]} cannot be decoded as an image ({found[1]}); delete or replace "
                                "that file.") from e
            raise UserError(f"An example of the input could not be read ({e.message.strip().splitlines()[0]}); "
                            "check config.input and rebuild the dataset.") from e
        yield batch


def normalize(images, mean, std):
    """uint8 pixels -> (x/255 - mean) / std, on device, in float32."""
    return (images.astype("float32") / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
