"""Throughput of the training input pipeline alone (JPEG decode + RandomResizedCrop + flip, MAE augmentation),
against the step it must feed.

    python -m bench.bench_input [--images=512] [--batch=64] [--batches=20] [--cores=0]

Writes an image folder of random-content JPEGs at ImageNet's typical size (500x375, quality 90) into a temporary
directory, reads it through `data.train_iterator` exactly as training does (image_folder source, 224 px MAE
augmentation) and reports images/s and images/s per host core. --cores=N pins the process to N cores first. The
last line says how many such cores one accelerator needs at a given step rate (default: a ViT-B/16 MAE step at
50% of an H100's 989 TFLOP/s bf16 peak, the issue's target).
"""
import json
import os
import tempfile
import time

from absl import app, flags


flags.DEFINE_integer("images", 512, "JPEGs to write (the pipeline cycles over them).")
flags.DEFINE_integer("batch", 64, "Images per batch.")
flags.DEFINE_integer("batches", 20, "Timed batches, after 3 warm-up batches.")
flags.DEFINE_integer("cores", 0, "Pin to this many cores (0: every core this process may use).")
flags.DEFINE_float("step_images_per_sec", 0.0, "Images/s the accelerator consumes (0: ViT-B/16 MAE at 50% of "
                   "989 TFLOP/s).")
flags.DEFINE_string("out", "bench/results/input.json", "Where the JSON goes.")
FLAGS = flags.FLAGS


def write_jpegs(root: str, count: int):
    """`count` 500x375 JPEGs of smooth random colour (compresses like a photo, unlike white noise) in 10 classes."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = os.path.join(root, "train", f"class{i % 10}")
        os.makedirs(folder, exist_ok=True)
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-20, 21, (375, 500, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def target_images_per_sec() -> float:
    """Images/s of a ViT-B/16 MAE step at 50% of 989 TFLOP/s, from the analytic FLOP count."""
    from bench import flops
    from configs import mae_vitb
    return 0.5 * 989e12 / flops.mae_flops(mae_vitb.get_config())


def main(argv):
    """Writes the folder, times the pipeline, prints and saves the figures."""
    del argv
    if FLAGS.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:FLAGS.cores]))
    cores = len(os.sched_getaffinity(0))
    from clmae_jax.runtime import data  # TensorFlow sizes its thread pools at import: after the pinning.
    from configs import mae_vitb
    config = mae_vitb.get_config().input
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, FLAGS.images)
        config.update(source="image_folder", data_dir=root, shuffle_buffer=FLAGS.images)
        source = data.load_source(config, "train")
        iterator = data.train_iterator(config, source, FLAGS.batch, seed=0)
        for _ in range(3):
            next(iterator)
        start = time.perf_counter()
        for _ in range(FLAGS.batches):
            next(iterator)
        rate = FLAGS.batch * FLAGS.batches / (time.perf_counter() - start)
    needed = FLAGS.step_images_per_sec or target_images_per_sec()
    result = {"cores": cores, "images_per_sec": rate, "images_per_sec_per_core": rate / cores,
              "step_images_per_sec": needed, "cores_to_feed_step": needed / (rate / cores)}
    print(f"\ninput pipeline (JPEG 500x375 -> RandomResizedCrop 224 + flip), {cores} core(s): {rate:.0f} img/s, "
          f"{rate / cores:.0f} img/s per core; a step consuming {needed:.0f} img/s needs "
          f"{result['cores_to_feed_step']:.0f} such cores")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
