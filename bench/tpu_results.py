"""Every JSON in bench/results/tpu/ from one command, and the tables docs/scaling.md shows from them.

    python -m bench.tpu_results [--only=mae_vitb_v5e-256,...] [--jobs=2]   # compile (hours on 2 cores)
    python -m bench.tpu_results --tables                                   # print the markdown tables

Each run is `bench.bench_tpu` on one config, slice and layout (RUNS), in its own process; its JSON lands in
bench/results/tpu/<name>.json. Every time in them is the TPU compiler's estimate, never a measurement.
"""
import concurrent.futures
import json
import os
import subprocess
import sys

from absl import app, flags

from bench import tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "tpu")

ZERO1, MU_BF16 = {"mesh.shard_optimizer": True}, {"optimizer.mu_dtype": "bfloat16"}
FSDP4_REMAT = {"mesh.fsdp": 4, "model.remat": True}
LARGE, HUGE14 = {"model.size": "large"}, {"model.size": "huge", "model.patch_size": 14}
CBM = {"cbm_cvt13_food101": "configs/cbm_cvt13_food101.py", "cbm_resnet18_food101": "configs/cbm_resnet18_food101.py",
       "cbm_wrn_52_2_food101": "configs/cbm_wrn_52_2_food101.py", "cbm_vit_cifar100": "configs/cbm_vit_cifar100.py"}
SLICES = ("v4-128", "v5e-256", "v5p-128", "v6e-256")


def scoped_vmem(kib: int) -> dict:
    """bench_tpu flags for a run with the compiler's scratch memory per fusion set to `kib` KiB."""
    return {"compiler_options": f"xla_tpu_scoped_vmem_limit_kib={kib}"}


# name -> (config file, slice, {config key: value}, bench_tpu flags). CBM runs the paper's batch of 64 on every chip.
RUNS = {
    **{f"mae_vitb_{s}": ("configs/mae_vitb.py", s, {}, {}) for s in SLICES},
    **{f"mae_vitb_{s}_zero1": ("configs/mae_vitb.py", s, ZERO1, {}) for s in SLICES},
    "mae_vitb_v5e-256_zero1_mu_bf16": ("configs/mae_vitb.py", "v5e-256", {**ZERO1, **MU_BF16}, {}),
    **{f"mae_vitb_v5e-256_zero1_vmem{kib // 1024}m": ("configs/mae_vitb.py", "v5e-256", ZERO1, scoped_vmem(kib))
       for kib in (32768, 98304)},
    "mae_vitb_v5e-64_zero1": ("configs/mae_vitb.py", "v5e-64", ZERO1, {}),
    "mae_vitb_v5e-256_zero1_xla_attention": ("configs/mae_vitb.py", "v5e-256", {**ZERO1, "model.attention": "xla"}, {}),
    **{f"mae_vitb_v5e-256_fsdp{n}": ("configs/mae_vitb.py", "v5e-256", {"mesh.fsdp": n}, {}) for n in (4, 16, 32)},
    "mae_vitb_v5e-256_fsdp32_vmem32m": ("configs/mae_vitb.py", "v5e-256", {"mesh.fsdp": 32}, scoped_vmem(32768)),
    "mae_vitb_v4-128_fsdp32": ("configs/mae_vitb.py", "v4-128", {"mesh.fsdp": 32}, {}),
    "mae_vitb_v4-128_remat": ("configs/mae_vitb.py", "v4-128", {"model.remat": True}, {}),
    "mae_vitl_v3-128": ("configs/mae_vitb.py", "v3-128", LARGE, {}),
    "mae_vitl_v3-128_zero1": ("configs/mae_vitb.py", "v3-128", {**LARGE, **ZERO1}, {}),
    "mae_vitl_v3-128_fsdp64": ("configs/mae_vitb.py", "v3-128", {**LARGE, "mesh.fsdp": 64}, {}),
    "mae_vitl_v4-128": ("configs/mae_vitb.py", "v4-128", LARGE, {}),
    "mae_vitl_v4-128_zero1": ("configs/mae_vitb.py", "v4-128", {**LARGE, **ZERO1}, {}),
    "mae_vith14_v5p-128_fsdp4_remat": ("configs/mae_vitb.py", "v5p-128", {**HUGE14, **FSDP4_REMAT}, {}),
    **{f"clmae_vitb_{s}": ("configs/clmae_vitb.py", s, {}, {}) for s in SLICES},
    **{f"clmae_vitb_{s}_zero1": ("configs/clmae_vitb.py", s, ZERO1, {}) for s in SLICES},
    "clmae_vitb_v5e-256_fsdp32": ("configs/clmae_vitb.py", "v5e-256", {"mesh.fsdp": 32}, {}),
    "clmae_vitl_v5p-128_fsdp4_remat": ("configs/clmae_vitb.py", "v5p-128", {**LARGE, **FSDP4_REMAT}, {}),
    "clmae_vith14_v5p-128_fsdp4_remat": ("configs/clmae_vitb.py", "v5p-128", {**HUGE14, **FSDP4_REMAT}, {}),
    **{f"{name}_{s}": (path, s, {}, {"per_chip_batch": 64}) for name, path in CBM.items() for s in SLICES},
    "cbm_resnet18_cifar100_v5e-256": ("configs/cbm_resnet18_cifar100.py", "v5e-256", {}, {"per_chip_batch": 64}),
}

flags.DEFINE_list("only", [], "Only these runs (names of RUNS).")
flags.DEFINE_integer("jobs", 1, "Runs compiled at once (each holds a few GiB and a core).")
flags.DEFINE_bool("tables", False, "Print the markdown tables of the JSONs instead of compiling.")
FLAGS = flags.FLAGS


def command(name: str) -> list:
    """The bench_tpu command line of run `name` (run in the repository's root)."""
    config, topology, overrides, options = RUNS[name]
    return ([sys.executable, "-m", "bench.bench_tpu", f"--config={config}",
             f"--topology={topology}", f"--out={os.path.join(OUT, name + '.json')}"]
            + [f"--config.{k}={v}" for k, v in overrides.items()] + [f"--{k}={v}" for k, v in options.items()])


def compile_run(name: str) -> tuple[str, int]:
    """Runs one bench_tpu.py process; its output goes to bench/results/tpu/<name>.log."""
    with open(os.path.join(OUT, name + ".log"), "w") as log:
        return name, subprocess.run(command(name), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def load(name: str) -> dict:
    """The JSON of run `name`, or {} if it was never compiled."""
    path = os.path.join(OUT, name + ".json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def layout(run: dict) -> str:
    """A table's words for a run's mesh, remat, attention and compiler options."""
    config = run["config"]
    mesh, words = config.get("mesh", {}), []
    if mesh.get("shard_optimizer"):
        words.append("ZeRO-1 (`mesh.shard_optimizer`)")
    if config["optimizer"].get("mu_dtype"):
        words.append(f"`optimizer.mu_dtype={config['optimizer']['mu_dtype']}`")
    if mesh.get("fsdp", 1) > 1:
        words.append(f"`mesh.fsdp={mesh['fsdp']}`")
    if config["model"].get("remat"):
        words.append("remat")
    if config["model"].get("attention", "einsum") != "einsum":
        words.append(f"`model.attention={config['model']['attention']}`")
    words += [f"`{key}={value}`" for key, value in run.get("compiler_options", {}).items()]
    return ", ".join(words) or "replicated"


def pod_table(names) -> str:
    """One row per run: slice, layout, images and peak HBM per chip, estimated step and collectives, MFU without and
    with the collectives, schedule."""
    lines = ["| run | slice | layout | per chip: images / peak GiB | est. ms (compiler + fallback) | collectives ms "
             "(ring model) | est. MFU | MFU with collectives | schedule h | code |", "|" + "---|" * 10]
    for name in names:
        d = load(name)
        if not d:
            continue
        if "mfu_status" not in d["run"]:  # Written before the accounting priced every instruction.
            lines.append(f"| `{name}` | {d['topology']} | stale: compiled before the current accounting, rerun |"
                         + " |" * 7)
            continue
        r, programs = d["run"], d["programs"]
        parts = " + ".join(f"{programs[p]['bounded_seconds'] * 1e3:.1f}" for p in ("mae_step", "masker_step")
                           if p in programs and "masker_step" in programs)
        lines.append(f"| `{name}` | {d['topology']} | {layout(d)} | {d['per_chip_batch']} / "
                     f"{r['peak_gib_per_chip']:.1f} of {d['chip']['hbm_gib']:.0f} | "
                     f"{r['iteration_estimated_seconds'] * 1e3:.1f}{f' ({parts})' if parts else ''} | "
                     f"{r['iteration_collective_seconds'] * 1e3:.1f} | {tpu.percent(r['mfu'])} | "
                     f"{tpu.percent(r['mfu_with_collectives'])} | {r['schedule_hours']:.1f} | "
                     f"{d.get('commit') or 'before the commit stamp'} |")
    return "\n".join(lines)


def main(argv):
    """Compiles the runs (or prints the tables)."""
    del argv
    names = FLAGS.only or list(RUNS)
    unknown = set(names) - set(RUNS)
    if unknown:
        raise app.UsageError(f"Unknown runs {sorted(unknown)}; see RUNS in {__file__}.")
    if FLAGS.tables:
        print(pod_table(names))
        return
    os.makedirs(OUT, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(FLAGS.jobs) as pool:
        for name, code in pool.map(compile_run, names):
            print(f"{name}: {'ok' if code == 0 else f'FAILED ({code}), see bench/results/tpu/{name}.log'}", flush=True)


if __name__ == "__main__":
    app.run(main)
