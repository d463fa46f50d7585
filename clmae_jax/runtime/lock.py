"""One run per workdir: a lock in the workdir that names its holder.

On a local disk the lock is a kernel `flock` on WORKDIR/run.lock, so it ends with the process that holds it, kill -9
included: a crashed run never leaves a stuck lock. The file also records host and pid, for the error a second run
gets. On file systems without flock, the recorded holder is the lock: taken over when that process is gone (same
host).

An object store (gs://) has no locks. There WORKDIR/run.lock is an object written only if it is absent, or still
the generation the writer read (a generation-match precondition, through tensorstore, orbax's storage): of two
runs that start at once exactly one gets it. It names its holder and a lease that a thread of the holder renews
every LEASE_S / 3 seconds. A run that finds a lease not yet expired is refused; an expired one (a run killed or
preempted with its host) is taken over, and so is a lease whose holder is a finished process on this host. So a
killed run blocks its workdir for at most LEASE_S seconds from another host, and not at all from its own; hosts'
clocks must agree to well within LEASE_S (NTP does).

In a multi-process run only process 0 locks; the others are part of the same run.
"""
import errno
import fcntl
import json
import os
import socket
import threading
import time

import jax
from absl import logging

from clmae_jax.runtime import paths
from clmae_jax.runtime.errors import UserError

LOCK_FILE = "run.lock"
LEASE_S = 60.0


class WorkdirLock:
    """A held local lock (or a no-op on processes other than 0); `release()` or use it as a context manager."""

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


class LeaseLock(WorkdirLock):
    """A held lock object on an object store, its lease renewed by a thread until `release()`."""

    def __init__(self, store, generation: bytes, holder: dict):
        super().__init__()
        self.store, self.generation, self.holder = store, generation, holder
        self.stop = threading.Event()
        self.renewer = threading.Thread(target=self.renew_until_released, daemon=True)
        self.renewer.start()

    def renew_until_released(self):
        """Extends the lease every LEASE_S / 3 s; a lost lock (taken over while this process stalled) is logged."""
        while not self.stop.wait(LEASE_S / 3):
            holder = {**self.holder, "expires": time.time() + LEASE_S}
            generation = self.store.write(LOCK_FILE, json.dumps(holder), if_equal=self.generation).result().generation
            if not generation:
                logging.error("Another run took over the lock %s after this one stalled past its lease.", LOCK_FILE)
                return
            self.generation = generation

    def release(self):
        """Stops renewing and deletes the lock object, unless another run holds it by now."""
        if self.store is not None:
            self.stop.set()
            self.renewer.join()
            self.store.write(LOCK_FILE, None, if_equal=self.generation).result()
            self.store = None


def read_holder(path: str) -> dict:
    """{"host", "pid"} recorded in the local lock file ({} when unreadable)."""
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


def gone_here(holder: dict) -> bool:
    """True when `holder` names a process of this host, other than this one, that has ended."""
    another_here = holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid()
    return another_here and not alive_here(holder)


def refuse(workdir: str, holder: dict) -> UserError:
    """The one-line error for a workdir another run holds."""
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    return UserError(f"--workdir={workdir} is in use by another run ({who}); wait for it to finish, stop it, or "
                     "use another --workdir.")


def acquire(workdir: str) -> WorkdirLock:
    """Locks `workdir` for this run; raises UserError naming the holder when a live run has it."""
    if jax.process_index() != 0:
        return WorkdirLock()
    return acquire_lease(workdir) if paths.is_remote(workdir) else acquire_local(workdir)


def acquire_local(workdir: str) -> WorkdirLock:
    """The flock of a local workdir (see the module doc)."""
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


def lock_store(workdir: str):
    """The workdir as a tensorstore key-value store (its conditional writes carry the generation preconditions)."""
    import tensorstore as ts
    return ts.KvStore.open(paths.absolute(workdir) + "/").result()


def acquire_lease(workdir: str) -> LeaseLock:
    """The lock object of a workdir on an object store (see the module doc)."""
    store = lock_store(workdir)
    found = store.read(LOCK_FILE).result()
    previous = json.loads(found.value) if found.state == "value" else {}
    if previous and previous.get("expires", 0) > time.time() and not gone_here(previous):
        raise refuse(workdir, previous)
    holder = {"host": socket.gethostname(), "pid": os.getpid()}
    generation = store.write(LOCK_FILE, json.dumps({**holder, "expires": time.time() + LEASE_S}),
                             if_equal=found.stamp.generation).result().generation
    if not generation:  # Another run wrote the lock object since it was read: it started first.
        raise refuse(workdir, json.loads(store.read(LOCK_FILE).result().value or "{}"))
    if previous:
        logging.warning("Taking over %s/%s from a run that ended without releasing it (pid %s on %s)", workdir,
                        LOCK_FILE, previous.get("pid"), previous.get("host"))
    return LeaseLock(store, generation, holder)
