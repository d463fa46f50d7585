"""What a run prints and what it keeps: the console shows progress, metrics, warnings and at most one `error:`
line; everything logged, library tracebacks and what native code (XLA, gloo, TensorFlow) writes to stderr included,
goes to WORKDIR/main.log (main.<process>.log on processes other than 0). With a remote workdir (gs://) the log
stays on each host's local disk, in the folder `paths.host_log_dir` names (e.g. /tmp/clmae_jax_logs/gs/BUCKET/RUN).

Records are held in memory until `keep_in(workdir)`, which main.py calls once the resume check passed: a refused
resume leaves the workdir as it was.
"""
import logging.handlers
import os
import sys

import jax
from absl import logging as absl_logging

from clmae_jax.runtime import paths

# Libraries whose INFO lines would drown the training log (orbax logs every file it writes).
QUIET_LIBRARIES = ("/orbax/", "/jax/_src/")
OUR_CODE = ("/clmae_jax/", "/cbm_jax/", "/main.py")


class ConsoleFilter(logging.Filter):
    """Passes our INFO and above and libraries' warnings; tracebacks and library errors only reach the log file
    (the one `error:` line main.py prints says what failed)."""

    def filter(self, record):
        if record.exc_info or record.stack_info:
            return False
        ours = any(part in record.pathname for part in OUR_CODE)
        quiet = any(part in record.pathname for part in QUIET_LIBRARIES)
        if ours or not quiet:
            return record.levelno >= logging.INFO
        return record.levelno == logging.WARNING


def hold() -> logging.handlers.MemoryHandler:
    """Starts holding every log record in memory (written out by `keep_in`)."""
    buffer = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(buffer)
    return buffer


def log_path(workdir: str) -> str:
    """This process's log file: in the workdir, or on this host's disk for a remote workdir."""
    index = jax.process_index()
    return os.path.join(paths.host_log_dir(workdir), "main.log" if index == 0 else f"main.{index}.log")


def keep_in(workdir: str, buffer: logging.handlers.MemoryHandler) -> str:
    """Writes the held records to this process's log file, and every later one as it comes; returns its path."""
    path = log_path(workdir)
    if buffer.target is not None:  # Kept already.
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(levelname).1s%(asctime)s %(process)d %(filename)s:%(lineno)d] "
                                           "%(message)s"))
    buffer.setTarget(handler)
    buffer.flush()
    logging.getLogger().removeHandler(buffer)
    logging.getLogger().addHandler(handler)
    native_stderr_to(path)
    return path


def native_stderr_to(path: str):
    """Points file descriptor 2 (where C++ libraries write) at `path`; Python's stderr keeps the console."""
    console = os.dup(2)
    native = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(native, 2)
    os.close(native)
    sys.stderr = os.fdopen(console, "w", buffering=1)
    absl_logging.get_absl_handler().python_handler.stream = sys.stderr


def one_line(error: BaseException) -> str:
    """The last line of an exception's message (config-file errors embed a whole traceback)."""
    lines = [line.strip() for line in str(error).replace("\\n", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
