"""How much of a Fashion-MNIST garment CBM's masks hide: salience-drawn against uniform cells, per mask count.

    python -m research.cbm_hidden [--images=4000] [--variants=,light]

For each distinct cell count k of each configs/cbm_fashion_mnist.py variant's curriculum, draws k of the 16 cells of
real training images with the training step's own sampler (Sobel salience, and uniform as the `:random` arm does)
and measures the share of the garment's ink (the pixel sum; the background is 0) that the masked cells held, mean over
the images. Also: cells per image that hold no ink and cells that salience gives zero weight. Table to stdout, JSON to
--out.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from cbm_jax import train_supervised as cbm
from cbm_jax.masking import num_masked_patches, patch_mask, sample_patches
from clmae_jax.runtime import data
from configs import cbm_fashion_mnist
from research import sweeps

FLAGS = flags.FLAGS


def ink_hidden(config, images, k: int, rng) -> float:
    """Mean share of each image's ink inside the k cells drawn as config.cbm says (salience or uniform)."""
    cells = sample_patches(rng, cbm.cell_probabilities(config, images), k)
    kept = patch_mask(cells, config.cbm.grid, images.shape[1], images.shape[2])
    ink = images.astype(jnp.float32)
    return float(jnp.mean(1.0 - jnp.sum(ink * kept, axis=(1, 2, 3)) / jnp.sum(ink, axis=(1, 2, 3))))


def main(argv):
    """Prints the table and writes the JSON."""
    del argv
    source = data.fashion_mnist_idx("train", None)
    images = jnp.asarray(next(iter(source.dataset.batch(FLAGS.images).as_numpy_iterator()))["image"])
    config = cbm_fashion_mnist.get_config()
    grid = config.cbm.grid
    cell = images.shape[1] // grid
    cell_ink = images.reshape(-1, grid, cell, grid, cell).sum(axis=(2, 4)).reshape(-1, grid * grid)
    weights = cbm.cell_probabilities(config, images)
    result = {"images": int(images.shape[0]), "cells": grid * grid,
              "cells_without_ink": float(jnp.mean(jnp.sum(cell_ink == 0, axis=1))),
              "cells_with_zero_salience": float(jnp.mean(jnp.sum(weights == 0, axis=1))),
              "largest_salience_weight": float(jnp.mean(jnp.max(weights, axis=1))), "hidden": {}}
    variants = {v or "cbm": [num_masked_patches(r, grid * grid) for r in
                             cbm.masking_ratios(cbm_fashion_mnist.get_config(v), 5)] for v in FLAGS.variants}
    result["curricula"] = variants
    uniform = config.copy_and_resolve_references()
    uniform.cbm.salience = "uniform"
    rng = jax.random.PRNGKey(FLAGS.seed)
    for k in sorted({k for counts in variants.values() for k in counts} - {0}):
        result["hidden"][k] = {name: 100 * ink_hidden(c, images, k, jax.random.fold_in(rng, k))
                               for name, c in (("salience", config), ("uniform", uniform))}
    print(f"{result['images']} images: {result['cells_without_ink']:.2f} of {grid * grid} cells hold no ink, salience "
          f"gives {result['cells_with_zero_salience']:.2f} zero weight, its largest weight averages "
          f"{result['largest_salience_weight']:.3f} (uniform {1 / grid ** 2:.4f}); curricula: {variants}")
    print("| cells masked | ink hidden, salience (%) | ink hidden, uniform (%) | ratio |\n|---|---|---|---|")
    for k, hidden in result["hidden"].items():
        print(f"| {k} | {hidden['salience']:.1f} | {hidden['uniform']:.1f} | "
              f"{hidden['salience'] / hidden['uniform']:.2f} |")
    sweeps.write(FLAGS.out, result)


if __name__ == "__main__":  # Flags only as a script (tests import the functions).
    flags.DEFINE_integer("images", 4000, "Real training images (the first N of the train split).")
    flags.DEFINE_list("variants", ["", "light"], "configs/cbm_fashion_mnist.py variants whose mask counts to measure.")
    flags.DEFINE_integer("seed", 0, "Seed of the cell draws.")
    flags.DEFINE_string("out", "research/results/cbm_hidden.json", "Where the JSON goes.")
    app.run(main)
