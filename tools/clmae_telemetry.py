"""CL-MAE curriculum telemetry of a run, stage by stage: is the module a partner, then an adversary?

    python -m tools.clmae_telemetry runs/clmae_fmnist [--json=research/results/clmae_telemetry.json] [--plot=run.png]

Reads the run's TensorBoard scalars and prints, per value of lambda_CL, the mean MAE loss under the learned mask
and under a random mask of the same ratio (their ratio `difficulty`: < 1 partner, > 1 adversary), the size of each
weighted term of the masking module's objective, and how decided the masks are. --plot draws (with PIL) the
difficulty against step beside lambda_CL, and per stage the fractions of saturated keep-probabilities.
"""
import json
import os

import numpy as np
from absl import app, flags
from PIL import Image

from clmae_jax.runtime.metrics import read_tags
from tools.charts import line_chart

flags.DEFINE_string("json", "", "Where to write the table as JSON (optional).")
flags.DEFINE_string("plot", "", "Where to write the PNG of difficulty and saturation (optional).")
TAGS = ("lambda_cl", "mae_loss_learned_mask", "mae_loss_random_mask", "difficulty", "loss_curriculum",
        "loss_gaussian", "loss_kl", "loss_diversity", "keep_prob_mean", "decisive_fraction", "mask_distance",
        "saturated_keep_fraction", "saturated_mask_fraction")


def stage_table(workdir: str, config: dict) -> list[dict]:
    """One row per lambda_CL stage: step range, mean of every tag, and the weighted objective terms."""
    series = read_tags(workdir, TAGS)
    steps = sorted(series["lambda_cl"])
    weights = {"loss_curriculum": None, "loss_gaussian": config["lambda_gaussian"], "loss_kl": config["lambda_kl"],
               "loss_diversity": config["lambda_diversity"]}
    rows = []
    for lam in sorted({series["lambda_cl"][s] for s in steps}, reverse=True):
        at = [s for s in steps if series["lambda_cl"][s] == lam]
        row = {"lambda_cl": lam, "first_step": at[0], "last_step": at[-1], "logged": len(at)}
        # Runs from before a tag was logged get NaN for it.
        row.update({tag: float(np.mean([series[tag][s] for s in at if s in series[tag]] or [np.nan]))
                    for tag in TAGS[1:]})
        row.update({f"weighted_{k}": (lam if w is None else w) * row[k] for k, w in weights.items()})
        rows.append(row)
    return rows


def plot(workdir: str, rows: list, path: str):
    """Two panels: difficulty (learned / random mask loss) and lambda_CL against step; saturation per stage."""
    series = read_tags(workdir, ("difficulty", "lambda_cl"))
    difficulty, lam = series["difficulty"], series["lambda_cl"]
    steps = sorted(difficulty)
    top = line_chart(os.path.basename(workdir.rstrip("/")) + ": > 1 = harder than a random mask", {
        "difficulty": (steps, [difficulty[s] for s in steps]),
        "lambda_CL": (steps, [lam[s] for s in steps])}, (-1.1, max(1.5, max(difficulty.values()) + 0.1)), hline=1.0)
    starts = [row["first_step"] for row in rows]
    bottom = line_chart("keep-probabilities per lambda_CL stage (fraction)", {
        f"> 0.99 ({TAGS[-2]})": (starts, [row["saturated_keep_fraction"] for row in rows]),
        f"< 0.01 ({TAGS[-1]})": (starts, [row["saturated_mask_fraction"] for row in rows]),
        "< 0.1 or > 0.9 (decisive)": (starts, [row["decisive_fraction"] for row in rows])}, (0.0, 1.0))
    both = Image.new("RGB", (top.width, top.height + bottom.height), "white")
    both.paste(top, (0, 0))
    both.paste(bottom, (0, top.height))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    both.save(path)


def main(argv):
    workdir = argv[1]
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)["clmae"]
    rows = stage_table(workdir, config)
    columns = ("lambda_cl", "first_step", "mae_loss_learned_mask", "mae_loss_random_mask", "difficulty",
               "weighted_loss_curriculum", "weighted_loss_gaussian", "weighted_loss_kl", "weighted_loss_diversity",
               "keep_prob_mean", "decisive_fraction", "saturated_keep_fraction", "saturated_mask_fraction")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.4g}" for c in columns) + " |")
    if flags.FLAGS.plot:
        plot(workdir, rows, flags.FLAGS.plot)
    if flags.FLAGS.json:
        os.makedirs(os.path.dirname(flags.FLAGS.json) or ".", exist_ok=True)
        with open(flags.FLAGS.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
