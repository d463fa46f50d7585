"""Entry point: python main.py --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE ...].

The config's `experiment` field chooses what runs: "mae", "clmae" or "cbm".
"""
import importlib
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.abspath(__file__))
EXPERIMENTS = {
    "mae": "clmae_jax.train_mae",
    "clmae": "clmae_jax.train_clmae",
    "cbm": "cbm_jax.train_supervised",
}

config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "mae_fashion_mnist.py"),
                                "Experiment config file (configs/NAME.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and pictures go; a rerun resumes from it.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs without a "
                    "cluster environment (otherwise TPU pods and SLURM are detected).")
flags.DEFINE_integer("num_processes", 0, "Number of processes with --coordinator_address.")
flags.DEFINE_integer("process_id", -1, "This process's index with --coordinator_address.")
flags.mark_flags_as_required(["workdir"])

# Libraries whose INFO lines would drown the training log (orbax logs every file it writes).
QUIET_LIBRARIES = ("/orbax/", "/jax/_src/")


class QuietLibraries(logging.logging.Filter):
    """Drops INFO lines from QUIET_LIBRARIES; warnings and errors still pass."""

    def filter(self, record):
        return record.levelno > logging.logging.INFO or not any(q in record.pathname for q in QUIET_LIBRARIES)


def main(argv):
    """Sets up the runtime and hands the config to the experiment it names."""
    del argv
    logging.get_absl_handler().addFilter(QuietLibraries())
    # Keep TensorFlow (input pipeline only) off the accelerators JAX owns.
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    from clmae_jax.runtime import mesh
    mesh.initialize_distributed(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                                flags.FLAGS.process_id)
    config = flags.FLAGS.config
    if config.experiment not in EXPERIMENTS:
        raise app.UsageError(f"Unknown config.experiment {config.experiment!r}; use one of {sorted(EXPERIMENTS)}.")
    os.makedirs(flags.FLAGS.workdir, exist_ok=True)
    with open(os.path.join(flags.FLAGS.workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    logging.info("Config:\n%s", config)
    importlib.import_module(EXPERIMENTS[config.experiment]).train_and_evaluate(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    app.run(main)
