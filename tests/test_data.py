"""Input pipelines on real Fashion-MNIST files and a real image folder: content, determinism, resume, errors."""
import gzip
import os

import numpy as np
import pytest
from PIL import Image

from clmae_jax.runtime import data
from clmae_jax.runtime.errors import MissingInputError, UserError
from configs import mae_fashion_mnist


def fmnist_input(**overrides):
    config = mae_fashion_mnist.fashion_mnist_input()
    config.update(overrides)
    return config


def test_idx_reader_matches_the_raw_bytes():
    labels = data._read_idx(os.path.join(data.FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz"))
    with gzip.open(os.path.join(data.FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz")) as f:
        raw = f.read()
    assert labels.shape == (60000,)
    np.testing.assert_array_equal(labels[:100], np.frombuffer(raw[8:108], np.uint8))
    assert set(np.unique(labels)) == set(range(10))


def test_fashion_mnist_source_and_eval_padding():
    config = fmnist_input()
    source = data.load_source(config, "test")
    assert (source.num_examples, source.num_classes) == (10000, 10)
    iterator, num_batches = data.eval_iterator(config, source, 384)
    batches = list(iterator)
    assert len(batches) == num_batches == 27
    assert sum(int(b["mask"].sum()) for b in batches) == 10000
    assert batches[-1]["image"].shape == (384, 28, 28, 1) and batches[-1]["image"].dtype == np.uint8
    assert batches[0]["image"].std() > 10  # Real clothing, not blank padding.


def test_train_stream_is_deterministic_and_resumes_exactly():
    config = fmnist_input()
    source = data.load_source(config, "train")
    first = data.train_iterator(config, source, 64, seed=3)
    stream = [next(first) for _ in range(5)]
    resumed = data.train_iterator(config, source, 64, seed=3, start_step=3)
    for expected in stream[3:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])
    other_seed = next(data.train_iterator(config, source, 64, seed=4))
    assert not np.array_equal(other_seed["label"], stream[0]["label"])


def test_resume_across_an_epoch_boundary():
    config = fmnist_input(augment="none")
    source = data.load_source(config, "train")
    steps_per_epoch = 60000 // 1000
    # 60 batches of 1000 cover the epoch exactly; batch 61 is the first of epoch 1.
    resumed = next(data.train_iterator(config, source, 1000, seed=0, start_step=steps_per_epoch))
    iterator = data.train_iterator(config, source, 1000, seed=0)
    epoch0 = [next(iterator) for _ in range(steps_per_epoch)]
    np.testing.assert_array_equal(next(iterator)["label"], resumed["label"])
    labels = np.concatenate([b["label"] for b in epoch0])
    np.testing.assert_array_equal(np.bincount(labels), [6000] * 10)  # Every image once per epoch.


@pytest.mark.parametrize("augment", ["mae", "crop_flip", "none"])
def test_augmentations_keep_shape_and_dtype(augment):
    config = fmnist_input(augment=augment, image_size=32, channels=3)
    source = data.load_source(config, "train")
    batch = next(data.train_iterator(config, source, 8, seed=0))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # Grey repeated to RGB.


def test_image_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for name in ("cat", "dog"):
            os.makedirs(tmp_path / split / name)
            for i in range(count):
                pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    config = fmnist_input(source="image_folder", data_dir=str(tmp_path), train_split="train", eval_split="val",
                          image_size=16, channels=3, augment="none")
    source = data.load_source(config, "train")
    assert (source.num_examples, source.num_classes) == (6, 2)
    batch = next(data.train_iterator(config, source, 6, seed=0))
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1]
    evals, _ = data.eval_iterator(config, data.load_source(config, "val"), 4)
    assert sum(int(b["mask"].sum()) for b in evals) == 4


def test_image_folder_finds_nested_images_and_eval_resize_matches_training(tmp_path):
    # Tiny ImageNet's layout: train/<wnid>/images/*.JPEG beside a boxes file.
    rng = np.random.default_rng(0)
    for name in ("n01", "n02"):
        os.makedirs(tmp_path / "train" / name / "images")
        (tmp_path / "train" / name / f"{name}_boxes.txt").write_text("")
        for i in range(2):
            pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / name / "images" / f"{name}_{i}.JPEG")
    config = fmnist_input(source="image_folder", data_dir=str(tmp_path), train_split="train", eval_split="train",
                          image_size=16, channels=3, augment="none", eval_transform="resize", shuffle_buffer=1)
    source = data.load_source(config, "train")
    assert (source.num_examples, source.num_classes) == (4, 2)
    # A non-square image is squashed to 16x16 (the train transform), not centre-cropped.
    train = next(data.train_iterator(config, source, 4, seed=0))
    evals = next(data.eval_iterator(config, source, 4)[0])
    train_images = sorted(train["image"].tobytes()[i * 768:(i + 1) * 768] for i in range(4))
    assert train_images == sorted(evals["image"].tobytes()[i * 768:(i + 1) * 768] for i in range(4))
    config.eval_transform = "crop"
    with pytest.raises(ValueError, match="eval_transform"):
        data.eval_iterator(config, source, 4)


def test_missing_dataset_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_source(fmnist_input(data_dir=str(tmp_path)), "train")
    with pytest.raises(FileNotFoundError, match="tfds build imagenet2012"):
        data.load_source(fmnist_input(source="tfds", name="imagenet2012", data_dir=str(tmp_path)), "train")
    with pytest.raises(FileNotFoundError, match="config.input.data_dir"):
        data.load_source(fmnist_input(source="image_folder", data_dir=str(tmp_path)), "train")
    with pytest.raises(ValueError, match="^config.input.source='csv' is not a known value"):
        data.load_source(fmnist_input(source="csv"), "train")


def test_normalize():
    images = np.array([[[[0], [255]]]], np.uint8)
    np.testing.assert_allclose(data.normalize(images, (0.5,), (0.25,)), [[[[-2.0], [2.0]]]])



def save_image(path, mode: str, fmt: str = "PNG", size=(12, 10)):
    """A random image of PIL `mode` ('L', 'RGB', 'RGBA', 'P') saved as `fmt`."""
    rng = np.random.default_rng(len(str(path)))
    pixels = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, fmt)


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_colour_types_and_formats_are_converted(tmp_path, channels):
    files = {"a/grey.png": ("L", "PNG"), "a/rgb.jpg": ("RGB", "JPEG"), "a/rgba.png": ("RGBA", "PNG"),
             "b/palette.gif": ("P", "GIF"), "b/rgb.bmp": ("RGB", "BMP"), "b/grey.jpg": ("L", "JPEG")}
    for name, (mode, fmt) in files.items():
        save_image(tmp_path / "train" / name, mode, fmt)
    config = fmnist_input(source="image_folder", data_dir=str(tmp_path), image_size=8, channels=channels,
                          augment="none", shuffle_buffer=1)
    source = data.load_source(config, "train")
    batch = next(data.train_iterator(config, source, 6, seed=0))
    assert batch["image"].shape == (6, 8, 8, channels) and source.num_examples == 6
    # Grey PNG decoded directly to one channel keeps its exact pixels (no colour round trip).
    if channels == 1:
        grey = np.asarray(Image.open(tmp_path / "train" / "a" / "grey.png"))
        decoded = data._decode(tf_read(tmp_path / "train" / "a" / "grey.png"), True, 1)
        np.testing.assert_array_equal(np.asarray(decoded)[..., 0], grey)


def tf_read(path):
    import tensorflow as tf
    return tf.io.read_file(str(path))


def test_non_images_are_skipped_and_counted_and_empty_classes_keep_their_label(tmp_path, caplog):
    save_image(tmp_path / "train" / "a" / "0.png", "RGB")
    save_image(tmp_path / "train" / "c" / "0.png", "RGB")
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "a" / "fake.jpg").write_text("<html>404</html>")
    (tmp_path / "train" / "c" / "empty.png").write_bytes(b"")
    os.makedirs(tmp_path / "train" / "b")  # An empty class folder.
    config = fmnist_input(source="image_folder", data_dir=str(tmp_path), image_size=8, channels=3, augment="none",
                          shuffle_buffer=1)
    with caplog.at_level("WARNING"):
        source = data.load_source(config, "train")
    assert (source.num_examples, source.num_classes) == (2, 3)
    assert "skipped 3 of 5 files" in caplog.text and "fake.jpg (not an image)" in caplog.text
    assert "class folder(s) b hold no images" in caplog.text
    batch = next(data.train_iterator(config, source, 2, seed=0))
    assert sorted(batch["label"].tolist()) == [0, 2]  # 'c' keeps label 2 although 'b' is empty.


def test_corrupt_jpeg_is_one_line_naming_the_file(tmp_path):
    for i in range(3):
        save_image(tmp_path / "train" / "a" / f"{i}.jpg", "RGB", "JPEG")
    bad = tmp_path / "train" / "a" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # Header intact, image data cut off.
    config = fmnist_input(source="image_folder", data_dir=str(tmp_path), image_size=8, channels=3, augment="none",
                          shuffle_buffer=1)
    source = data.load_source(config, "train")
    with pytest.raises(UserError, match=f"^{bad} cannot be decoded as an image .*; delete or replace that file.$"):
        next(data.train_iterator(config, source, 3, seed=0))
    with pytest.raises(UserError, match=str(bad)):
        next(data.eval_iterator(config, source, 3)[0])


def test_empty_split_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "train" / "a")
    config = fmnist_input(source="image_folder", data_dir=str(tmp_path))
    with pytest.raises(MissingInputError, match=f"No images .* under {tmp_path}/train/<class>/"):
        data.load_source(config, "train")
