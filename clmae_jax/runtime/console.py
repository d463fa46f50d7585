"""What a run prints and what it keeps: the console shows progress, metrics, warnings and at most one `error:`
line; everything logged, library tracebacks and what native code (XLA, gloo, TensorFlow) writes to stderr included,
goes to WORKDIR/main.log (main.<process>.log on processes other than 0). With a remote workdir (gs://) the log
stays on each host's local disk, in the folder `paths.host_log_dir` names (e.g. /tmp/clmae_jax_logs/gs/BUCKET/RUN).

Records and native output are held until `keep_in(workdir)`, which main.py calls once the resume check passed: a
refused resume leaves the workdir as it was, and a failure before that prints its one line and nothing else.
"""
import logging.handlers
import os
import sys
import tempfile

import jax
from absl import logging as absl_logging

from clmae_jax.runtime import paths

# Libraries whose INFO lines would drown the training log (orbax logs every file it writes).
QUIET_LIBRARIES = ("/orbax/", "/jax/_src/")
OUR_CODE = ("/clmae_jax/", "/cbm_jax/", "/main.py")


class ConsoleFilter(logging.Filter):
    """Passes our INFO and above and libraries' warnings logged as such; tracebacks, library errors, Python
    `warnings` and records logged with extra={"log_only": True} only reach the log file (the one `error:` line
    main.py prints says what failed)."""

    def filter(self, record):
        if record.exc_info or record.stack_info or getattr(record, "log_only", False):
            return False
        if record.name == "py.warnings":  # Python warnings of libraries (deprecations, pickle protocols): log only.
            return False
        ours = any(part in record.pathname for part in OUR_CODE)
        quiet = any(part in record.pathname for part in QUIET_LIBRARIES)
        if ours or not quiet:
            return record.levelno >= logging.INFO
        return record.levelno == logging.WARNING


class Held:
    """What a run writes before its log file exists: Python's log records (in memory) and what native code writes
    to file descriptor 2 (TensorFlow's and absl's start-up lines, XLA, a fatal error's stack; in a temporary file).
    From its creation on, Python's stderr is the console and fd 2 is not."""

    def __init__(self):
        # A full disk must not turn every log record into a traceback on the console: the run's error line says it.
        logging.raiseExceptions = False
        logging.captureWarnings(True)
        self.records = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
        logging.getLogger().addHandler(self.records)
        self.native = tempfile.TemporaryFile()
        console = os.dup(2)
        os.dup2(self.native.fileno(), 2)
        sys.stderr = os.fdopen(console, "w", buffering=1)
        absl_logging.get_absl_handler().python_handler.stream = sys.stderr
        self.path = None


def log_path(workdir: str) -> str:
    """This process's log file: in the workdir, or on this host's disk for a remote workdir."""
    index = jax.process_index()
    return os.path.join(paths.host_log_dir(workdir), "main.log" if index == 0 else f"main.{index}.log")


def keep_in(workdir: str, held: Held) -> str:
    """Writes what `held` holds to this process's log file, and every later record and native line as it comes;
    returns its path (in the temporary folder when the workdir cannot take it, e.g. it is a file)."""
    if held.path is not None:
        return held.path
    held.path = log_path(workdir)
    try:
        os.makedirs(os.path.dirname(held.path), exist_ok=True)
        log = open(held.path, "ab", buffering=0)
    except OSError:
        held.path = os.path.join(tempfile.gettempdir(), f"clmae_jax_main.{os.getpid()}.log")
        log = open(held.path, "ab", buffering=0)
    handler = logging.FileHandler(held.path)
    handler.setFormatter(logging.Formatter("%(levelname).1s%(asctime)s %(process)d %(filename)s:%(lineno)d] "
                                           "%(message)s"))
    held.records.setTarget(handler)
    held.records.flush()
    logging.getLogger().removeHandler(held.records)
    logging.getLogger().addHandler(handler)
    held.native.seek(0)
    with log:
        try:
            log.write(held.native.read())  # Native output from before the log existed, after the held records.
        except OSError:  # A full disk: the run's own error line says so when it matters.
            pass
        os.dup2(log.fileno(), 2)
    held.native.close()
    return held.path


def one_line(error: BaseException) -> str:
    """The last line of an exception's message (config-file errors embed a whole traceback)."""
    lines = [line.strip() for line in str(error).replace("\\n", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
