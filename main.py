"""Entry point: python main.py --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE ...].

The config's `experiment` field chooses what runs: "mae", "clmae", "cbm", "finetune" (training), "cbm_eval" (the
test accuracy of the latest checkpoint of a cbm / finetune workdir) or "eval" (kNN / linear probe / few-shot of a
pretrained encoder).
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
    "finetune": ("cbm_jax.train_supervised", "train_and_evaluate"),  # The same trainer, masking off, a ViT.
    "cbm_eval": ("cbm_jax.train_supervised", "evaluate_checkpoint"),
    "eval": ("clmae_jax.evaluate.run", "evaluate_encoder"),
}

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "mae_fashion_mnist.py")
config_flags.DEFINE_config_file("config", None, f"Experiment config file (configs/NAME.py[:variant]); default "
                                f"{os.path.relpath(DEFAULT_CONFIG, ROOT)}.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and pictures go; a rerun resumes from it.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "Join a multi-process run: auto when JAX's cluster "
                  "detection finds several processes (Cloud TPU VM slices, SLURM, Open MPI, Kubernetes) or "
                  "--coordinator_address is given; on: always; off: never (a multi-process environment is then an "
                  "error).")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs without a "
                    "cluster environment.")
flags.DEFINE_integer("num_processes", 0, "Number of processes with --coordinator_address.")
flags.DEFINE_integer("process_id", -1, "This process's index with --coordinator_address.")
flags.DEFINE_integer("peer_timeout_s", 120, "Seconds a process waits for a silent peer (not started, killed, host "
                     "gone) before it stops with an error naming it, instead of hanging.")
flags.mark_flags_as_required(["workdir"])


def parse_flags(argv):
    """absl flag parsing (default config when none is named); bad flags and unknown keys reported in one line."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
    from clmae_jax.runtime.console import one_line
    try:
        remaining = flags.FLAGS(argv)
        flags.FLAGS.config.keys()  # Loads the config file now, so its errors are reported here too.
        return remaining
    except (AttributeError, KeyError) as e:
        sys.exit(f"error: unknown config key on the command line: {one_line(e).strip(chr(39))}")
    except (flags.Error, OSError, TypeError, ValueError) as e:
        sys.exit(f"error: bad command line: {one_line(e)}")


def main(argv):
    """Sets up the runtime and hands the config to the experiment it names; every way it ends is one line."""
    del argv
    from clmae_jax.runtime import console, peers
    if flags.FLAGS.config.experiment not in EXPERIMENTS:
        raise app.UsageError(f"Unknown config.experiment {flags.FLAGS.config.experiment!r}; use one of "
                             f"{sorted(EXPERIMENTS)}.")
    buffer = console.hold()
    logging.get_absl_handler().addFilter(console.ConsoleFilter())
    workdir = flags.FLAGS.workdir
    try:
        run(flags.FLAGS.config, workdir, buffer)
    except Exception as e:  # Not a user's mistake: one line here, the traceback in the log file.
        logging.exception("Run failed")
        peers.settle(flags.FLAGS.peer_timeout_s)  # On several processes a lost peer is the likelier cause.
        sys.exit(f"error: {type(e).__name__}: {console.one_line(e)} (the traceback is in "
                 f"{console.keep_in(workdir, buffer)}; please report it).")


def run(config, workdir: str, buffer):
    """Checks the config against the workdir's run, then runs the experiment; user errors exit with one line."""
    # Keep TensorFlow (input pipeline only) off the accelerators JAX owns.
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    from clmae_jax.runtime import console, distributed, lock, peers, preemption, run_config, validate
    from clmae_jax.runtime.checkpoint import CheckpointError
    from clmae_jax.runtime.errors import UserError
    try:
        distributed.initialize(flags.FLAGS.distributed, flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                               flags.FLAGS.process_id, flags.FLAGS.peer_timeout_s)
        module, function = EXPERIMENTS[config.experiment]
        experiment = importlib.import_module(module)
        # Before anything is built: a bad value fails in a second.
        validate.check_config(config, workdir, getattr(experiment, "OPTIONS", {}))
        with lock.acquire(workdir):
            run_config.check_resume(config, workdir)  # Before anything in the workdir changes.
            peers.watch(workdir, console.keep_in(workdir, buffer), flags.FLAGS.peer_timeout_s)
            if config.experiment == "eval":  # Its own output folder; training records its config once restored.
                run_config.record(config, workdir, 0)
            getattr(experiment, function)(config, workdir)
    except CheckpointError as e:
        peers.settle(flags.FLAGS.peer_timeout_s)  # A lost peer fails saves too; its line says more.
        sys.exit(f"error: {console.one_line(e)}")
    except (UserError, FloatingPointError, NotImplementedError) as e:
        # Bad input or a diverged run: the message names the problem and the fix; a traceback would bury it.
        logging.info("Traceback of the error", exc_info=True)  # For the log file only.
        sys.exit(f"error: {console.one_line(e)}")
    except preemption.Preempted as e:
        print(f"stopped on {e}", file=sys.stderr)
        sys.exit(preemption.PREEMPTED_EXIT)
    except KeyboardInterrupt:  # Ctrl-C before training started (the loop saves and stops on its own).
        sys.exit("interrupted before training started; nothing was saved.")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    app.run(main, flags_parser=parse_flags)
