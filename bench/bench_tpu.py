"""Compiles every program of an experiment for a TPU pod slice that is not attached, and estimates what it costs.

    python -m bench.bench_tpu --topology=v5e-256 --config=configs/clmae_vitb.py [--per_chip_batch=N]
        [--config.model.size=large --config.model.remat=True --config.mesh.fsdp=4 ...]

Needs libtpu (`pip install -r requirements-tpu.txt`); no TPU. The experiment is built by its own class (the one
main.py trains with) on a Mesh over the topology's devices; each program a run executes is compiled, never run:
MAE step; CL-MAE's MAE and masking-module steps; the supervised (CBM / fine-tuning) step and its evaluation step;
for pretraining configs also kNN feature extraction and the linear probe's step (frozen encoder on images). Per
program: per-chip peak memory against the chip's HBM, XLA FLOPs, the compiler's time estimates (see bench/tpu.py:
the cycle sum is the one used, `optimal_seconds` is shown beside it), images/s per chip and MFU against the chip's
bf16 peak from that estimate, compile seconds, and the collectives in the optimised HLO. Every time is the
compiler's estimate, never a measurement. JSON goes to --out (one file per topology and config).
"""
import ast
import json
import os

from absl import app, flags
from ml_collections import config_flags

from bench import tpu  # Sets JAX_PLATFORMS=cpu before jax is imported.

import jax
import jax.numpy as jnp

from bench import flops, harness
from clmae_jax import train_clmae, train_mae
from clmae_jax.evaluate import linear
from clmae_jax.evaluate.encoder import config_encoder, encoder_params
from clmae_jax.models.vit import vit_size
from clmae_jax.runtime import loop, mesh as mesh_lib, state as state_lib

FLAGS = flags.FLAGS

# Training examples of the data sets the paper configs name: the step count of a paper schedule.
TRAIN_EXAMPLES = {"imagenet2012": 1_281_167, "cifar10": 50_000, "cifar100": 50_000, "food101": 75_750,
                  "tiny_imagenet": 100_000, "fashion_mnist": 60_000}
NUM_CLASSES = {"imagenet2012": 1000, "cifar10": 10, "cifar100": 100, "food101": 101, "tiny_imagenet": 200,
               "fashion_mnist": 10, "sport_balls": 15, "sea_animals": 23, "ahe": 10}


def dataset_name(config) -> str:
    """The DATASETS key of config.input (image folders are named by their config file's data set)."""
    return config.input.get("name") or config.get("dataset", "")


def build(config, devices, num_classes: int = 0):
    """The experiment of config.experiment on a Mesh over `devices`, with a one-epoch budget (`num_classes`
    0: the data set's, from NUM_CLASSES)."""
    num_classes = num_classes or NUM_CLASSES.get(dataset_name(config), 1000)
    budget = loop.Budget(config, 1000, 1000, num_classes)
    mesh = mesh_lib.make_mesh(config.get("mesh"), devices)
    if config.experiment == "mae":
        return train_mae.MAE(config, mesh, budget)
    if config.experiment == "clmae":
        return train_clmae.CLMAEExperiment(config, mesh, budget)
    if config.experiment in ("cbm", "finetune"):
        from cbm_jax import train_supervised
        return train_supervised.Supervised(config, mesh, budget)
    raise ValueError(f"bench_tpu compiles training experiments (mae, clmae, cbm), not {config.experiment!r}.")


def evaluation_programs(experiment, config, mae_params, batch_spec) -> dict:
    """kNN feature extraction and the linear probe's step (frozen encoder on images) of the pretrained encoder."""
    params = encoder_params(mae_params)
    encoder = config_encoder(config, params, "tpu", dtype=config.model.dtype)
    features = jax.jit(lambda p, images: encoder.features(p, images)["gap_norm"])
    head = linear.ProbeHead(experiment.budget.num_classes)
    tx, _ = linear.probe_optimizer(linear_probe_config(config.batch_size), 1000, 1000)
    width = vit_size(config.model.size)["width"]
    probe_state = jax.eval_shape(lambda: linear.init_state(head, tx, width, 0))
    probe_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=experiment.replicated),
                               probe_state)
    probe_step = linear.probe_train_step(head, tx, lambda p, batch: encoder.features(p, batch["image"])["cls"])
    labelled = {**batch_spec, "label": harness.batch_spec(config, experiment.mesh, labels=2)["label"]}
    return {"knn_features": (features, (params, batch_spec["image"])),
            "linear_probe_step": (probe_step, (probe_state, params, labelled))}


def linear_probe_config(batch_size: int):
    """The official linear-probe recipe (LARS, lr 0.1, 10 warm-up epochs) at `batch_size`."""
    import ml_collections
    return ml_collections.ConfigDict(dict(lr=0.1, base_lr=0.0, batch_size=batch_size, warmup_epochs=10, epochs=90))


def programs(experiment, config) -> dict:
    """{name: (jitted, abstract args)} of every program a run of `config` executes; training ones first."""
    state = experiment.abstract_state()
    batch = harness.batch_spec(config, experiment.mesh, labels=experiment.budget.num_classes
                               if config.experiment in ("cbm", "finetune") else 0)
    if config.experiment == "mae":
        found = {"mae_step": (experiment.step_fn, (state, batch))}
    elif config.experiment == "clmae":
        found = {"mae_step": (experiment.mae_step, (state, batch)),
                 "masker_step": (experiment.masker_step, (state, batch, jnp.float32(1.0)))}
    else:
        from cbm_jax import train_supervised
        eval_batch = {**batch, "mask": jax.ShapeDtypeStruct(batch["label"].shape, jnp.bool_,
                                                            sharding=batch["label"].sharding)}
        eval_step = jax.jit(train_supervised.make_eval_step(experiment.model, config))
        return {"train_step": (experiment.step_fn, (state, batch, max(experiment.patches))),
                "eval_step": (eval_step, (state, eval_batch))}
    return {**found, **evaluation_programs(experiment, config, experiment.encoder_params(state), batch)}


TRAINING = ("mae_step", "masker_step", "train_step")


def analytic_flops(config) -> float:
    """Matmul FLOPs per image of one training iteration (0 where there is no analytic count: CBM)."""
    if config.experiment == "mae":
        return flops.mae_flops(config)
    if config.experiment == "clmae":
        return flops.clmae_flops(config)
    return 0.0


def summarise(config, chip, per_chip_batch: int, rows: dict, num_chips: int) -> dict:
    """The run's figures: the training programs of one iteration added up (each program's estimate, never below its
    HBM floor), images/s per chip, MFU without and with the collectives left unoverlapped (None, "incomplete", when
    a program holds unpriced work), wall-clock."""
    training = [rows[name] for name in TRAINING if name in rows]
    seconds = sum(r["bounded_seconds"] for r in training)
    collective_seconds = sum(r["collective_seconds"] for r in training)
    model_flops = analytic_flops(config) * per_chip_batch
    xla_flops = sum(r["xla_flops_per_chip"] for r in training)
    used_flops = model_flops or xla_flops
    complete = not any(r["unpriced"] for r in training)
    mfu = lambda s: used_flops / s / (chip.bf16_tflops * 1e12) if complete and s else None
    peak = max(r["peak_gib_per_chip"] for r in training)
    steps_per_epoch, total_steps = loop.step_budget(config, TRAIN_EXAMPLES.get(dataset_name(config), 1_281_167))
    return {"iteration_estimated_seconds": seconds, "iteration_collective_seconds": collective_seconds,
            "images_per_sec_per_chip": per_chip_batch / seconds if seconds else 0.0,
            "mfu": mfu(seconds), "mfu_with_collectives": mfu(seconds + collective_seconds),
            "mfu_status": "complete" if complete else "incomplete: unpriced work (see the programs' `unpriced`)",
            "mfu_flops": "analytic" if model_flops else "xla",
            "analytic_flops_per_chip": model_flops, "xla_flops_per_chip": xla_flops,
            "peak_gib_per_chip": peak, "fits": peak <= chip.hbm_gib,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "schedule_hours": total_steps * seconds / 3600, "num_chips": num_chips}


def print_table(topology: str, chip, run: dict, rows: dict, top: int = 10):
    """One line per program, the run's summary, and each training program's costliest work."""
    print(f"\n{topology}: {run['num_chips']} chips of TPU {chip.kind} ({chip.bf16_tflops:.0f} bf16 TFLOP/s, "
          f"{chip.hbm_gib:.0f} GiB HBM at {chip.hbm_bandwidth / 1e9:.0f} GB/s, ICI {chip.ici_bandwidth / 1e9:.0f} "
          "GB/s); every time is the compiler's estimate (collectives: the ring model), not a measurement")
    header = ("program", "peak GiB/chip", "XLA TFLOP/chip", "est. ms (compiler + fallback)", "collectives ms",
              "async copies GB", "unpriced", "optimal_seconds", "collectives (count, MiB)", "compile s")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, r in rows.items():
        coll = ", ".join(f"{k} {v['count']} / {v['bytes'] / 2**20:.0f}" for k, v in r["collectives"].items()
                         if v["count"])
        print(f"| {name} | {r['peak_gib_per_chip']:.2f} | {r['xla_flops_per_chip'] / 1e12:.3f} | "
              f"{r['estimated_seconds'] * 1e3:.1f} ({r['compiler_seconds'] * 1e3:.1f} + "
              f"{r['fallback_seconds'] * 1e3:.2f}) | {r['collective_seconds'] * 1e3:.1f} | "
              f"{r['async_copies']['bytes'] / 1e9:.2f} | {len(r['unpriced'])} | {r['optimal_seconds']:.4g} | "
              f"{coll or '-'} | {r['compile_seconds']:.0f} |")
    print(f"iteration: {run['iteration_estimated_seconds'] * 1e3:.1f} ms (est.) + "
          f"{run['iteration_collective_seconds'] * 1e3:.1f} ms of collectives if none overlapped, "
          f"{run['images_per_sec_per_chip']:.0f} images/s/chip, MFU {tpu.percent(run['mfu'])} "
          f"({tpu.percent(run['mfu_with_collectives'])} with the collectives; {run['mfu_flops']} FLOPs), peak "
          f"{run['peak_gib_per_chip']:.2f} GiB/chip ({'fits' if run['fits'] else 'does NOT fit'} "
          f"{chip.hbm_gib:.0f} GiB), schedule {run['total_steps']} steps = {run['schedule_hours']:.1f} h (est.)")
    print(f"largest group of devices over which the large parameters (99% of their elements) split into whole TPU "
          f"tiles: {run['tiled_group']} (mesh.fsdp={run['tiled_group']} shards the update without padded collectives)")
    for name in TRAINING:
        if name in rows:
            print(f"\n{name}: costliest work ({rows[name]['fallback_count']} ops priced by the fallback roofline)")
            print(fusion_lines(rows[name]["top"][:top]))
            for u in rows[name]["unpriced"]:
                print(f"UNPRICED {u['opcode']} {u['target']} ({u['op']}): {u['flops'] / 1e9:.2f} GFLOP, "
                      f"{u['bytes'] / 1e6:.1f} MB")


def fusion_lines(top: list) -> str:
    """A markdown table of tpu.fusion_table rows."""
    lines = ["| op (JAX op_name) | matmul | pass | count | GFLOP | MB | ms | share | TFLOP/s (of peak) | "
             "GB/s (of HBM) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g in top:
        lines.append(f"| `{g['op']}`{' (fallback)' if g['pricing'] == 'fallback' else ''} | "
                     f"{'yes' if g['matmul'] else ''} | {g['phase']} | {g['count']} | {g['flops'] / 1e9:.1f} | "
                     f"{g['bytes'] / 1e6:.0f} | {g['seconds'] * 1e3:.2f} | {100 * g['share']:.1f}% | "
                     f"{g['flop_per_s'] / 1e12:.0f} ({100 * g['of_peak']:.0f}%) | "
                     f"{g['bytes_per_s'] / 1e9:.0f} ({100 * g['of_hbm']:.0f}%) |")
    return "\n".join(lines)


def compiler_options(pairs: list) -> dict:
    """{"KEY": value} of KEY=VALUE words, numbers and booleans as such."""
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def define_flags():
    """The command line (defined only when run as a script: tests import this module beside main.py's flags)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config (configs/NAME.py[:variant]).",
                                    lock_config=False)
    flags.DEFINE_string("topology", "v5e:2x2", f"TPU topology ('v5e:16x16') or slice ({', '.join(tpu.SLICES)}).")
    flags.DEFINE_integer("per_chip_batch", 0, "Images per chip (0: the config's global batch spread over the chips).")
    flags.DEFINE_list("programs", [], "Only these programs (default: every program of the experiment).")
    flags.DEFINE_integer("num_classes", 0, "Classes of the data set (0: from NUM_CLASSES; 1000 when unknown).")
    flags.DEFINE_list("compiler_options", [], "XLA / TPU compiler options, KEY=VALUE (e.g. "
                      "xla_tpu_scoped_vmem_limit_kib=65536); an unknown key is the compiler's error.")
    flags.DEFINE_string("cache_dir", "~/.cache/clmae_jax/tpu_xla", "Persistent compilation cache ('' for none).")
    flags.DEFINE_string("out", "", "JSON path (default bench/results/tpu_<topology>_<config>.json).")
    flags.mark_flags_as_required(["config"])


def main(argv):
    """Compiles the config's programs for the topology, prints the table and writes the JSON."""
    del argv
    if FLAGS.cache_dir:
        tpu.enable_compilation_cache(FLAGS.cache_dir)
    config, chip = FLAGS.config, tpu.chip(FLAGS.topology)
    devices = tpu.topology_devices(FLAGS.topology)
    num_chips = len(devices) // chip.devices_per_chip
    if FLAGS.per_chip_batch:
        config.batch_size = FLAGS.per_chip_batch * num_chips
    per_chip_batch = config.batch_size // num_chips
    experiment = build(config, devices, FLAGS.num_classes)
    options = compiler_options(FLAGS.compiler_options)
    rows = {}
    for name, (jitted, args) in programs(experiment, config).items():
        if FLAGS.programs and name not in FLAGS.programs:
            continue
        _, rows[name] = tpu.compile_program(jitted, *args, chip_=chip, compiler_options=options)
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "collectives"}), flush=True)
    run = summarise(config, chip, per_chip_batch, rows, num_chips)
    shapes = [p.shape for p in jax.tree.leaves(experiment.abstract_state().params)]
    run["tiled_group"] = state_lib.largest_tiled_group(shapes, len(devices), config.get("mesh"))
    print_table(FLAGS.topology, chip, run, rows)
    name = os.path.basename(config_flags.get_config_filename(FLAGS["config"])).removesuffix(".py")
    out = FLAGS.out or f"bench/results/tpu_{FLAGS.topology.replace(':', '_')}_{name}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    commit = harness.commit()
    with open(out, "w") as f:
        json.dump({"topology": FLAGS.topology, "chip": chip.__dict__, "commit": commit, "config": config.to_dict(),
                   "compiler_options": options, "per_chip_batch": per_chip_batch, "run": run, "programs": rows},
                  f, indent=2, default=str)


if __name__ == "__main__":
    define_flags()
    app.run(main)
