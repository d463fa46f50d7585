"""Time from a preemption notice (SIGTERM) to the process's exit, over many stops at random steps.

    python -m bench.bench_preemption [--stops=10] [--main=main.py] [--out=bench/results/preemption.json]

Each stop starts `main.py` on the quickstart config (Fashion-MNIST MAE, full shuffle buffer: the tf.data iterator
whose teardown once took 38-40 s) in a new workdir, sends SIGTERM once the run has logged a step drawn at random
(seeded) between --first_step and --last_step, and records three times from the signal: the `stopped on` line
(the checkpoint is committed before it is printed), the exit, and what lies between them. `--main` may point at
another checkout's main.py, so two versions are measured side by side in one run. Prints a table, writes JSON.
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_integer("stops", 10, "Runs to stop.")
flags.DEFINE_integer("first_step", 5, "Earliest step to stop at.")
flags.DEFINE_integer("last_step", 50, "Latest step to stop at.")
flags.DEFINE_integer("seed", 0, "Seed of the stop steps.")
flags.DEFINE_list("main", [os.path.join(ROOT, "main.py")], "main.py of each checkout to measure (alternating).")
flags.DEFINE_string("out", "bench/results/preemption.json", "Where the JSON goes.")
FLAGS = flags.FLAGS


def stop_once(main_py: str, step: int, workdir: str) -> dict:
    """Starts a run, sends SIGTERM after it logged `step`; seconds from the signal to the line and to the exit."""
    config = os.path.join(os.path.dirname(main_py), "configs", "mae_fashion_mnist.py")
    proc = subprocess.Popen([sys.executable, main_py, f"--config={config}", f"--workdir={workdir}",
                             "--config.log_every_steps=1", "--config.image_every_steps=0", "--config.total_steps=600"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines, seen = [], {}

    def read():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("stopped on"):
                seen["line"] = time.time()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not any(re.search(rf"\] \[{step}\] ", line) for line in lines):
        if proc.poll() is not None:
            raise RuntimeError(f"{main_py} ended before step {step}:\n{''.join(lines[-20:])}")
        time.sleep(0.01)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    exited = time.time()
    reader.join(10)
    line = seen.get("line", exited) - signalled
    return {"main": main_py, "step": step, "exit_status": proc.returncode, "signal_to_line_s": line,
            "line_to_exit_s": exited - signalled - line, "signal_to_exit_s": exited - signalled}


def main(argv):
    """Stops FLAGS.stops runs per checkout at seeded random steps; prints the table and writes the JSON."""
    del argv
    steps = np.random.default_rng(FLAGS.seed).integers(FLAGS.first_step, FLAGS.last_step + 1, FLAGS.stops)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, step in enumerate(steps):
            for k, main_py in enumerate(FLAGS.main):
                rows.append(stop_once(main_py, int(step), os.path.join(scratch, f"{i}_{k}")))
                r = rows[-1]
                print(f"| {r['main']} | {r['step']} | {r['exit_status']} | {r['signal_to_line_s']:.1f} | "
                      f"{r['line_to_exit_s']:.1f} | {r['signal_to_exit_s']:.1f} |", flush=True)
    print("\n| main.py | stops | exit 75 | signal to exit: median | max | line to exit: max |")
    print("|---|---|---|---|---|---|")
    for main_py in FLAGS.main:
        mine = [r for r in rows if r["main"] == main_py]
        total = [r["signal_to_exit_s"] for r in mine]
        print(f"| {main_py} | {len(mine)} | {sum(r['exit_status'] == 75 for r in mine)} | {np.median(total):.1f} s "
              f"| {max(total):.1f} s | {max(r['line_to_exit_s'] for r in mine):.1f} s |")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
