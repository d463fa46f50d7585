"""Compiles every program of an experiment for NVIDIA GPUs that are not attached, and bounds what it costs.

    python -m bench.bench_gpu --target=h100 --gpus=8 --config=configs/clmae_vitb.py [--per_gpu_batch=N]
        [--config.model.attention=cudnn --config.model.remat=True --config.grad_accum_steps=2 ...]

Needs the CUDA plugin (`pip install -r requirements-gpu.txt`); no GPU. The experiment is built by its own class (the
one main.py trains with, through bench_tpu.build) on a Mesh over `--gpus` GPUs of one host, and each program a run
executes is compiled, never run (see bench_tpu.programs). Per program and GPU: peak memory against the GPU's, the
FLOPs and bytes counted in the optimised HLO, the roofline bound max(FLOPs / bf16 peak, bytes / bandwidth), the
collectives, and how many cuDNN fused-attention calls the program makes. Every time is a roofline bound, never a
measurement. JSON goes to --out.
"""
import json
import os

from absl import app, flags
from ml_collections import config_flags

from bench import gpu  # Sets JAX_PLATFORMS=cpu before jax is imported.

from bench import bench_tpu
from clmae_jax.runtime import mesh as mesh_lib

FLAGS = flags.FLAGS


def compile_all(config, target: gpu.Gpu, gpus: int, only=(), num_classes: int = 0) -> dict:
    """{program: per-GPU figures} of every program of `config` compiled for `gpus` GPUs of `target` (`only`: just
    those programs; `num_classes` as bench_tpu.build)."""
    devices = gpu.topology_devices(target, gpus)
    with gpu.targeting(mesh_lib.make_mesh(config.get("mesh"), devices)):
        experiment = bench_tpu.build(config, devices, num_classes)
        rows = {}
        for name, (jitted, args) in bench_tpu.programs(experiment, config).items():
            if not only or name in only:
                rows[name] = gpu.compile_program(jitted, *args, target=target)[1]
    return rows


def summarise(config, target: gpu.Gpu, per_gpu_batch: int, rows: dict, gpus: int) -> dict:
    """One training iteration's figures: its programs' roofline bounds added up, images/s per GPU at that bound
    (every accumulation step's images), MFU at that bound (an upper bound), the peak memory."""
    training = [rows[name] for name in bench_tpu.TRAINING if name in rows]
    seconds = sum(r["roofline_seconds"] for r in training)
    accum = config.get("grad_accum_steps", 1)
    model_flops = bench_tpu.analytic_flops(config) * per_gpu_batch * accum
    hlo_flops = sum(r["hlo_flops_per_gpu"] for r in training)
    peak = max(r["peak_gib_per_gpu"] for r in training)
    return {"iteration_roofline_seconds": seconds, "images_per_sec_per_gpu_bound": per_gpu_batch * accum / seconds,
            "mfu_bound": (model_flops or hlo_flops) / seconds / target.bf16_flops,
            "analytic_flops_per_gpu": model_flops, "hlo_flops_per_gpu": hlo_flops, "peak_gib_per_gpu": peak,
            "fits": all(r["fits"] for r in training), "gpus": gpus, "per_gpu_batch": per_gpu_batch,
            "grad_accum_steps": accum}


def print_table(target: gpu.Gpu, run: dict, rows: dict):
    """One line per program and the iteration's summary."""
    limit = gpu.MEMORY_FRACTION * target.memory_bytes / 2**30
    print(f"\n{run['gpus']} x {target.name} ({target.bf16_flops / 1e12:.0f} bf16 TFLOP/s, "
          f"{target.bandwidth / 1e12:.2f} TB/s, fits = peak <= {limit:.1f} GiB); every time is a roofline bound")
    header = ("program", "peak GiB/GPU", "HLO TFLOP/GPU", "HLO GB/GPU", "roofline ms (compute / memory)",
              "cuDNN attention calls", "collectives (count, MiB)", "compile s")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, r in rows.items():
        coll = ", ".join(f"{k} {v['count']} / {v['bytes'] / 2**20:.0f}" for k, v in r["collectives"].items()
                         if v["count"])
        print(f"| {name} | {r['peak_gib_per_gpu']:.2f} | {r['hlo_flops_per_gpu'] / 1e12:.3f} | "
              f"{r['hlo_bytes_per_gpu'] / 1e9:.1f} | {r['roofline_seconds'] * 1e3:.1f} "
              f"({r['roofline_compute_seconds'] * 1e3:.1f} / {r['roofline_memory_seconds'] * 1e3:.1f}) | "
              f"{r['cudnn_attention_calls']} | {coll or '-'} | {r['compile_seconds']:.0f} |")
    print(f"iteration: >= {run['iteration_roofline_seconds'] * 1e3:.1f} ms (roofline bound), <= "
          f"{run['images_per_sec_per_gpu_bound']:.0f} images/s/GPU, MFU <= {100 * run['mfu_bound']:.1f}%, "
          f"{run['per_gpu_batch']} images/GPU x {run['grad_accum_steps']} accumulation steps, peak "
          f"{run['peak_gib_per_gpu']:.2f} GiB/GPU ({'fits' if run['fits'] else 'does NOT fit'})")


def define_flags():
    """The command line (defined only when run as a script)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config (configs/NAME.py[:variant]).",
                                    lock_config=False)
    flags.DEFINE_enum("target", "h100", list(gpu.GPUS), "GPU model (a description in bench/targets/).")
    flags.DEFINE_integer("gpus", 1, "GPUs of the one host.")
    flags.DEFINE_integer("per_gpu_batch", 0, "Images per GPU and accumulation step (0: the config's global batch "
                         "spread over the GPUs and config.grad_accum_steps).")
    flags.DEFINE_string("attention", "", "config.model.attention of a ViT model, set even where the config has no "
                        "such field (CBM's ViT).")
    flags.DEFINE_list("programs", [], "Only these programs (default: every program of the experiment).")
    flags.DEFINE_integer("num_classes", 0, "Classes of the data set (0: from bench_tpu.NUM_CLASSES).")
    flags.DEFINE_string("out", "", "JSON path (default bench/results/gpu/<target>x<gpus>_<config>.json).")
    flags.mark_flags_as_required(["config"])


def main(argv):
    """Compiles the config's programs for the GPUs, prints the table and writes the JSON."""
    del argv
    config, target = FLAGS.config, gpu.gpu(FLAGS.target)
    if FLAGS.attention:
        config.model.attention = FLAGS.attention
    accum = config.get("grad_accum_steps", 1)
    if FLAGS.per_gpu_batch:
        config.batch_size = FLAGS.per_gpu_batch * FLAGS.gpus * accum
    per_gpu_batch = config.batch_size // FLAGS.gpus // accum
    rows = compile_all(config, target, FLAGS.gpus, FLAGS.programs, FLAGS.num_classes)
    for name, r in rows.items():
        print(name, json.dumps({k: v for k, v in r.items() if k != "collectives"}), flush=True)
    run = summarise(config, target, per_gpu_batch, rows, FLAGS.gpus)
    print_table(target, run, rows)
    name = os.path.basename(config_flags.get_config_filename(FLAGS["config"])).removesuffix(".py")
    out = FLAGS.out or f"bench/results/gpu/{FLAGS.target}x{FLAGS.gpus}_{name}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"target": FLAGS.target, "gpus": FLAGS.gpus, "config": config.to_dict(), "run": run,
                   "programs": rows}, f, indent=2, default=str)


if __name__ == "__main__":
    define_flags()
    app.run(main)
