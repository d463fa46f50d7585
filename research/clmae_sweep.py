"""CL-MAE against MAE over seeds, at equal epochs and at equal compute, every protocol.

    python -m research.clmae_sweep --out=runs/sweep --evals=knn,linear,fewshot,finetune   # what is missing
    python -m research.clmae_sweep --table                                                # the tables from the JSON

Arms: MAE, CL-MAE (official recipe), CL-MAE `:adversarial`, all for --epochs on Fashion-MNIST at one base lr, and MAE
given the compute CL-MAE took (its epochs = --epochs x CL-MAE / MAE pretraining CPU seconds, mean over the seeds and
CL-MAE arms that have both; CPU seconds, not wall, so a run sharing the machine with other work still measures its own
cost). Every pretraining and protocol runs as a user runs it (`main.py`, through tools/compare_encoders.py's commands)
in --out/<arm>_s<seed>/, so a rerun resumes a stopped run and skips finished ones; each result goes into --json as
soon as it exists. The table gives mean ± sample std over the seeds done (n per cell); a second one gives each arm's
difference from MAE's (at --epochs) and whether it exceeds the seed spread.
"""
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from configs import clmae_fashion_mnist
from research import sweeps
from tools import compare_encoders

ROOT = compare_encoders.ROOT

# Every arm at CL-MAE's base learning rate (the MAE quickstart's is 1.5e-3), so the arms differ only in masking.
BASE_LR = clmae_fashion_mnist.get_config().optimizer.base_lr
ARMS = {  # name -> pretraining config
    "mae": "mae_fashion_mnist.py",
    "clmae": "clmae_fashion_mnist.py",
    "clmae_adversarial": "clmae_fashion_mnist.py:adversarial",
    "mae_equal_compute": "mae_fashion_mnist.py",
}

def equal_compute_epochs(sweep: dict) -> int:
    """MAE's epochs x (CL-MAE / MAE pretraining CPU seconds, mean over the seeds and CL-MAE arms with both), rounded
    up; once a mae_equal_compute run has its epochs, every later seed gets the same. Both CL-MAE arms run the same
    program (only the module's learning-rate schedule differs), so either one measures CL-MAE's cost."""
    runs = sweep["runs"]
    # One budget per arm: later CL-MAE runs (other seeds, or pinned to a core, which costs fewer CPU seconds) would
    # otherwise move the ratio and give the arm's seeds different epochs.
    budgets = [r["epochs"] for r in sweeps.arm_runs(sweep, "mae_equal_compute") if "epochs" in r]
    if budgets:
        return budgets[0]
    seeds = {name.rsplit("_s", 1)[1] for name in runs}
    ratios = [runs[f"{arm}_s{s}"]["pretrain_cpu_seconds"] / runs[f"mae_s{s}"]["pretrain_cpu_seconds"]
              for s in seeds for arm in ("clmae", "clmae_adversarial")
              if all(runs.get(f"{a}_s{s}", {}).get("pretrain_cpu_seconds") for a in ("mae", arm))]
    if not ratios:
        sys.exit("error: mae_equal_compute needs mae and a CL-MAE arm of one seed pretrained with CPU seconds "
                 "recorded; put both before it in --arms.")
    return math.ceil(runs["mae_s0"]["epochs"] * float(np.mean(ratios)))


def child_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pretrain(arm: str, seed: int, epochs: int, workdir: str) -> tuple[float, float]:
    """Runs (or resumes) one pretraining; (wall, CPU) seconds of this call (a run resumed after the sweep was stopped
    counts only its last part: compare arms on uninterrupted runs)."""
    start, start_cpu = time.time(), child_cpu_seconds()
    cmd = [sys.executable, f"{ROOT}/main.py", f"--config={ROOT}/configs/{ARMS[arm]}", f"--workdir={workdir}",
           f"--config.seed={seed}", f"--config.num_epochs={epochs}", "--config.total_steps=0",
           f"--config.optimizer.base_lr={BASE_LR}",
           *flags.FLAGS.pretrain_override]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep_log.txt"), "a") as log:
        if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT):
            sys.exit(f"error: pretraining {arm} seed {seed} failed; see {workdir}/sweep_log.txt")
    return time.time() - start, child_cpu_seconds() - start_cpu


def summary(sweep: dict) -> dict:
    """{arm: {column label: (mean, std, n)}} over the seeds recorded."""
    columns = [c for p in compare_encoders.PROTOCOLS for c in compare_encoders.COLUMNS[p]]
    out = {}
    for arm in ARMS:
        runs = sweeps.arm_runs(sweep, arm)
        cells = {label: sweeps.mean_std([r["results"][key] * scale for r in runs if key in r["results"]])
                 for key, label, scale in columns if any(key in r["results"] for r in runs)}
        if runs:
            cpu = [r["pretrain_cpu_seconds"] for r in runs if r.get("pretrain_cpu_seconds")]
            if cpu:
                cells["pretrain CPU min"] = (float(np.mean(cpu)) / 60, float("nan"), len(cpu))
            cells["epochs"] = (float(runs[0]["epochs"]), float("nan"), len(runs))
        if cells:
            out[arm] = cells
    return out


def table(sweep: dict) -> str:
    """Markdown: one row per arm, `mean ± std (n)` per column (std of one seed: none)."""
    return sweeps.markdown(summary(sweep))


def differences(sweep: dict, reference: str = "mae") -> str:
    """Markdown: every other arm's mean minus the reference arm's per evaluation column, `± its standard error`
    (sqrt(s_a^2 / n_a + s_ref^2 / n_ref), where both arms have 2+ seeds), in bold where the difference exceeds two
    standard errors, i.e. the seed spread."""
    rows = summary(sweep)
    if reference not in rows:
        return f"(no {reference} runs to compare with)"
    evaluation = [label for p in compare_encoders.PROTOCOLS for _, label, _ in compare_encoders.COLUMNS[p]]
    labels = [label for label in evaluation if any(label in cells for cells in rows.values())]
    lines = [f"| arm − {reference} | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for arm, cells in rows.items():
        if arm == reference:
            continue
        text = []
        for label in labels:
            if label not in cells or label not in rows[reference]:
                text.append("-")
                continue
            (mean, std, n), (ref_mean, ref_std, ref_n) = cells[label], rows[reference][label]
            error = math.sqrt(std ** 2 / n + ref_std ** 2 / ref_n)  # NaN when either arm has one seed.
            cell = f"{mean - ref_mean:+.2f}" + ("" if math.isnan(error) else f" ± {error:.2f}")
            text.append(f"**{cell}**" if abs(mean - ref_mean) > 2 * error else cell)
        lines.append(f"| {arm} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main(argv):
    """Runs the missing pretrainings and protocols, recording each; prints the tables."""
    del argv
    path = flags.FLAGS.json
    sweep = sweeps.read(path)
    if not flags.FLAGS.table:
        unknown = [a for a in flags.FLAGS.arms if a not in ARMS]
        if unknown:
            sys.exit(f"error: unknown arm(s) {', '.join(unknown)}; use {', '.join(ARMS)}.")
        for seed in map(int, flags.FLAGS.seeds):
            for arm in flags.FLAGS.arms:
                name, workdir = f"{arm}_s{seed}", os.path.join(flags.FLAGS.out, f"{arm}_s{seed}")
                run = sweep["runs"].setdefault(name, {"results": {}, "pretrain_seconds": 0.0})
                if "epochs" not in run:
                    epochs = equal_compute_epochs(sweep) if arm == "mae_equal_compute" else flags.FLAGS.epochs
                    wall, cpu = pretrain(arm, seed, epochs, os.path.join(workdir, "pretrain"))
                    run["pretrain_seconds"] += wall
                    run["pretrain_cpu_seconds"] = run.get("pretrain_cpu_seconds", 0.0) + cpu
                    run["epochs"] = epochs
                    sweeps.write(path, sweep)
                for protocol in flags.FLAGS.evals:
                    if protocol in run.get("protocols_done", []):
                        continue
                    results, _ = compare_encoders.run_protocol(protocol, os.path.join(workdir, "pretrain"),
                                                               os.path.join(workdir, protocol))
                    run["results"].update({k: v for k, v in results.items() if isinstance(v, (int, float))})
                    run.setdefault("protocols_done", []).append(protocol)
                    sweeps.write(path, sweep)
                    print(f"{name} {protocol} done", flush=True)
    print(table(sweep))
    print(differences(sweep))


if __name__ == "__main__":  # Flags only as a script (tests import the tables); --out, --evals: compare_encoders'.
    flags.DEFINE_string("json", os.path.join(ROOT, "research", "results", "clmae_sweep.json"), "Where results land.")
    flags.DEFINE_list("arms", list(ARMS), f"Arms, from {', '.join(ARMS)}.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Pretraining seeds.")
    flags.DEFINE_integer("epochs", 5, "Pretraining epochs of every arm but mae_equal_compute.")
    flags.DEFINE_bool("table", False, "Only print the table of what --json holds.")
    flags.DEFINE_multi_string("pretrain_override", [], "--config.KEY=VALUE for every pretraining run (e.g. a smoke).")
    app.run(main)
