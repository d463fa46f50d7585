"""The project's MAE step and CL-MAE iteration against PyTorch peers, side by side in one process.

    python bench/bench_vs_torch.py --preset=cpu            # ViT-B/16, batch 8, float32 (CPU target: >= 1.3x HF)
    python bench/bench_vs_torch.py --preset=gpu            # ViT-B/16, batch 256, bf16 compute (GPU targets)
    python bench/bench_vs_torch.py --preset=gpu --smoke    # the GPU configuration at a tiny size, runs on CPU
    --fbmae_src=PATH adds facebookresearch/mae's own model (timm Blocks; eager and torch.compile) from a checkout

Same model (the peer is built to the config's sizes), batch, mask ratio and precision policy (fp32, or bf16
compute with fp32 parameters: torch autocast), full step (forward, backward, AdamW). Every row is warmed up, then
all rows run in turn for --rounds rounds and the median is kept. Per row: images/s, the ratio to each peer, model
FLOPs per image (analytic and XLA's cost analysis), achieved FLOP/s as a fraction of a matmul peak measured in the
same run (and of the vendor bf16 peak on known GPUs), peak memory per device, compile time. JSON goes to --out.
"""
import dataclasses
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # Leave GPU memory for the torch peers.

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import torch_peers  # noqa: E402, I100 (before TensorFlow: see torch_peers)
from bench import flops, harness, jax_steps  # noqa: E402
from configs import clmae_vitb, mae_vitb  # noqa: E402

flags.DEFINE_enum("preset", "cpu", ["cpu", "gpu"], "cpu: batch 8, float32; gpu: batch 256, bfloat16 compute.")
flags.DEFINE_bool("smoke", False, "Shrink the preset to a tiny ViT at 64 px, batch 8 (checks the harness on CPU).")
flags.DEFINE_list("attentions", [], "JAX attention implementations to time (default: einsum,xla on CPU, "
                  "cudnn,xla on GPU).")
flags.DEFINE_list("peers", ["hf", "hf_compile"], f"PyTorch peers among {sorted(torch_peers.BUILDERS)}.")
flags.DEFINE_string("fbmae_src", "", "A checkout of github.com/facebookresearch/mae: adds its MaskedAutoencoderViT "
                    "(eager and torch.compile) as peers 'fbmae', 'fbmae_compile'.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds after one warm-up round.")
flags.DEFINE_integer("steps", 2, "Steps per round and row.")
flags.DEFINE_string("out", "", "JSON path (default bench/results/vs_torch_PRESET[_smoke].json).")
FLAGS = flags.FLAGS

# Dense bf16 peaks from the vendors' data sheets (SXM parts), for the "fraction of vendor peak" column.
VENDOR_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclasses.dataclass
class Row:
    """One timed program: a JAX experiment step or a PyTorch peer."""

    name: str
    runner: object
    flops_per_image: float = 0.0
    stats: dict = dataclasses.field(default_factory=dict)


def preset_config(module):
    """`module`'s ImageNet config at the preset's size, batch and precision."""
    config = module.get_config()
    config.batch_size = 256 if FLAGS.preset == "gpu" else 8
    config.model.dtype = "bfloat16" if FLAGS.preset == "gpu" else "float32"
    config.optimizer.schedule, config.optimizer.lr = "constant", 1e-4
    if FLAGS.smoke:
        config.batch_size, config.input.image_size, config.model.size = 8, 64, "mini"
        config.model.update(decoder_width=64, decoder_depth=2, decoder_heads=4)
    if "clmae" in config:
        config.clmae.loss_group_size = config.batch_size
    return config


def attentions() -> list:
    """The attention implementations to time: cuDNN's fused kernel exists on GPU only."""
    if FLAGS.attentions:
        return FLAGS.attentions
    return ["cudnn", "xla"] if jax.default_backend() == "gpu" else ["einsum", "xla"]


def jax_rows(steps: int) -> list:
    """The MAE step per attention implementation, and the CL-MAE iteration with the first one."""
    rows = []
    for attention in attentions():
        config = preset_config(mae_vitb)
        config.model.attention = attention
        built = jax_steps.mae(config)
        rows.append(Row(f"jax_mae_{attention}", jax_steps.runner(built, steps), flops.mae_flops(config),
                        {**built[2], "xla_flops_per_image": built[2]["xla_flops"] * jax.device_count()
                         / config.batch_size}))
    config = preset_config(clmae_vitb)
    config.model.attention = attentions()[0]
    built = jax_steps.clmae(config)
    rows.append(Row(f"jax_clmae_{attentions()[0]}", jax_steps.runner(built, steps), flops.clmae_flops(config),
                    {**built[2], "xla_flops_per_image": built[2]["xla_flops"] * jax.device_count() / config.batch_size}))
    return rows


def peer_rows(steps: int, failures: dict) -> list:
    """The PyTorch peers that build and take a first step here; the others go to `failures` with the reason."""
    rows, config = [], preset_config(mae_vitb)
    builders = {name: torch_peers.BUILDERS[name] for name in FLAGS.peers}
    if FLAGS.fbmae_src:
        builders["fbmae"] = lambda c: torch_peers.fbmae_mae(c, FLAGS.fbmae_src)
        builders["fbmae_compile"] = lambda c: torch_peers.fbmae_mae(c, FLAGS.fbmae_src, compile_model=True)
    for name, build in builders.items():
        try:
            step = build(config)
            step()  # torch.compile compiles here, outside the timings.
        except Exception as e:  # A peer that does not run here (no compiler, no GPU kernel) is reported, not fatal.
            failures[name] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        rows.append(Row(name, harness.timed(step, steps), flops.mae_flops(config),
                        {"peak_bytes_per_device": torch_peers.peak_memory_bytes()}))
    return rows


def summarise(rows: list, timings: dict, batch: int, peak: float) -> dict:
    """Per-row images/s, achieved FLOP/s and fractions of peak, and every JAX row's speed ratio to every peer."""
    vendor = next((v for k, v in VENDOR_BF16_PEAK.items() if k in jax.devices()[0].device_kind), None)
    result = {}
    for row in rows:
        seconds = timings[row.name]["median_seconds"]
        achieved = row.flops_per_image * batch / seconds
        result[row.name] = {**row.stats, **timings[row.name], "images_per_sec": batch / seconds,
                            "analytic_flops_per_image": row.flops_per_image, "achieved_flops": achieved,
                            "fraction_of_measured_peak": achieved / peak,
                            "fraction_of_vendor_peak": achieved / vendor if vendor else None}
    peers = [r.name for r in rows if not r.name.startswith("jax_")]
    for name, r in result.items():
        if name.startswith("jax_mae"):
            r["speedup_over"] = {p: result[p]["median_seconds"] / r["median_seconds"] for p in peers}
    return result


def print_table(result: dict, config, peak: float, failures: dict):
    """The README table."""
    print(f"\n{harness.device_line()}; preset {FLAGS.preset}{' (smoke)' if FLAGS.smoke else ''}: ViT-{config.model.size}"
          f"/{config.model.patch_size}, {config.input.image_size} px, batch {config.batch_size}, {config.model.dtype}"
          f" compute; matmul peak {peak / 1e12:.3f} TFLOP/s; median of {FLAGS.rounds} alternating rounds of "
          f"{FLAGS.steps} steps")
    peers = [n for n in result if not n.startswith("jax_")]
    header = ("row", "img/s", *[f"x {p}" for p in peers], "GFLOP/img", "% matmul peak", "peak MiB/dev", "compile s")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, r in result.items():
        ratios = [f"{r['speedup_over'][p]:.2f}x" if "speedup_over" in r else "" for p in peers]
        memory = r.get("peak_bytes_per_device")
        print(f"| {name} | {r['images_per_sec']:.2f} | " + " | ".join(ratios) + (" | " if ratios else "")
              + f"{r['analytic_flops_per_image'] / 1e9:.3g} | {100 * r['fraction_of_measured_peak']:.0f}% | "
              f"{memory / 2 ** 20 if memory else float('nan'):.0f} | {r.get('compile_seconds', float('nan')):.1f} |")
    for name, reason in failures.items():
        print(f"not run: {name}: {reason}")


def main(argv):
    """Builds every row, warms it up, times all rows in alternating rounds, prints and saves the table."""
    del argv
    config = preset_config(mae_vitb)
    peak = harness.matmul_peak(jnp.dtype(config.model.dtype))
    failures = {}
    rows = jax_rows(FLAGS.steps) + peer_rows(FLAGS.steps, failures)
    runners = {row.name: row.runner for row in rows}
    harness.alternate(runners, 1)  # Warm-up round: first executions, allocator growth.
    result = summarise(rows, harness.alternate(runners, FLAGS.rounds), config.batch_size, peak)
    mae_row, clmae_row = f"jax_mae_{attentions()[0]}", f"jax_clmae_{attentions()[0]}"
    time_ratio = result[clmae_row]["median_seconds"] / result[mae_row]["median_seconds"]
    flop_ratio = result[clmae_row]["analytic_flops_per_image"] / result[mae_row]["analytic_flops_per_image"]
    print_table(result, config, peak, failures)
    print(f"CL-MAE iteration / MAE step: {time_ratio:.2f}x the time for {flop_ratio:.2f}x the FLOPs "
          f"({time_ratio / flop_ratio:.2f} of the FLOP ratio; target <= 1.1)")
    out = FLAGS.out or f"bench/results/vs_torch_{FLAGS.preset}{'_smoke' if FLAGS.smoke else ''}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": harness.device_line(), "preset": FLAGS.preset, "smoke": FLAGS.smoke,
                   "matmul_peak_flops": peak, "rows": result, "not_run": failures,
                   "clmae_over_mae_time": time_ratio, "clmae_over_mae_flops": flop_ratio}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
