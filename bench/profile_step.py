"""Where an update step's time goes: a `jax.profiler` trace of the MAE step (or the CL-MAE iteration), every XLA op
attributed through the compiled HLO's metadata to matmul / other work, forward / backward / optimizer, and the model
part (attention, MLP, LayerNorm, the rest).

    python -m bench.profile_step [--experiment=mae|clmae] [--attention=einsum] [--steps=3]

ViT-B/16 at 224 px, batch 8, float32 by default (the CPU preset of bench_vs_torch.py). Prints the grouped table and
the costliest non-matmul ops, writes JSON and leaves the trace (TensorBoard's profile plugin or Perfetto) in --trace.
"""
import collections
import glob
import gzip
import json
import os
import re
import time

from absl import app, flags

import jax

from bench import flops, harness, jax_steps
from configs import clmae_vitb, mae_vitb

flags.DEFINE_enum("experiment", "mae", ["mae", "clmae"], "The MAE step or the CL-MAE iteration.")
flags.DEFINE_string("attention", "einsum", "config.model.attention.")
flags.DEFINE_string("size", "base", "ViT size.")
flags.DEFINE_integer("batch", 8, "Global batch.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_integer("steps", 3, "Traced steps (after two untraced ones).")
flags.DEFINE_integer("top", 15, "Costliest non-matmul op groups to list.")
flags.DEFINE_string("trace", "bench/results/profile_trace", "Where the trace goes.")
flags.DEFINE_string("out", "bench/results/profile.json", "Where the JSON goes.")
FLAGS = flags.FLAGS

# An HLO instruction with its metadata: `%name = type op(...), ..., metadata={op_name="..."`.
INSTRUCTION = re.compile(r"^\s*%?([\w.\-]+) = \S+ ([\w-]+)\(.*?metadata=\{op_name=\"([^\"]*)\"", re.M)


def categorise(name: str, opcode: str, op_name: str) -> tuple:
    """(kind, pass, part) of one compiled op from its HLO name, opcode and the JAX op path it came from."""
    kind = "matmul" if opcode == "dot" or name.startswith(("ynn_fusion", "xnn_fusion", "dot")) else "other"
    stage = "backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name else "optimizer/other"
    part = next((p for key, p in (("/attn/", "attention"), ("/mlp/", "mlp"), ("norm", "layernorm")) if key in op_name),
                "rest")
    return kind, stage, part


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """Total microseconds and call counts per op name in the newest Perfetto trace under `trace_dir`."""
    path = max(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    micros, calls = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            micros[event["name"]] += event.get("dur", 0)
            calls[event["name"]] += 1
    return micros, calls


def main(argv):
    """Builds, warms up, traces and attributes the step; prints and saves the tables."""
    del argv
    config = harness.step_config(clmae_vitb if FLAGS.experiment == "clmae" else mae_vitb, FLAGS.batch, FLAGS.dtype,
                                 size=FLAGS.size, attention=FLAGS.attention)
    if FLAGS.experiment == "clmae":
        experiment, programs, _ = jax_steps.compile_clmae(config)
        step = jax_steps.clmae_iteration(programs, harness.random_batch(config, experiment.mesh))
        hlo = programs[0].as_text() + programs[1].as_text()
    else:
        experiment, compiled, _ = jax_steps.compile_mae(config)
        step = jax_steps.mae_update(compiled, harness.random_batch(config, experiment.mesh))
        hlo = compiled.as_text()
    metadata = {m.group(1): (m.group(2), m.group(3)) for m in INSTRUCTION.finditer(hlo)}
    state = experiment.create_train_state()
    for _ in range(2):
        state = jax.block_until_ready(step(state))
    start = time.perf_counter()
    with jax.profiler.trace(FLAGS.trace, create_perfetto_trace=True):
        for _ in range(FLAGS.steps):
            state = jax.block_until_ready(step(state))
    seconds = (time.perf_counter() - start) / FLAGS.steps
    micros, calls = op_times(FLAGS.trace)
    groups, other_ops = collections.Counter(), collections.Counter()
    for name, us in micros.items():
        if name in metadata:
            kind, stage, part = categorise(name, *metadata[name])
            groups[(kind, stage, part)] += us / FLAGS.steps / 1e3
            if kind == "other":
                op_path = re.sub(r"block\d+/", "", metadata[name][1].split("jit(train_step)/")[-1])
                other_ops[(re.sub(r"[._]\d+$", "", name), op_path[-90:])] += us / FLAGS.steps / 1e3
    attributed = sum(groups.values())
    model_flops = (flops.clmae_flops if FLAGS.experiment == "clmae" else flops.mae_flops)(config) * config.batch_size
    matmul_ms = sum(ms for (kind, _, _), ms in groups.items() if kind == "matmul")
    print(f"\n{harness.device_line()}: {FLAGS.experiment} step, ViT-{FLAGS.size}/16, batch {FLAGS.batch}, "
          f"{FLAGS.dtype}, attention {FLAGS.attention}: {seconds * 1e3:.0f} ms per step while traced; ops add up to "
          f"{attributed:.0f} ms; matmuls {matmul_ms:.0f} ms at {model_flops / matmul_ms / 1e6:.0f} GFLOP/s")
    print("| kind | pass | part | ms/step | share |\n|---|---|---|---|---|")
    for (kind, stage, part), ms in groups.most_common():
        print(f"| {kind} | {stage} | {part} | {ms:.1f} | {100 * ms / attributed:.1f}% |")
    print("\ncostliest non-matmul ops (ms/step, summed over blocks):")
    for (name, op_path), ms in other_ops.most_common(FLAGS.top):
        print(f"{ms:7.1f}  {name:28s} {op_path}")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"device": harness.device_line(), "experiment": FLAGS.experiment, "attention": FLAGS.attention,
                   "seconds_per_step": seconds, "attributed_ms": attributed, "matmul_ms": matmul_ms,
                   "groups": [{"kind": k, "pass": s, "part": p, "ms": ms} for (k, s, p), ms in groups.items()]}, f,
                  indent=2)


if __name__ == "__main__":
    app.run(main)
