"""The one-command GPU check: the project's steps and their PyTorch peers on the GPU at hand, in one run.

    python -m bench.gpu_check [--fbmae_src=MAE_CHECKOUT] [--official_clmae=CLMAE_CHECKOUT]   # a GPU machine
    python -m bench.gpu_check --smoke                                                        # any CPU (CI)

At ViT-B/16, 224 px, bf16 compute (fp32 parameters), cuDNN attention, each a full training step on random data:
the MAE step and the CL-MAE iteration at 256 images (bench_vs_torch's GPU preset), CBM's ResNet-18 and CvT-13 steps
at the paper's batch of 64 (Food-101: 64 and 224 px), and the PyTorch peers of bench/bench_vs_torch.py (Hugging Face
ViTMAE eager and compiled, facebookresearch/mae and the official CL-MAE iteration given their checkouts). JAX and
PyTorch rows live in two worker processes that never run at once and alternate for --rounds rounds, as in
bench_vs_torch. Per row: images/s, MFU against the bf16 matmul peak measured in the same run (and the vendor peak),
peak memory, compile seconds, and for the JAX rows how many cuDNN attention calls the compiled program makes.
Needs jax, flax, optax, orbax-checkpoint, chex, numpy, torch (+ timm, transformers for the peers), ml_collections
and this checkout; TensorFlow and clu are never imported. `--smoke` shrinks everything to run on a CPU. JSON: --out.
"""
import json
import os
import statistics
import sys
import time

from absl import app, flags

from bench import bench_vs_torch, harness  # Bench_vs_torch defines the shared flags: peers, rounds, ....

flags.DEFINE_list("cbm_cases", ["resnet18:food101", "cvt13:food101"], "CBM steps (MODEL:DATASET of cbm_paper).")
FLAGS = flags.FLAGS

CBM_BATCH = 64  # The CBM paper's batch, on one GPU.


def cbm_config(case: str, smoke: bool):
    """The CBM paper config of `case` in bf16 compute, from random weights (smoke: 32 px, batch 8)."""
    from configs import cbm_paper
    model, dataset = case.split(":")
    config = cbm_paper.paper_config(model, dataset)
    config.model.update(init_from="", dtype="bfloat16")
    config.batch_size = 8 if smoke else CBM_BATCH
    if smoke:
        config.input.image_size, config.cbm.salience_size = 32, 0
    return config


def jax_rows(settings: dict):
    """(runners, info) of the JAX worker: MAE step, CL-MAE iteration and CBM steps, each compiled ahead of time
    (memory, FLOPs and the cuDNN calls of the program that runs), and the bf16 matmul peak."""
    import jax
    import jax.numpy as jnp

    from bench import flops, gpu, jax_steps
    from cbm_jax import train_supervised
    from cbm_jax.masking import num_masked_patches
    from configs import clmae_vitb, mae_vitb

    on_gpu = jax.default_backend() == "gpu"
    attention = settings["attentions"][0] if settings["attentions"] else "cudnn" if on_gpu else "einsum"
    runners, rows = {}, {}

    def add(name, experiment, compiled, stats, step, batch, analytic):
        runners[name] = harness.timed(harness.threaded(step, experiment.create_train_state()), settings["steps"])
        hlo = compiled if isinstance(compiled, str) else compiled.as_text()
        rows[name] = {**stats, "batch": batch, "analytic_flops_per_image": analytic,
                      "xla_flops_per_image": stats["xla_flops"] / batch,
                      "cudnn_attention_calls": gpu.hlo_costs(hlo)["cudnn_attention_calls"]}

    config = bench_vs_torch.preset_config(mae_vitb, settings)
    config.model.attention = attention
    experiment, compiled, stats = jax_steps.compile_mae(config)
    batch = harness.random_batch(config, experiment.mesh)
    add(f"jax_mae_{attention}", experiment, compiled, stats, jax_steps.mae_update(compiled, batch),
        config.batch_size, flops.mae_flops(config))
    config = bench_vs_torch.preset_config(clmae_vitb, settings)
    config.model.attention = attention
    experiment, programs, stats = jax_steps.compile_clmae(config)
    batch = harness.random_batch(config, experiment.mesh)
    add(f"jax_clmae_{attention}", experiment, programs[0].as_text() + programs[1].as_text(), stats,
        jax_steps.clmae_iteration(programs, batch), config.batch_size, flops.clmae_flops(config))
    for case in settings["cbm_cases"]:
        config = cbm_config(case, settings["smoke"])
        experiment = harness.build(train_supervised.Supervised, config, num_classes=101)
        batch = harness.random_batch(config, experiment.mesh, labels=101)
        # The step at the schedule's largest mask count: salience, sampling and masking all run.
        masked = max(num_masked_patches(r, config.cbm.grid ** 2)
                     for r in train_supervised.masking_ratios(config, config.num_epochs))
        compiled, stats = harness.compile_stats(experiment.step_fn, experiment.abstract_state(), batch, masked)
        add(f"jax_cbm_{case.split(':')[0]}", experiment, compiled, stats,
            lambda state, compiled=compiled, batch=batch: compiled(state, batch)[0], config.batch_size, 0.0)
    peak = harness.matmul_peak(jnp.bfloat16, n=8192 if on_gpu else 1024)
    vendor = next((v for k, v in bench_vs_torch.VENDOR_BF16_PEAK.items() if k in jax.devices()[0].device_kind), None)
    loaded = sorted(name for name in ("tensorflow", "tensorflow_datasets", "clu") if name in sys.modules)
    memory = jax.devices()[0].memory_stats() or {}
    return runners, {"rows": rows, "device": harness.device_line(), "matmul_peak_flops": peak, "jax": jax.__version__,
                     "vendor_peak_flops": vendor, "jax_worker_loaded": loaded,
                     "device_peak_bytes_in_use": memory.get("peak_bytes_in_use")}


def summarise(rows: dict, timings: dict, peak: float, vendor) -> dict:
    """Per row: images/s, the FLOPs it counts (analytic for the ViT steps, else XLA's), MFU against the measured
    and the vendor peak, and each JAX row's speed over every peer of its kind."""
    result = {}
    for name, row in rows.items():
        seconds = timings[name]["median_seconds"]
        per_image = row["analytic_flops_per_image"] or row.get("xla_flops_per_image", 0.0)
        achieved = per_image * row["batch"] / seconds
        result[name] = {**row, **timings[name], "images_per_sec": row["batch"] / seconds, "achieved_flops": achieved,
                        "mfu_measured_peak": achieved / peak, "mfu_vendor_peak": achieved / vendor if vendor else None}
    for name, r in result.items():
        kind = r.get("compares_to")
        if name.startswith("jax_") and kind:
            r["speedup_over"] = {p: statistics.median(a / b for a, b in zip(q["all_seconds"], r["all_seconds"]))
                                 for p, q in result.items() if not p.startswith("jax_") and q["compares_to"] == kind}
    return result


def print_table(result: dict, info: dict, failures: dict, wall: float):
    """The table docs/gpu.md shows."""
    print(f"\n{info['device']}, jax {info['jax']}; bf16 matmul peak measured {info['matmul_peak_flops'] / 1e12:.1f} "
          f"TFLOP/s; median of {FLAGS.rounds} alternating rounds of {FLAGS.steps} steps; {wall:.0f} s in all")
    header = ("row", "batch", "images/s", "x HF", "MFU (measured peak)", "MFU (vendor peak)", "peak MiB",
              "cuDNN attention calls", "compile s")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, r in result.items():
        memory = r.get("peak_bytes_per_device")
        vendor = f"{100 * r['mfu_vendor_peak']:.0f}%" if r["mfu_vendor_peak"] else "-"
        print(f"| {name} | {r['batch']} | {r['images_per_sec']:.1f} | "
              f"{r.get('speedup_over', {}).get('hf', float('nan')):.2f} | {100 * r['mfu_measured_peak']:.0f}% | "
              f"{vendor} | {memory / 2**20 if memory else float('nan'):.0f} | {r.get('cudnn_attention_calls', '-')} | "
              f"{r.get('compile_seconds', float('nan')):.0f} |")
    for name, reason in failures.items():
        print(f"not run: {name}: {reason}")
    if info["jax_worker_loaded"]:
        print(f"WARNING: the JAX rows loaded {', '.join(info['jax_worker_loaded'])}")


def main(argv):
    """Starts both workers, warms every row up, times them in alternating rounds, prints and writes the result."""
    del argv
    start = time.perf_counter()
    if FLAGS.smoke:  # Both workers inherit it: no accelerator plugin (libtpu, CUDA) looks for its device.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sources = {"fbmae_src": FLAGS.fbmae_src, "official_clmae": FLAGS.official_clmae}
    settings = {"preset": "gpu", "smoke": FLAGS.smoke, "attentions": FLAGS.attentions, "steps": FLAGS.steps,
                "peers": FLAGS.peers or bench_vs_torch.default_peers(sources), "sources": sources,
                "cbm_cases": FLAGS.cbm_cases}
    jax_worker = harness.RowWorker(jax_rows, settings)
    torch_worker = harness.RowWorker(bench_vs_torch.torch_rows, settings)
    info, failures = jax_worker.info, torch_worker.info["failures"]
    for name, row in info["rows"].items():
        row["compares_to"] = "mae" if "_mae_" in name else "clmae" if "_clmae_" in name else None
    from configs import mae_vitb
    for row in torch_worker.info["rows"].values():  # Every peer runs the MAE / CL-MAE preset's batch.
        row["batch"] = bench_vs_torch.preset_config(mae_vitb, settings).batch_size
    rows = {**info["rows"], **torch_worker.info["rows"]}
    runners = {name: (jax_worker if name in info["rows"] else torch_worker).runner(name) for name in rows}
    harness.alternate(runners, 1)  # Warm-up round: first executions, allocator growth.
    timings = harness.alternate(runners, FLAGS.rounds)
    jax_worker.close()
    torch_worker.close()
    result = summarise(rows, timings, info["matmul_peak_flops"], info["vendor_peak_flops"])
    wall = time.perf_counter() - start
    print_table(result, info, failures, wall)
    out = FLAGS.out or f"bench/results/gpu_check{'_smoke' if FLAGS.smoke else ''}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({**{k: v for k, v in info.items() if k != "rows"}, "smoke": FLAGS.smoke, "wall_seconds": wall,
                   "rows": result, "not_run": failures}, f, indent=2, default=float)


if __name__ == "__main__":
    app.run(main)
