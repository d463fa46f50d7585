"""CBM against its baseline and random masking over seeds, on Fashion-MNIST.

    python -m research.cbm_sweep --lanes=2      # what is missing, two runs at a time, each on its own core
    python -m research.cbm_sweep --table        # the table from the JSON
    python -m research.cbm_sweep --table --json=J --epochs=5,10,30   # a long sweep's per-epoch table, some epochs

Arms (configs/cbm_fashion_mnist.py variants): the baseline (never masked), CBM (salience, linear repeat "40": 1, 2,
3, 4, 6 of 16 cells), random (uniform cells, same curriculum) and CBM light (salience, 1, 1, 2, 3, 4 cells). Every
run goes through `main.py` as a user runs it, in --out/<arm>_s<seed>/, so a rerun resumes a stopped run and skips
finished ones; each result lands in --json when its run ends. The table gives the final and best test accuracy (%),
mean ± sample std over the seeds done (n per cell), and each arm's final accuracy minus the baseline's mean; the
next tables give each arm's test accuracy after every epoch (or the --epochs named), then its training accuracy and loss
averaged over each epoch's logged batches, means over its seeds.
"""
import concurrent.futures
import os
import queue
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from clmae_jax.runtime import metrics
from research import sweeps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(ROOT, "configs", "cbm_fashion_mnist.py")
ARMS = {"baseline": ":baseline", "cbm": "", "random": ":random", "cbm_light": ":light"}  # name -> variant
# Width 8 (a quarter of width 16's FLOPs): a 10-epoch run takes ~19 min on one core here, so 4 arms x 3 seeds fit in
# about two hours on 2 cores.
RECIPE = ("--config.model.width=8",)
# Training accuracy and loss are on the batches as trained: masked ones in the masked arms.
TRAIN_TAGS = ("train_accuracy", "loss")


def command(arm: str, seed: int, workdir: str) -> list[str]:
    """The main.py command line of one run."""
    return [sys.executable, os.path.join(ROOT, "main.py"), f"--config={CONFIG}{ARMS[arm]}", f"--workdir={workdir}",
            f"--config.seed={seed}", *RECIPE, *flags.FLAGS.override]


def train(arm: str, seed: int, cores: queue.Queue) -> dict:
    """Runs (or resumes) one run on a free core; its results.json, test accuracy per epoch, wall seconds of the call."""
    workdir = os.path.join(flags.FLAGS.out, f"{arm}_s{seed}")
    os.makedirs(workdir, exist_ok=True)
    core, start = cores.get(), time.time()
    pin = (lambda: os.sched_setaffinity(0, {core})) if flags.FLAGS.lanes > 1 else None
    try:
        with open(os.path.join(workdir, "sweep_log.txt"), "a") as log:
            code = subprocess.call(command(arm, seed, workdir), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   preexec_fn=pin)
    finally:
        cores.put(core)
    if code:
        raise RuntimeError(f"{arm} seed {seed} failed (exit {code}); see {workdir}/sweep_log.txt")
    return {**sweeps.read(os.path.join(workdir, "results.json")), **by_epoch(workdir), "seconds": time.time() - start}


def by_epoch(workdir: str) -> dict:
    """A run's test accuracy after each epoch, and its training accuracy and loss averaged over each epoch's logs."""
    series = metrics.read_tags(workdir, ("test_accuracy", *TRAIN_TAGS))
    ends = sorted(series["test_accuracy"])  # Each epoch ends with a test evaluation.
    out = {"test_accuracy_by_epoch": [series["test_accuracy"][step] for step in ends]}
    for tag in TRAIN_TAGS:
        out[f"{tag}_by_epoch"] = [float(np.mean([v for step, v in series[tag].items() if start < step <= end]))
                                  for start, end in zip([0] + ends[:-1], ends)]
    return out


def summary(sweep: dict) -> dict:
    """{arm: {column label: (mean, std, n)}}: final and best test accuracy in %, final minus the baseline's mean."""
    baseline = [r["final_test_accuracy"] * 100 for r in sweeps.arm_runs(sweep, "baseline")]
    out = {}
    for arm in ARMS:
        runs = sweeps.arm_runs(sweep, arm)
        if not runs:
            continue
        final = [r["final_test_accuracy"] * 100 for r in runs]
        out[arm] = {"final acc": sweeps.mean_std(final),
                    "best acc": sweeps.mean_std([r["best_test_accuracy"] * 100 for r in runs]),
                    "epochs": sweeps.mean_std([r["final_epoch"] for r in runs])}
        if baseline:
            out[arm]["final - baseline"] = sweeps.mean_std([f - sum(baseline) / len(baseline) for f in final])
    return out


def table(sweep: dict) -> str:
    """Markdown: one row per arm."""
    return sweeps.markdown(summary(sweep))


def curves(sweep: dict, epochs: list[int] = (), key: str = "test_accuracy_by_epoch", scale: float = 100,
           digits: int = 2) -> str:
    """Markdown: each arm's seed mean of `key` (test accuracy in % by default) at the epochs given (all if none)."""
    rows = {arm: np.mean([r[key] for r in sweeps.arm_runs(sweep, arm)], axis=0) * scale
            for arm in ARMS if sweeps.arm_runs(sweep, arm)}
    epochs = list(epochs) or list(range(1, max((len(row) for row in rows.values()), default=0) + 1))
    lines = ["| arm | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
    cell = lambda row, e: f"{row[e - 1]:.{digits}f}" if e <= len(row) else "-"
    return "\n".join(lines + [f"| {arm} | " + " | ".join(cell(row, e) for e in epochs) + " |"
                               for arm, row in rows.items()])


def main(argv):
    """Runs the missing (arm, seed) pairs, --lanes at a time, recording each as it ends; prints the table."""
    del argv
    path, sweep = flags.FLAGS.json, sweeps.read(flags.FLAGS.json)
    if not flags.FLAGS.table:
        unknown = [a for a in flags.FLAGS.arms if a not in ARMS]
        if unknown:
            sys.exit(f"error: unknown arm(s) {', '.join(unknown)}; use {', '.join(ARMS)}.")
        if flags.FLAGS.lanes > len(os.sched_getaffinity(0)):
            sys.exit(f"error: --lanes={flags.FLAGS.lanes} but this process may use only "
                     f"{len(os.sched_getaffinity(0))} cores; give at most that many lanes.")
        cores = queue.Queue()
        for core in sorted(os.sched_getaffinity(0))[:flags.FLAGS.lanes]:
            cores.put(core)
        older = [name for name, run in sweep["runs"].items()  # Recorded before the training columns existed.
                 if "loss_by_epoch" not in run and os.path.isdir(os.path.join(flags.FLAGS.out, name))]
        for name in older:
            sweep["runs"][name].update(by_epoch(os.path.join(flags.FLAGS.out, name)))
        if older:
            sweeps.write(path, sweep)
        jobs = [(arm, int(seed)) for seed in flags.FLAGS.seeds for arm in flags.FLAGS.arms
                if f"{arm}_s{seed}" not in sweep["runs"]]
        with concurrent.futures.ThreadPoolExecutor(flags.FLAGS.lanes) as pool:
            futures = {pool.submit(train, arm, seed, cores): f"{arm}_s{seed}" for arm, seed in jobs}
            failed = []
            for future in concurrent.futures.as_completed(futures):
                try:
                    sweep["runs"][futures[future]] = future.result()
                except RuntimeError as error:
                    failed.append(str(error))
                    continue
                sweeps.write(path, sweep)
                print(f"{futures[future]} done", flush=True)
        if failed:
            sys.exit("error: " + "; ".join(failed))
    print(table(sweep))
    epochs = [int(e) for e in flags.FLAGS.epochs]
    print(curves(sweep, epochs))
    if all("loss_by_epoch" in run for run in sweep["runs"].values()):
        print("\nTraining accuracy (%) and loss, each epoch's logged batches:")
        print(curves(sweep, epochs, "train_accuracy_by_epoch"))
        print(curves(sweep, epochs, "loss_by_epoch", scale=1, digits=3))


if __name__ == "__main__":  # Flags only as a script (tests import the tables).
    flags.DEFINE_string("json", os.path.join(ROOT, "research", "results", "cbm_sweep.json"), "Where results land.")
    flags.DEFINE_string("out", os.path.join(ROOT, "runs", "cbm_sweep"), "Run folders, <arm>_s<seed> each.")
    flags.DEFINE_list("arms", list(ARMS), f"Arms, from {', '.join(ARMS)}.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
    flags.DEFINE_integer("lanes", 1, "Runs at a time; with more than one, each is pinned to a core of its own.")
    flags.DEFINE_bool("table", False, "Only print the table of what --json holds.")
    flags.DEFINE_list("epochs", [], "Epochs (1-based) in the per-epoch table; all when empty (e.g. 5,10,30 at 30).")
    flags.register_validator("epochs", lambda epochs: all(e.isdigit() and int(e) > 0 for e in epochs),
                             "--epochs takes epoch numbers from 1, e.g. --epochs=5,10,30.")
    flags.DEFINE_multi_string("override", [], "--config.KEY=VALUE for every run (e.g. a shorter test).")
    app.run(main)
