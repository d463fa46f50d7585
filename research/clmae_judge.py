"""How hard are a CL-MAE run's learned masks for an MAE that never trained on them?

    python -m research.clmae_judge --judge=runs/mae_fmnist runs/clmae_a runs/clmae_b[/checkpoints/STEP] ...
    python -m research.clmae_judge --judge=runs/mae_fmnist --every_step --plot=judged.png runs/clmae_a runs/clmae_b

A run's own `difficulty` (learned-mask loss / random-mask loss of its own MAE) is biased low: its MAE trains only on
learned masks and grows used to them. Here an MAE trained on random masks (an MAE run of the same geometry) judges the
same masks. A judge meets any structured mask out of distribution, which biases it high, so every row also gives the
masks' inverse (the top-k of 1 - keep-probability: keep what the module would hide) as a control. --every_step
judges every kept checkpoint of each run, and --plot draws both difficulties against step beside lambda_CL.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image

from clmae_jax.models.clmae import CLMAE
from clmae_jax.runtime import checkpoint, data, loop
from clmae_jax.runtime.metrics import read_scalars
from clmae_jax.train_mae import random_masked_loss
from tools.charts import line_chart

flags.DEFINE_string("judge", None, "Workdir (or step folder) of an MAE run of the same geometry.", required=True)
flags.DEFINE_integer("images", 512, "Un-augmented eval-split images to measure on.")
flags.DEFINE_integer("random_masks", 4, "Random masks per image averaged for the baseline.")
flags.DEFINE_bool("every_step", False, "Judge every committed checkpoint of each run, not only its newest.")
flags.DEFINE_string("plot", "", "Where to write a PNG of difficulty against step per run (with --every_step).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "clmae_judge.json"),
                    "JSON path.")


def mask_losses(model: CLMAE, config, mae_params, images, keep) -> dict:
    """MAE loss under the learned mask, its inverse and random masks (mean over seeds), and the two ratios."""
    learned = float(model.learned_mask_loss(mae_params, images, keep)[0])
    inverse = float(model.learned_mask_loss(mae_params, images, 1.0 - keep)[0])
    random = float(np.mean([random_masked_loss(model.mae, config, mae_params, images, jax.random.PRNGKey(seed))[0]
                            for seed in range(flags.FLAGS.random_masks)]))
    return {"learned": learned, "inverse": inverse, "random": random, "difficulty": learned / random,
            "inverse_difficulty": inverse / random}


def lambda_before(workdir: str, step: int):
    """lambda_CL the module trained under just before checkpoint `step` (the last one logged before it), or None."""
    logged = read_scalars(workdir, "lambda_cl")
    earlier = [s for s in logged if s < step]
    return logged[max(earlier)] if earlier else None


def judge_run(path: str, judge_params) -> dict:
    """Losses of one CL-MAE checkpoint's learned masks under its own MAE and under the judge."""
    config, params, step = checkpoint.read_run(path)
    model = CLMAE(config)
    images = data.normalize(jnp.asarray(loop.fixed_batch(config, flags.FLAGS.images)), config.input.mean,
                            config.input.std)
    _, keep = model.keep_probabilities(params, images)
    workdir = checkpoint.resolve_step_folder(path)[0]
    return {"run": os.path.abspath(path), "workdir": workdir, "step": step,
            "lambda_cl_stages": config.clmae.get("curriculum_stages", 0),
            "lambda_cl": lambda_before(workdir, step),
            "own": mask_losses(model, config, params["mae"], images, keep),
            "judge": mask_losses(model, config, judge_params, images, keep)}


def checkpoints_to_judge(paths: list, every_step: bool) -> list:
    """The paths as given, or with every_step each workdir's committed step folders, oldest first."""
    found = []
    for path in paths:
        steps = checkpoint.committed_steps(checkpoint.checkpoints_directory(path)) if every_step else []
        found += [os.path.join(path, "checkpoints", str(step)) for step in steps] or [path]
    return found


def plot(rows: list, path: str):
    """Per run: the judge's and the own MAE's difficulty (learned and inverse masks) by step; lambda_CL below."""
    panels = []
    for workdir in dict.fromkeys(row["workdir"] for row in rows):
        mine = [row for row in rows if row["workdir"] == workdir]
        steps = [row["step"] for row in mine]
        curves = {f"{who} MAE: {kind}": (steps, [row[who][key] for row in mine])
                  for who in ("judge", "own") for kind, key in (("learned", "difficulty"),
                                                                 ("inverse", "inverse_difficulty"))}
        top = max(1.5, *(max(ys) for _, ys in curves.values())) + 0.1
        panels.append(line_chart(f"{os.path.basename(workdir)}: mask loss / random mask loss (> 1 harder)",
                                 curves, (0.5, top), hline=1.0))
        logged = [row for row in mine if row["lambda_cl"] is not None]
        panels.append(line_chart("lambda_CL the module trained under (> 0 partner, < 0 adversary)", {
            "lambda_CL": ([row["step"] for row in logged], [row["lambda_cl"] for row in logged])},
            (-1.1, 1.1), hline=0.0, size=(640, 160)))
    both = Image.new("RGB", (panels[0].width, sum(panel.height for panel in panels)), "white")
    for k, panel in enumerate(panels):
        both.paste(panel, (0, sum(above.height for above in panels[:k])))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    both.save(path)


def main(argv):
    """Judges every run given; prints the table and writes the JSON (and the PNG)."""
    if len(argv) < 2:
        sys.exit("usage: clmae_judge.py --judge=MAE_RUN CLMAE_RUN [CLMAE_RUN ...]")
    _, judge_params, judge_step = checkpoint.read_run(flags.FLAGS.judge)
    rows = [judge_run(path, judge_params) for path in checkpoints_to_judge(argv[1:], flags.FLAGS.every_step)]
    print(f"difficulty = MAE loss under the learned mask / under random masks; judge: {flags.FLAGS.judge}@{judge_step}")
    print("| run | step | own MAE: learned / inverse | judge: learned / inverse |\n|---|---|---|---|")
    for row in rows:
        own, judge = row["own"], row["judge"]
        print(f"| {row['run']} | {row['step']} | {own['difficulty']:.3f} / {own['inverse_difficulty']:.3f} | "
              f"{judge['difficulty']:.3f} / {judge['inverse_difficulty']:.3f} |")
    os.makedirs(os.path.dirname(flags.FLAGS.out), exist_ok=True)
    with open(flags.FLAGS.out, "w") as f:
        json.dump({"judge": os.path.abspath(flags.FLAGS.judge), "judge_step": judge_step, "images":
                   flags.FLAGS.images, "rows": rows}, f, indent=2)
    if flags.FLAGS.plot:
        plot(rows, flags.FLAGS.plot)


if __name__ == "__main__":
    app.run(main)
