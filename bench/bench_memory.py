"""Per-device memory of the MAE step and the CL-MAE iteration, replicated vs FSDP, from XLA's memory analysis.

    python -m bench.bench_memory [--sizes=base,large,huge] [--per_device_batch=256] [--remat=false,true]

Compiles (never runs) each step for 8 devices (fake CPU devices unless the machine has accelerators) at the GPU
precision policy (bf16 compute, fp32 parameters and AdamW moments) and reports the peak bytes live on one device:
arguments + outputs - donated + XLA scratch. Whether it fits is judged against an 80 GB GPU. On CPU the steps are
scheduled by XLA's memory-optimised CPU scheduler: its default one orders for concurrency and keeps every
recomputed activation live at once, which hides what remat saves (a GPU compile schedules under a memory limit).
The CPU compiler fuses differently from the GPU one, so the scratch part is an estimate; parameters and optimizer
state are exact.
"""
import json
import os

# Buffer assignment happens before code generation, so unoptimised CPU code gives the same memory figures, sooner.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

from absl import app, flags  # noqa: E402

import jax  # noqa: E402

from bench import harness, jax_steps  # noqa: E402
from clmae_jax.runtime.state import tree_size  # noqa: E402
from configs import clmae_vitb, mae_vitb  # noqa: E402

flags.DEFINE_list("sizes", ["base", "large", "huge"], "ViT sizes (patch 16, 224 px).")
flags.DEFINE_list("experiments", ["mae", "clmae"], "mae and/or clmae.")
flags.DEFINE_list("layouts", ["replicated", "fsdp"], "replicated (data parallel) and/or fsdp (all devices).")
flags.DEFINE_list("remat", ["false"], "Per-block rematerialisation settings to compile (false, true).")
flags.DEFINE_integer("per_device_batch", 256, "Images per device.")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
flags.DEFINE_float("gpu_gib", 80e9 / 2 ** 30, "Device memory the 'fits' column compares with (80 GB).")
flags.DEFINE_string("out", "bench/results/memory.json", "Where the JSON goes.")
FLAGS = flags.FLAGS
EXPERIMENTS = {"mae": (mae_vitb, jax_steps.compile_mae), "clmae": (clmae_vitb, jax_steps.compile_clmae)}


def memory_row(name: str, size: str, layout: str, remat: bool) -> dict:
    """Compiled per-device memory of one experiment, size, layout and remat setting."""
    module, compile_fn = EXPERIMENTS[name]
    config = module.get_config()
    config.model.update(size=size, dtype=FLAGS.dtype, remat=remat)
    config.batch_size = FLAGS.per_device_batch * jax.device_count()
    config.mesh = {"data": -1, "fsdp": jax.device_count() if layout == "fsdp" else 1}
    if "clmae" in config:
        config.clmae.loss_group_size = FLAGS.per_device_batch
    cpu = jax.default_backend() == "cpu"
    options = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"} if cpu else None
    experiment, _, stats = compile_fn(config, compiler_options=options)
    state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(experiment.abstract_state()))
    divisor = jax.device_count() if layout == "fsdp" else 1
    params = tree_size(experiment.abstract_state().params)
    return {"experiment": name, "size": size, "layout": layout, "remat": remat, "params": params,
            "train_state_gib_per_device_approx": state_bytes / divisor / 2 ** 30,
            "peak_gib_per_device": stats["peak_bytes_per_device"] / 2 ** 30,
            "fits": stats["peak_bytes_per_device"] / 2 ** 30 <= FLAGS.gpu_gib, **stats}


def main(argv):
    """Compiles every combination, prints the table and saves the JSON."""
    del argv
    rows = []
    for size in FLAGS.sizes:
        for name in FLAGS.experiments:
            for remat in (r == "true" for r in FLAGS.remat):
                for layout in FLAGS.layouts:
                    rows.append(memory_row(name, size, layout, remat))
                    print(json.dumps(rows[-1]), flush=True)  # Partial results survive an interrupted run.
    print(f"\n{harness.device_line()}; batch {FLAGS.per_device_batch}/device, {FLAGS.dtype} compute, fp32 params "
          f"and AdamW moments; peak GiB per device from XLA's memory analysis")
    header = ("model", "remat", "params (M)", "replicated GiB/dev", "FSDP GiB/dev", "fits 80 GB (repl. / FSDP)")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    groups = {}
    for r in rows:
        groups.setdefault((r["experiment"], r["size"], r["remat"]), {})[r["layout"]] = r
    for (name, size, remat), by_layout in groups.items():
        cells = [by_layout.get(layout) for layout in ("replicated", "fsdp")]
        gib = [f"{c['peak_gib_per_device']:.1f}" if c else "" for c in cells]
        fits = " / ".join(("yes" if c["fits"] else "no") if c else "-" for c in cells)
        params = next(c for c in cells if c)["params"] / 1e6
        label = "MAE" if name == "mae" else "CL-MAE"
        print(f"| ViT-{size}/16 {label} | {'on' if remat else 'off'} | {params:.0f} | {gib[0]} | {gib[1]} | {fits} |")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"device": harness.device_line(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
