"""A lost process in a multi-process run: every survivor ends with one line and exit status PEER_LOST_EXIT.

JAX's coordination service notices a peer that stopped sending heartbeats (after --peer_timeout_s) or a coordinator
that went away (at once), and ends every other process through a fatal C++ log line, i.e. abort(); so it ends a
process that cannot join at all (a peer that never starts, an unreachable coordinator) after --peer_timeout_s. A
SIGABRT handler installed through ctypes turns that abort into one line (the lost process and the last committed
checkpoint, or who could not join where) and a plain exit; the C++ report itself goes to the log file (see
console.Held), where the handler reads which process was lost.
"""
import ctypes
import os
import re
import signal
import sys
import time

import jax
from absl import logging

from clmae_jax.runtime import checkpoint, jax_compat

PEER_LOST_EXIT = 69  # EX_UNAVAILABLE: a peer went away; rerun all processes.
_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int)
_installed = []  # Keeps the ctypes handler alive while it is installed.


def lost_process(log_text: str) -> str:
    """Which process the coordination service reported lost, from its C++ report in the log."""
    found = re.findall(r"stopped sending heartbeats\):\s*(?:\S*task:)?(\d+)", log_text)
    if found:
        return f"process {found[-1]}"
    return "process 0 (the coordinator)" if jax.process_index() != 0 else "a peer process"


def last_committed(workdir: str) -> str:
    """'step N in DIR', or that none was committed."""
    directory = checkpoint.checkpoints_directory(workdir)
    steps = checkpoint.committed_steps(directory)
    return f"step {steps[-1]} in {directory}" if steps else f"none yet (in {directory})"


def read_tail(path: str, size: int = 1 << 16) -> str:
    """The last `size` bytes of a text file ('' when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(os.path.getsize(path) - size, 0))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def exit_on_abort(line):
    """From now on an abort of this process (the coordination service's way of ending it) prints `line()` and
    exits with PEER_LOST_EXIT instead; the C++ report goes to the log (fd 2 is not the console, see console.Held)."""

    def on_abort(signum):
        del signum
        os.write(sys.stderr.fileno(), f"{line()}\n".encode())
        os._exit(PEER_LOST_EXIT)

    if not jax_compat.abort_ends_lost_peers():
        logging.warning("jax %s: the one-line report of a lost or missing peer was verified with jax %d.%d, whose "
                        "coordination service ends the survivors with abort(); this release may end them with its "
                        "own report instead.", jax.__version__, *jax_compat.TESTED_ABORT_BEHAVIOUR)
    handler = _HANDLER_TYPE(on_abort)
    libc = ctypes.CDLL(None)
    libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, _HANDLER_TYPE], ctypes.c_void_p
    libc.signal(signal.SIGABRT, handler)
    _installed[:] = [handler]


def watch(workdir: str, log_path: str, peer_timeout_s: int):
    """A lost peer from now on ends this process with one line naming it and the last committed checkpoint, and
    exit status PEER_LOST_EXIT. Multi-process runs only."""
    if jax.process_count() == 1:
        return
    exit_on_abort(lambda: f"error: lost {lost_process(read_tail(log_path))} of this {jax.process_count()}-process "
                          f"run (killed, preempted or its host gone; silent for up to {peer_timeout_s} s). Last "
                          f"committed checkpoint: {last_committed(workdir)}; rerun every process to resume from it.")


def settle(peer_timeout_s: int):
    """On several processes, gives a lost peer time to be noticed (its abort ends this process with the lost-peer
    line) before another error is reported; the coordination service notices within `peer_timeout_s`."""
    if _installed:
        time.sleep(peer_timeout_s + 5)
