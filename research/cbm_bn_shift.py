"""Do CBM's masked epochs leave BatchNorm statistics that do not fit unmasked test images?

    python -m research.cbm_bn_shift runs/cbm_sweep/cbm_s0 runs/cbm_sweep/baseline_s0 ... [--batches=100]

BatchNorm's running mean and variance follow the inputs of the last few hundred training steps; in a CBM run those
are masked images (mid-grey cells), while the test images are whole. For each run's newest checkpoint this measures
the unmasked test accuracy as saved, then again after re-estimating only the running statistics on --batches
unmasked training batches (same weights, training-mode forward passes, no gradient step). A large gain for CBM and
none for the baseline means the masks shifted the statistics. Table to stdout, JSON to --out (runs measured there
before with the same --batches are kept).
"""
import itertools
import os

import jax
from absl import app, flags

from cbm_jax import train_supervised as cbm
from clmae_jax.runtime import checkpoint, data
from research import sweeps

FLAGS = flags.FLAGS


def reestimated(model, config, state, batches):
    """`state` with BatchNorm running statistics re-estimated on unmasked `batches` (weights unchanged)."""
    normalize = lambda images: data.normalize(images, config.input.mean, config.input.std)
    update = jax.jit(lambda params, model_state, images: model.apply(
        {"params": params, **model_state}, normalize(images), train=True, mutable=["batch_stats"],
        rngs={"dropout": jax.random.PRNGKey(0)})[1])
    model_state = state.model_state
    for batch in batches:
        model_state = update(state.params, model_state, batch["image"])
    return state.replace(model_state=model_state)


def measure(workdir: str, num_batches: int) -> dict:
    """Test accuracy of a run's newest checkpoint as saved and with re-estimated BatchNorm statistics."""
    workdir, folder, step = checkpoint.resolve_step_folder(workdir)
    config = checkpoint.read_train_config(folder)
    with cbm.restored(config, workdir) as (run, experiment, state, evaluator):
        iterator, _ = data.eval_iterator(config.input, run.source, config.batch_size)
        batches = itertools.islice(iterator, num_batches)
        saved = evaluator.run(state)["test_accuracy"]
        fresh = evaluator.run(reestimated(experiment.model, config, state, batches))["test_accuracy"]
        last_epoch_cells = int(experiment.patches[run.budget.epoch(step - 1)])
    return {"step": step, "last_epoch_cells": last_epoch_cells, "saved": 100 * saved, "reestimated": 100 * fresh}


def main(argv):
    """Prints the table and writes the JSON."""
    earlier = sweeps.read(FLAGS.out)  # Runs measured before with the same number of batches stay in the table.
    results = earlier["runs"] if earlier.get("batches") == FLAGS.batches else {}
    results.update({os.path.basename(path.rstrip("/")): measure(path, FLAGS.batches) for path in argv[1:]})
    print(f"| run | cells masked in the last epoch | test acc as saved | BN statistics re-estimated on "
          f"{FLAGS.batches} unmasked batches | gain |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['last_epoch_cells']} | {r['saved']:.2f} | {r['reestimated']:.2f} | "
              f"{r['reestimated'] - r['saved']:+.2f} |")
    sweeps.write(FLAGS.out, {"batches": FLAGS.batches, "runs": results})


if __name__ == "__main__":  # Flags only as a script (tests import the functions).
    flags.DEFINE_integer("batches", 100, "Unmasked training batches (of the run's batch size) to re-estimate on.")
    flags.DEFINE_string("out", "research/results/cbm_bn_shift.json", "Where the JSON goes.")
    app.run(main)
