"""The fit table of one GPU host: the largest per-GPU batch of each ViT MAE / CL-MAE that fits a GPU's memory,
and the gradient accumulation that reaches the paper's global batch on 1 and 8 GPUs. Compiled, never run.

    python -m bench.gpu_fit --target=h100 --sizes=base,large,huge --remat=false,true --experiments=mae,clmae

Per cell (ViT size x remat x experiment, ViT-*/16 at 224 px, bf16 compute, cuDNN attention): the training
programs are compiled for one GPU at two batches; peak memory is nearly linear in the batch (state + activations
per image), so the line through the last two compiles predicts the largest batch under the limit
(gpu.MEMORY_FRACTION of the GPU), which is compiled next, until the largest fitting and the smallest failing batch
are within 5%. The micro-batch is the largest power of two under it (the paper
batches are powers of two), the accumulation the global batch over GPUs x micro-batch. Times are roofline bounds.
"""
import json
import math
import os

from absl import app, flags

from bench import gpu  # Sets JAX_PLATFORMS=cpu before jax is imported.

from bench import bench_gpu, bench_tpu, flops
from configs import clmae_vitb, mae_vitb

flags.DEFINE_enum("target", "h100", list(gpu.GPUS), "GPU model (a description in bench/targets/).")
flags.DEFINE_list("sizes", ["base", "large", "huge"], "ViT sizes.")
flags.DEFINE_list("remat", ["false", "true"], "Without and / or with config.model.remat.")
flags.DEFINE_list("experiments", ["mae", "clmae"], "mae and / or clmae.")
flags.DEFINE_list("probe", ["64", "128"], "The two per-GPU batches the first line goes through.")
flags.DEFINE_integer("refine", 4, "Compiles after the probes, each at the batch the last two predict.")
flags.DEFINE_string("out", "bench/results/gpu/fit_h100.json", "JSON path; cells already in it are kept.")
FLAGS = flags.FLAGS

MODULES = {"mae": mae_vitb, "clmae": clmae_vitb}
PAPER_BATCH = {"mae": 4096, "clmae": 2048}  # MAE: He et al. Table 8; CL-MAE: 256 per GPU on the authors' 8.


def cell_config(experiment: str, size: str, remat: bool, batch: int):
    """The paper config of `experiment` at ViT `size`/16, cuDNN attention, `remat`, one GPU's `batch`."""
    config = MODULES[experiment].get_config()
    config.model.update(size=size, patch_size=16, attention="cudnn", remat=remat)
    config.batch_size = batch
    if "clmae" in config:  # CL-MAE's losses pair images within groups of 256 (one GPU's batch), or what divides it.
        config.clmae.loss_group_size = math.gcd(batch, config.clmae.loss_group_size)
    return config


def training(experiment: str, size: str, remat: bool, batch: int, target) -> dict:
    """{"peak_gib", "roofline_seconds", "compile_seconds"} of one training iteration at `batch` on one GPU."""
    config = cell_config(experiment, size, remat, batch)
    rows = bench_gpu.compile_all(config, target, 1, bench_tpu.TRAINING)
    run = bench_gpu.summarise(config, target, batch, rows, 1)
    return {"batch": batch, "peak_gib": run["peak_gib_per_gpu"], "fits": run["fits"],
            "roofline_seconds": run["iteration_roofline_seconds"], "mfu_bound": run["mfu_bound"],
            "cudnn_attention_calls": sum(r["cudnn_attention_calls"] for r in rows.values()),
            "compile_seconds": sum(r["compile_seconds"] for r in rows.values())}


def largest_batch(experiment: str, size: str, remat: bool, target) -> dict:
    """The cell: the compiles, the largest batch (a multiple of 8) that fits, and the accumulation on 1 and 8 GPUs."""
    limit = gpu.MEMORY_FRACTION * target.memory_bytes / 2**30
    points = [training(experiment, size, remat, int(b), target) for b in FLAGS.probe]
    for _ in range(FLAGS.refine):  # Secant steps: memory grows a little slower than the batch at large batches.
        fitting = max((p["batch"] for p in points if p["fits"]), default=0)
        failing = min((p["batch"] for p in points if not p["fits"]), default=1 << 20)
        a, b = points[-2:]
        per_image = (b["peak_gib"] - a["peak_gib"]) / (b["batch"] - a["batch"])
        guess = int(b["batch"] + (limit - b["peak_gib"]) / per_image) // 8 * 8
        guess = min(max(guess, fitting + 8), failing - 8)
        if guess <= fitting or failing - fitting <= max(8, fitting // 20):  # Within 5%: done.
            break
        points.append(training(experiment, size, remat, guess, target))
    best = max((p for p in points if p["fits"]), key=lambda p: p["batch"])
    batch, paper = best["batch"], PAPER_BATCH[experiment]
    micro = 2 ** (batch.bit_length() - 1)
    analytic = (flops.mae_flops if experiment == "mae" else flops.clmae_flops)(cell_config(experiment, size, remat, 8))
    low, high = points[:2]
    per_image = (high["peak_gib"] - low["peak_gib"]) / (high["batch"] - low["batch"])
    return {"experiment": experiment, "size": size, "remat": remat, "compiles": points,
            "gib_per_image": per_image, "gib_fixed": low["peak_gib"] - per_image * low["batch"],
            "largest_batch": batch, "peak_gib_at_largest": best["peak_gib"], "micro_batch": micro,
            "paper_batch": paper, "per_gpu_batch_1_gpu": min(micro, paper), "accum_1_gpu": max(1, paper // micro),
            "per_gpu_batch_8_gpus": min(micro, paper // 8), "accum_8_gpus": max(1, paper // (8 * micro)),
            "roofline_images_per_sec_at_largest": batch / best["roofline_seconds"],
            "mfu_bound_at_largest": best["mfu_bound"], "analytic_flops_per_image": analytic}


def print_table(cells: list, target):
    """The fit table (docs/gpu.md)."""
    print(f"\n1 x {target.name}, limit {gpu.MEMORY_FRACTION * target.memory_bytes / 2**30:.1f} GiB; ViT-*/16, "
          f"224 px, bf16, cuDNN attention; times are roofline bounds")
    header = ("model", "remat", "GiB fixed + per image", "largest batch / GPU (peak GiB)", "micro-batch",
              "accumulation: 1 GPU / 8 GPUs", "roofline images/s/GPU")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for c in cells:
        name = f"ViT-{c['size'][0].upper()}/16 {'CL-MAE' if c['experiment'] == 'clmae' else 'MAE'}"
        print(f"| {name} | {'yes' if c['remat'] else 'no'} | {c['gib_fixed']:.1f} + {c['gib_per_image']:.3f} | "
              f"{c['largest_batch']} ({c['peak_gib_at_largest']:.1f}) | {c['micro_batch']} | "
              f"{c['paper_batch']} = {c['per_gpu_batch_1_gpu']} x {c['accum_1_gpu']} / 8 x {c['per_gpu_batch_8_gpus']} x "
              f"{c['accum_8_gpus']} | <= {c['roofline_images_per_sec_at_largest']:.0f} |")


def main(argv):
    """Fills every cell not yet in --out, writing the JSON after each, and prints the table."""
    del argv
    target = gpu.gpu(FLAGS.target)
    cells = json.load(open(FLAGS.out)) if os.path.exists(FLAGS.out) else []
    for experiment in FLAGS.experiments:
        for size in FLAGS.sizes:
            for remat in (r == "true" for r in FLAGS.remat):
                if any((c["experiment"], c["size"], c["remat"]) == (experiment, size, remat) for c in cells):
                    continue
                cells.append(largest_batch(experiment, size, remat, target))
                print(json.dumps(cells[-1]), flush=True)
                os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
                with open(FLAGS.out, "w") as f:
                    json.dump(cells, f, indent=2)
    print_table(cells, target)


if __name__ == "__main__":
    app.run(main)
