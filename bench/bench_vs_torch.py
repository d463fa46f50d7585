"""The project's MAE step and CL-MAE iteration against PyTorch peers, side by side in one run.

    python -m bench.bench_vs_torch --preset=cpu            # ViT-B/16, batch 8, float32 (CPU target: >= 1.3x HF)
    python -m bench.bench_vs_torch --preset=gpu            # ViT-B/16, batch 256, bf16 compute (GPU targets)
    python -m bench.bench_vs_torch --preset=gpu --smoke    # the GPU configuration at a tiny size, runs on CPU
    --fbmae_src=PATH        adds facebookresearch/mae's own model (timm Blocks; eager and torch.compile)
    --official_clmae=PATH   adds the official CL-MAE iteration of a ristea/cl-mae checkout, as is and with its
                            diversity loss's Python double loop vectorised

Same model (each peer is built to the config's sizes), batch, mask ratio and precision policy (fp32, or bf16
compute with fp32 parameters: torch autocast), full step (forward, backward, AdamW). The JAX rows and the PyTorch
rows live in two worker processes that never run at once (each framework's idle threads would slow the other), so
every row is timed in the same run: all rows are warmed up, then run in turn for --rounds rounds (each row's turn
starts with one untimed step), and the median is kept; a ratio to a peer is the median of the per-round ratios.
Per row: images/s, the ratio to each peer, model FLOPs per image (analytic, and XLA's cost analysis), achieved
FLOP/s as a fraction of a matmul peak measured in the same run (and of the vendor bf16 peak on known GPUs), peak
memory per device, compile time. JSON goes to --out.
"""
import json
import os
import statistics
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # Leave GPU memory for the torch worker.

from absl import app, flags  # noqa: E402

from bench import harness  # noqa: E402

flags.DEFINE_enum("preset", "cpu", ["cpu", "gpu"], "cpu: batch 8, float32; gpu: batch 256, bfloat16 compute.")
flags.DEFINE_bool("smoke", False, "Shrink the preset to a tiny ViT at 64 px, batch 8 (checks the harness on CPU).")
flags.DEFINE_list("attentions", [], "JAX attention implementations to time (default: einsum,xla on CPU, "
                  "cudnn,xla on GPU).")
flags.DEFINE_list("peers", [], "PyTorch peers to time (default: every one whose checkout is given): hf, hf_compile, "
                  "fbmae, fbmae_compile, official_clmae, official_clmae_vec.")
flags.DEFINE_string("fbmae_src", "", "A checkout of github.com/facebookresearch/mae.")
flags.DEFINE_string("official_clmae", "", "A checkout of github.com/ristea/cl-mae.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds after one warm-up round.")
flags.DEFINE_integer("steps", 2, "Steps per round and row.")
flags.DEFINE_string("out", "", "JSON path (default bench/results/vs_torch_PRESET[_smoke].json).")
FLAGS = flags.FLAGS

# Dense bf16 peaks from the vendors' data sheets (SXM parts), for the "fraction of vendor peak" column.
VENDOR_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def preset_config(module, settings: dict):
    """`module`'s ImageNet config at the preset's size, batch and precision."""
    gpu, smoke = settings["preset"] == "gpu", settings["smoke"]
    model = dict(size="mini", decoder_width=64, decoder_depth=2, decoder_heads=4) if smoke else {}
    config = harness.step_config(module, 256 if gpu and not smoke else 8, "bfloat16" if gpu else "float32", **model)
    if smoke:
        config.input.image_size = 64
    return config


def jax_rows(settings: dict):
    """(runners, info) of the JAX worker: the MAE step per attention implementation, the CL-MAE iteration with
    the first one, and the matmul peak of this device."""
    import jax
    import jax.numpy as jnp

    from bench import flops, jax_steps
    from configs import clmae_vitb, mae_vitb

    attentions = settings["attentions"] or (["cudnn", "xla"] if jax.default_backend() == "gpu" else ["einsum", "xla"])
    runners, rows = {}, {}

    def add(name, config, built, analytic_flops, compares_to):
        runners[name] = jax_steps.runner(built, settings["steps"])
        rows[name] = {**built[2], "analytic_flops_per_image": analytic_flops, "compares_to": compares_to,
                      "xla_flops_per_image": built[2]["xla_flops"] * jax.device_count() / config.batch_size}

    for attention in attentions:
        config = preset_config(mae_vitb, settings)
        config.model.attention = attention
        add(f"jax_mae_{attention}", config, jax_steps.mae(config), flops.mae_flops(config), "mae")
    config = preset_config(clmae_vitb, settings)
    config.model.attention = attentions[0]
    add(f"jax_clmae_{attentions[0]}", config, jax_steps.clmae(config), flops.clmae_flops(config), "clmae")
    vendor = next((v for k, v in VENDOR_BF16_PEAK.items() if k in jax.devices()[0].device_kind), None)
    peak = harness.matmul_peak(jnp.dtype(preset_config(mae_vitb, settings).model.dtype))
    # GPU machines may lack TensorFlow: neither it, tfds nor clu (both import it) may load with the timed code.
    loaded = sorted(name for name in ("tensorflow", "tensorflow_datasets", "clu") if name in sys.modules)
    return runners, {"rows": rows, "device": harness.device_line(), "vendor_peak_flops": vendor,
                     "matmul_peak_flops": peak, "jax_worker_loaded": loaded}


def torch_rows(settings: dict):
    """(runners, info) of the PyTorch worker: every peer that builds and takes a first step here; the others are
    reported with the reason."""
    from bench import flops, torch_peers  # torch_peers first: torchvision before anything imports TensorFlow.
    from configs import clmae_vitb, mae_vitb

    runners, rows, failures = {}, {}, {}
    for name in settings["peers"]:
        kind = "clmae" if name in torch_peers.CLMAE_PEERS else "mae"
        config = preset_config(clmae_vitb if kind == "clmae" else mae_vitb, settings)
        checkout = torch_peers.CHECKOUTS.get(name)
        if checkout and not settings["sources"][checkout]:
            failures[name] = f"needs a checkout: --{checkout}=PATH"
            continue
        try:
            step = {**torch_peers.MAE_PEERS, **torch_peers.CLMAE_PEERS}[name](config, settings["sources"])
            step()  # torch.compile compiles here, outside the timings.
        except Exception as e:  # A peer that does not run here (no compiler, no GPU kernel) is reported, not fatal.
            failures[name] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        runners[name] = harness.timed(step, settings["steps"])
        rows[name] = {"analytic_flops_per_image": (flops.clmae_flops if kind == "clmae" else flops.mae_flops)(config),
                      "peak_bytes_per_device": torch_peers.peak_memory_bytes(), "compares_to": kind}
    return runners, {"rows": rows, "failures": failures}


def default_peers(sources: dict) -> list:
    """Both Hugging Face rows, and the peers of every checkout given."""
    peers = ["hf", "hf_compile"]
    if sources["fbmae_src"]:
        peers += ["fbmae", "fbmae_compile"]
    if sources["official_clmae"]:
        peers += ["official_clmae", "official_clmae_vec"]
    return peers


def summarise(rows: dict, timings: dict, batch: int, peak: float, vendor: float | None) -> dict:
    """Per-row images/s, achieved FLOP/s and fractions of peak, and every JAX row's speed ratio to every peer of
    its kind (MAE step or CL-MAE iteration)."""
    result = {}
    for name, row in rows.items():
        seconds = timings[name]["median_seconds"]
        achieved = row["analytic_flops_per_image"] * batch / seconds
        result[name] = {**row, **timings[name], "images_per_sec": batch / seconds, "achieved_flops": achieved,
                        "fraction_of_measured_peak": achieved / peak,
                        "fraction_of_vendor_peak": achieved / vendor if vendor else None}
    for name, r in result.items():
        if name.startswith("jax_"):  # Ratios within each round, then their median: drift between rounds cancels.
            r["speedup_over"] = {p: statistics.median(a / b for a, b in zip(result[p]["all_seconds"], r["all_seconds"]))
                                 for p in result
                                 if not p.startswith("jax_") and result[p]["compares_to"] == r["compares_to"]}
    return result


def print_table(result: dict, config, info: dict, failures: dict):
    """The README table."""
    print(f"\n{info['device']}; preset {FLAGS.preset}{' (smoke)' if FLAGS.smoke else ''}: ViT-{config.model.size}"
          f"/{config.model.patch_size}, {config.input.image_size} px, batch {config.batch_size}, {config.model.dtype}"
          f" compute; matmul peak {info['matmul_peak_flops'] / 1e12:.3f} TFLOP/s; median of {FLAGS.rounds} "
          f"alternating rounds of {FLAGS.steps} steps")
    peers = [n for n in result if not n.startswith("jax_")]
    header = ("row", "img/s", *[f"x {p}" for p in peers], "GFLOP/img", "% matmul peak", "peak MiB/dev", "compile s")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, r in result.items():
        ratios = [f"{r['speedup_over'][p]:.2f}x" if p in r.get("speedup_over", {}) else "" for p in peers]
        memory = r.get("peak_bytes_per_device")
        print(f"| {name} | {r['images_per_sec']:.2f} | " + " | ".join(ratios) + (" | " if ratios else "")
              + f"{r['analytic_flops_per_image'] / 1e9:.3g} | {100 * r['fraction_of_measured_peak']:.0f}% | "
              f"{memory / 2 ** 20 if memory else float('nan'):.0f} | {r.get('compile_seconds', float('nan')):.1f} |")
    for name, reason in failures.items():
        print(f"not run: {name}: {reason}")


def main(argv):
    """Starts both workers, warms every row up, times all rows in alternating rounds, prints and saves the table."""
    del argv
    sources = {"fbmae_src": FLAGS.fbmae_src, "official_clmae": FLAGS.official_clmae}
    settings = {"preset": FLAGS.preset, "smoke": FLAGS.smoke, "attentions": FLAGS.attentions, "steps": FLAGS.steps,
                "peers": FLAGS.peers or default_peers(sources), "sources": sources}
    jax_worker = harness.RowWorker(jax_rows, settings)
    torch_worker = harness.RowWorker(torch_rows, settings)
    info, failures = jax_worker.info, torch_worker.info["failures"]
    rows = {**info["rows"], **torch_worker.info["rows"]}
    runners = {name: (jax_worker if name in info["rows"] else torch_worker).runner(name) for name in rows}
    harness.alternate(runners, 1)  # Warm-up round: first executions, allocator growth.
    timings = harness.alternate(runners, FLAGS.rounds)
    jax_worker.close()
    torch_worker.close()
    from configs import mae_vitb
    config = preset_config(mae_vitb, settings)
    result = summarise(rows, timings, config.batch_size, info["matmul_peak_flops"], info["vendor_peak_flops"])
    print_table(result, config, info, failures)
    if info["jax_worker_loaded"]:
        print(f"note: the JAX rows loaded {', '.join(info['jax_worker_loaded'])}; a machine without it cannot run them")
    mae_row, clmae_row = (next(n for n in result if n.startswith(f"jax_{kind}_")) for kind in ("mae", "clmae"))
    time_ratio = result[clmae_row]["median_seconds"] / result[mae_row]["median_seconds"]
    flop_ratio = result[clmae_row]["analytic_flops_per_image"] / result[mae_row]["analytic_flops_per_image"]
    print(f"CL-MAE iteration / MAE step: {time_ratio:.2f}x the time for {flop_ratio:.2f}x the FLOPs "
          f"({time_ratio / flop_ratio:.2f} of the FLOP ratio; target <= 1.1)")
    spread = {n: max(r["all_seconds"]) / min(r["all_seconds"]) for n, r in result.items()}
    print("spread of the rounds (slowest / fastest): " + ", ".join(f"{n} {s:.2f}" for n, s in spread.items()))
    out = FLAGS.out or f"bench/results/vs_torch_{FLAGS.preset}{'_smoke' if FLAGS.smoke else ''}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": info["device"], "preset": FLAGS.preset, "smoke": FLAGS.smoke,
                   "matmul_peak_flops": info["matmul_peak_flops"], "rows": result, "not_run": failures,
                   "jax_worker_loaded": info["jax_worker_loaded"],
                   "clmae_over_mae_time": time_ratio, "clmae_over_mae_flops": flop_ratio,
                   "median_spread": statistics.median(spread.values())}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
