"""Entry point: python main.py --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE ...].

The config's `experiment` field chooses what runs: "mae", "clmae", "cbm", "finetune" (training), "cbm_eval" (the
test accuracy of the latest checkpoint of a cbm / finetune workdir) or "eval" (kNN / linear probe / few-shot of a
pretrained encoder).
"""
from clmae_jax.runtime import preemption

if __name__ == "__main__":  # Before the slow imports: a signal while they load ends the run with one line.
    preemption.stop_at_once_on_signals()

import difflib  # noqa: E402
import errno  # noqa: E402
import importlib.util  # noqa: E402
import logging as py_logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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


def config_of(argv):
    """The config that argv's --config=FILE[:variant] names, without the command line's overrides (None if it does
    not load)."""
    named = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    file, _, variant = named.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("named_config", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
    except Exception:  # A broken config file reports itself through the real parse.
        return None


def config_key_error(argv, error: BaseException) -> str:
    """The one line for an unknown --config.KEY: the key as typed, and the fields it may have meant."""
    from clmae_jax.runtime.run_config import as_dict, flatten
    typed = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
    config, fields = config_of(argv), []
    if config is not None:
        fields = list(flatten(as_dict(config)))
        typed = [t for t in typed if t not in fields] or typed
    key = typed[0] if typed else str(error).strip("'\"")
    leaf = key.split(".")[-1]
    close = [f for f in fields if f.split(".")[-1] == leaf] or difflib.get_close_matches(key, fields, n=3)
    hint = f"; did you mean {' or '.join(f'--config.{c}' for c in close)}?" if close else \
        "; see the config file for the fields it has."
    return f"error: unknown config field --config.{key}{hint}"


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
        sys.exit(config_key_error(argv, e))
    except (flags.Error, OSError, TypeError, ValueError) as e:
        if "Did you mean" in str(e) and "instead of" in str(e):  # ml_collections' typo hint for a config field.
            sys.exit(config_key_error(argv, e))
        sys.exit(f"error: bad command line: {one_line(e)}")


def main(argv):
    """Sets up the runtime and hands the config to the experiment it names; every way it ends is one line."""
    del argv
    from clmae_jax.runtime import console, peers
    if flags.FLAGS.config.experiment not in EXPERIMENTS:
        raise app.UsageError(f"Unknown config.experiment {flags.FLAGS.config.experiment!r}; use one of "
                             f"{sorted(EXPERIMENTS)}.")
    held = console.Held()  # From here on the console shows only our lines; the rest waits for the log file.
    logging.get_absl_handler().addFilter(console.ConsoleFilter())
    workdir = flags.FLAGS.workdir
    try:
        run(flags.FLAGS.config, workdir, held)
    except Exception as e:  # Not a user's mistake: one line here, the traceback in the log file.
        logging.exception("Run failed")
        peers.settle(flags.FLAGS.peer_timeout_s)  # On several processes a lost peer is the likelier cause.
        sys.exit(f"error: {type(e).__name__}: {console.one_line(e)} (the traceback is in "
                 f"{console.keep_in(workdir, held)}; please report it).")


def run(config, workdir: str, held):
    """Checks the config against the workdir's run, then runs the experiment; user errors exit with one line."""
    # Keep TensorFlow (input pipeline only) off the accelerators JAX owns.
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    from clmae_jax.runtime import console, distributed, lock, peers, run_config, validate
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
            peers.watch(workdir, console.keep_in(workdir, held), flags.FLAGS.peer_timeout_s)
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
        stop_preempted(e)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        logging.info("Traceback of the error", exc_info=True)
        sys.exit(f"error: {e.strerror} while writing {e.filename or 'the workdir or the log'}; free disk space (or "
                 "raise the quota), then rerun the same command to resume from the last checkpoint.")


def stop_preempted(stopped):
    """The one line, then exit without tearing anything down: the step is committed, and destroying a tf.data
    iterator can take longer than a preemption's grace period (38-40 s seen for one at step 30)."""
    import jax
    print(f"stopped on {stopped}", file=sys.stderr, flush=True)
    logging.flush()
    for handler in py_logging.getLogger().handlers:
        handler.flush()
    if jax.process_count() > 1:
        jax.distributed.shutdown()  # Leaves with the others: process 0 hosts the coordination service.
    os._exit(preemption.PREEMPTED_EXIT)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
