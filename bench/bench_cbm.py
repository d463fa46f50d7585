"""Times the CBM update step against the same step without masking (the baseline), side by side in one process.

    python -m bench.bench_cbm [--cases=fashion_mnist,resnet18:cifar100] [--batch=64] [--rounds=5]

A case is `fashion_mnist` (configs/cbm_fashion_mnist.py) or `MODEL:DATASET` of configs/cbm_paper.py. For each, the
baseline step (k = 0: no salience, no masking, as the official MaskIn at ratio 0) and the CBM step with the
preset's largest mask count run alternately for `rounds` rounds; the table gives the median seconds per step of
each, their ratio, and the cost of salience + sampling + masking alone. Inputs are random uint8 images: this
measures compute, not the input pipeline. JSON goes to --out.
"""
import json
import os
import statistics
import time

from absl import app, flags

import jax

from bench import harness
from cbm_jax import train_supervised as cbm
from cbm_jax.masking import num_masked_patches
from configs import cbm_fashion_mnist, cbm_paper

flags.DEFINE_list("cases", ["fashion_mnist", "resnet18:cifar100"], "fashion_mnist or MODEL:DATASET of cbm_paper.")
flags.DEFINE_integer("batch", 64, "Global batch (the paper's is 64).")
flags.DEFINE_integer("rounds", 5, "Alternating rounds; each times `steps` steps of both variants.")
flags.DEFINE_integer("steps", 10, "Steps per round and variant.")
flags.DEFINE_string("out", "bench/results/cbm.json", "Where the JSON goes.")
FLAGS = flags.FLAGS


def case_config(case: str):
    """The config of a case, with CvT weights left out (random init times the same)."""
    if case == "fashion_mnist":
        config = cbm_fashion_mnist.get_config()
    else:
        model, dataset = case.split(":")
        config = cbm_paper.paper_config(model, dataset)
        config.model.init_from = ""
    config.batch_size = FLAGS.batch
    return config


def seconds_per_call(fn, *args) -> float:
    """Wall seconds per call of `fn(*args)` over FLAGS.steps calls (outputs awaited)."""
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / FLAGS.steps


def bench_case(case: str) -> dict:
    """Median step seconds of the baseline and the CBM step, and of the masking alone, for one case."""
    config = case_config(case)
    experiment = harness.build(cbm.Supervised, config, num_classes=10)
    batch = harness.random_batch(config, experiment.mesh, labels=10)
    images, state = batch["image"], [experiment.create_train_state()]

    def step(num_masked):
        """One update of the trainer's compiled step; it donates its state, so the state is threaded through."""
        state[0], measurements = experiment.step_fn(state[0], batch, num_masked)
        return measurements

    masking = jax.jit(lambda x, rng, k: cbm.masked_inputs(config, x, rng, k), static_argnums=2)
    k = max(num_masked_patches(r, config.cbm.grid**2) for r in cbm.masking_ratios(config, 5))
    rng = jax.random.PRNGKey(1)
    for num_masked in (0, k):  # Compile both outside the timings.
        jax.block_until_ready(step(num_masked))
        jax.block_until_ready(masking(images, rng, num_masked))
    times = {"baseline": [], "cbm": [], "masking_only": [], "normalize_only": []}
    for _ in range(FLAGS.rounds):
        times["baseline"].append(seconds_per_call(step, 0))
        times["cbm"].append(seconds_per_call(step, k))
        times["masking_only"].append(seconds_per_call(masking, images, rng, k))
        times["normalize_only"].append(seconds_per_call(masking, images, rng, 0))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"case": case, "model": config.model.name, "image_size": config.input.image_size, "batch": FLAGS.batch,
            "masked_cells": k,
            **{f"{name}_seconds": value for name, value in median.items()},
            "cbm_over_baseline": median["cbm"] / median["baseline"]}


def main(argv):
    """Times every case, prints the table and saves the JSON."""
    del argv
    rows = [bench_case(case) for case in FLAGS.cases]
    print(f"\n{jax.devices()[0].device_kind} x{jax.device_count()}, batch {FLAGS.batch}, median of "
          f"{FLAGS.rounds} alternating rounds of {FLAGS.steps} steps")
    header = ("case", "px", "cells masked", "baseline ms/step", "CBM ms/step", "CBM/baseline",
              "salience+mask ms", "normalize ms")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['case']} | {r['image_size']} | {r['masked_cells']} | {1e3 * r['baseline_seconds']:.1f} | "
              f"{1e3 * r['cbm_seconds']:.1f} | {r['cbm_over_baseline']:.3f}x | {1e3 * r['masking_only_seconds']:.2f} | "
              f"{1e3 * r['normalize_only_seconds']:.2f} |")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
