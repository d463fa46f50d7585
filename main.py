"""Entry point: python main.py --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE ...].

The config's `experiment` field chooses what runs: "mae", "clmae", "cbm" (training), "cbm_eval" (the test
accuracy of the latest checkpoint in the workdir) or "eval" (kNN / linear probe / few-shot of a pretrained encoder).
"""
import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.abspath(__file__))
EXPERIMENTS = {  # config.experiment -> (module, function(config, workdir)).
    "mae": ("clmae_jax.train_mae", "train_and_evaluate"),
    "clmae": ("clmae_jax.train_clmae", "train_and_evaluate"),
    "cbm": ("cbm_jax.train_supervised", "train_and_evaluate"),
    "cbm_eval": ("cbm_jax.train_supervised", "evaluate_checkpoint"),
    "eval": ("clmae_jax.evaluate.run", "evaluate_encoder"),
}

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "mae_fashion_mnist.py")
config_flags.DEFINE_config_file("config", None, f"Experiment config file (configs/NAME.py[:variant]); default "
                                f"{os.path.relpath(DEFAULT_CONFIG, ROOT)}.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and pictures go; a rerun resumes from it.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs without a "
                    "cluster environment (otherwise TPU pods and SLURM are detected).")
flags.DEFINE_integer("num_processes", 0, "Number of processes with --coordinator_address.")
flags.DEFINE_integer("process_id", -1, "This process's index with --coordinator_address.")
flags.DEFINE_integer("peer_timeout_s", 120, "Seconds a process waits for a silent peer (not started, killed, host "
                     "gone) before it stops with an error naming it, instead of hanging.")
flags.mark_flags_as_required(["workdir"])

# Libraries whose INFO lines would drown the training log (orbax logs every file it writes).
QUIET_LIBRARIES = ("/orbax/", "/jax/_src/")


class QuietLibraries(logging.logging.Filter):
    """Drops INFO lines from QUIET_LIBRARIES; warnings and errors still pass."""

    def filter(self, record):
        return record.levelno > logging.logging.INFO or not any(q in record.pathname for q in QUIET_LIBRARIES)


def one_line(error: BaseException) -> str:
    """The last line of an exception's message (config-file errors embed a whole traceback)."""
    lines = [line.strip() for line in str(error).replace("\\n", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def parse_flags(argv):
    """absl flag parsing (default config when none is named); bad flags and unknown keys reported in one line."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
    try:
        remaining = flags.FLAGS(argv)
        flags.FLAGS.config.keys()  # Loads the config file now, so its errors are reported here too.
        return remaining
    except (AttributeError, KeyError) as e:
        sys.exit(f"error: unknown config key on the command line: {one_line(e).strip(chr(39))}")
    except (flags.Error, OSError, TypeError, ValueError) as e:
        sys.exit(f"error: bad command line: {one_line(e)}")


def main(argv):
    """Sets up the runtime and hands the config to the experiment it names."""
    del argv
    logging.get_absl_handler().addFilter(QuietLibraries())
    # Keep TensorFlow (input pipeline only) off the accelerators JAX owns.
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    from clmae_jax.runtime import lock, mesh, validate
    from clmae_jax.runtime.checkpoint import CheckpointError
    from clmae_jax.runtime.errors import UserError
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config.experiment not in EXPERIMENTS:
        raise app.UsageError(f"Unknown config.experiment {config.experiment!r}; use one of {sorted(EXPERIMENTS)}.")
    try:
        mesh.initialize_distributed(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                                    flags.FLAGS.process_id, flags.FLAGS.peer_timeout_s)
        validate.check_config(config, workdir)  # Before anything is built: a bad value fails in a second.
        with lock.acquire(workdir):
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
            logging.info("Config:\n%s", config)
            module, function = EXPERIMENTS[config.experiment]
            getattr(importlib.import_module(module), function)(config, workdir)
    except (UserError, FloatingPointError, CheckpointError, NotImplementedError) as e:
        # Bad input or a diverged run: the message names the problem and the fix; a traceback would bury it.
        # Other errors (shape bugs, crashes) keep their traceback.
        sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    app.run(main, flags_parser=parse_flags)
