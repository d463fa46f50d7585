"""One run per workdir: a lock file in the workdir that names its holder.

The lock is a kernel `flock` on WORKDIR/run.lock, so it ends with the process that holds it, kill -9 included: a
crashed run never leaves a stuck lock. The file also records host and pid, for the error a second run gets. On file
systems without flock, the recorded holder is the lock: taken over when that process is gone (same host).
In a multi-process run only process 0 locks; the others are part of the same run.
"""
import errno
import fcntl
import json
import os
import socket

import jax
from absl import logging

from clmae_jax.runtime.errors import UserError

LOCK_FILE = "run.lock"


class WorkdirLock:
    """A held lock (or a no-op on processes other than 0); `release()` or use it as a context manager."""

    def __init__(self, fd: int | None = None):
        self.fd = fd

    def release(self):
        """Gives the workdir free for the next run."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # An empty file: the next run sees a clean hand-over, not a crash.
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def read_holder(path: str) -> dict:
    """{"host", "pid"} recorded in the lock file ({} when unreadable)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def alive_here(holder: dict) -> bool:
    """True when `holder` is a live process on this host other than this one."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Exists, owned by another user.
        return True
    return True


def refuse(workdir: str, holder: dict) -> UserError:
    """The one-line error for a workdir another run holds."""
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    return UserError(f"--workdir={workdir} is in use by another run ({who}); wait for it to finish, stop it, or "
                     "use another --workdir.")


def acquire(workdir: str) -> WorkdirLock:
    """Locks `workdir` for this run; raises UserError naming the holder when a live run has it."""
    if jax.process_index() != 0:
        return WorkdirLock()
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise refuse(workdir, read_holder(path)) from e
        # No flock here (some network file systems): the recorded holder decides.
        if alive_here(read_holder(path)):
            os.close(fd)
            raise refuse(workdir, read_holder(path)) from e
        logging.warning("%s does not support file locks; relying on the pid recorded in %s", workdir, path)
    previous = read_holder(path)
    if previous:
        logging.warning("Taking over %s from a run that ended without releasing it (pid %s on %s)", path,
                        previous.get("pid"), previous.get("host"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
    return WorkdirLock(fd)
