"""Times the MAE update step and the CL-MAE iteration (MAE step + masking-module step) side by side.

    python -m bench.bench_steps [--sizes=tiny,base] [--batch=8] [--dtype=float32] [--rounds=3] [--steps=2]

Both are built by the trainers' own classes (train_mae.MAE, train_clmae.CLMAEExperiment) and run alternately for
`rounds` rounds; the table gives median images/s, model FLOPs per image (analytic matmul count and XLA's cost
analysis), the fraction of a matmul peak measured in the same run, compiled peak memory per device, compile time,
and the CL-MAE/MAE time ratio against their FLOP ratio. Inputs are random uint8 images: this measures compute,
not the input pipeline (bench/bench_input.py does). JSON goes to --out.
"""
import json
import os

from absl import app, flags

import jax.numpy as jnp

from bench import flops, harness, jax_steps
from configs import clmae_vitb, mae_vitb

flags.DEFINE_list("sizes", ["tiny", "base"], "ViT sizes to time (patch 16, 224 px).")
flags.DEFINE_integer("batch", 8, "Global batch.")
flags.DEFINE_string("dtype", "float32", "Compute dtype (parameters stay float32).")
flags.DEFINE_string("attention", "einsum", "config.model.attention: einsum, xla or cudnn.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
flags.DEFINE_integer("steps", 2, "Steps per round and row.")
flags.DEFINE_string("out", "bench/results/steps.json", "Where the JSON goes.")
FLAGS = flags.FLAGS


def bench_config(module, size: str):
    """The ImageNet ViT-size/16 config of `module` at the benchmark batch, dtype and attention."""
    return harness.step_config(module, FLAGS.batch, FLAGS.dtype, size=size, attention=FLAGS.attention)


def bench_size(size: str, peak: float) -> dict:
    """MAE step and CL-MAE iteration figures for one ViT size, timed alternately."""
    configs = {"mae": bench_config(mae_vitb, size), "clmae": bench_config(clmae_vitb, size)}
    built = {"mae": jax_steps.mae(configs["mae"]), "clmae": jax_steps.clmae(configs["clmae"])}
    timings = harness.alternate({k: jax_steps.runner(b, FLAGS.steps) for k, b in built.items()}, FLAGS.rounds)
    analytic = {"mae": flops.mae_flops(configs["mae"]), "clmae": flops.clmae_flops(configs["clmae"])}
    row = {"size": size, "batch": FLAGS.batch, "dtype": FLAGS.dtype}
    for name, (experiment, _, stats) in built.items():
        seconds = timings[name]["median_seconds"]
        xla_per_image = stats["xla_flops"] * experiment.mesh.size / FLAGS.batch
        row[name] = {**stats, **timings[name], "images_per_sec": FLAGS.batch / seconds,
                     "analytic_flops_per_image": analytic[name], "xla_flops_per_image": xla_per_image,
                     "fraction_of_peak": analytic[name] * FLAGS.batch / seconds / peak}
    row["clmae_over_mae_time"] = timings["clmae"]["median_seconds"] / timings["mae"]["median_seconds"]
    row["clmae_over_mae_flops"] = analytic["clmae"] / analytic["mae"]
    return row


def print_table(rows: list, peak: float):
    """The README table."""
    print(f"\n{harness.device_line()}, {FLAGS.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s, batch {FLAGS.batch}, "
          f"224 px, patch 16, median of {FLAGS.rounds} alternating rounds")
    header = ("model", "img/s", "GFLOP/img (analytic / XLA)", "% of matmul peak", "peak MiB/device", "compile s")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        for name, label in (("mae", "MAE step"), ("clmae", "CL-MAE iteration")):
            x = r[name]
            print(f"| ViT-{r['size']}/16 {label} | {x['images_per_sec']:.2f} | {x['analytic_flops_per_image'] / 1e9:.1f}"
                  f" / {x['xla_flops_per_image'] / 1e9:.1f} | {100 * x['fraction_of_peak']:.0f}% | "
                  f"{x['peak_bytes_per_device'] / 2 ** 20:.0f} | {x['compile_seconds']:.1f} |")
    for r in rows:
        print(f"ViT-{r['size']}: CL-MAE/MAE time {r['clmae_over_mae_time']:.2f}x for {r['clmae_over_mae_flops']:.2f}x "
              f"the FLOPs ({r['clmae_over_mae_time'] / r['clmae_over_mae_flops']:.2f} of the FLOP ratio)")


def main(argv):
    """Measures the matmul peak, then every size, and prints and saves the table."""
    del argv
    peak = harness.matmul_peak(jnp.dtype(FLAGS.dtype))
    rows = [bench_size(size, peak) for size in FLAGS.sizes]
    print_table(rows, peak)
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"device": harness.device_line(), "peak_flops": peak, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
