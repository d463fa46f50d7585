"""Preemption: SIGTERM (the notice of Cloud TPU and most schedulers) or SIGINT ends a run after a saved step.

The signal only sets a flag; the loop finishes the step it is in, saves a committed checkpoint of it and raises
`Preempted`, which main.py turns into one line and exit status PREEMPTED_EXIT. A second signal while saving only
sets the flag again, so the save is never cut short. On several processes they must save the same step: there the
SIGTERM handler of JAX's preemption sync manager (set up by `jax.distributed.initialize`) takes the notice and
`multihost_utils.reached_preemption_sync_point` names the step every process saves; SIGINT is passed on to it as a
SIGTERM.
"""
import os
import signal
import sys

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request, rerun to resume (not a crash, not a kill).


def stop_at_once(number, frame):
    """A signal outside the training loop (starting up, compiling, restoring, evaluating): nothing is being saved,
    so the process ends now with one line; what is on disk is as after a kill -9, which every reader survives."""
    del frame
    print(f"stopped on {signal.Signals(number).name} outside training (nothing was being saved); rerun the same "
          "command to resume.", file=sys.stderr, flush=True)
    os._exit(PREEMPTED_EXIT)


def stop_at_once_on_signals():
    """SIGTERM and SIGINT end the process at once until the training loop's `Watch` takes them (main.py sets this
    first: Ctrl-C while TensorFlow imports would otherwise print a traceback, or vanish in a gc callback)."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, stop_at_once)


class Preempted(Exception):
    """The run saved `step` and stopped because it was asked to (a signal), not because something failed."""

    def __init__(self, step: int, directory: str, signal_name: str):
        super().__init__(f"{signal_name}: saved step {step} in {directory}; rerun the same command to resume.")
        self.step = step


class Watch:
    """Installs the handlers for the duration of a `with` block; `reached(step)` says when to save and stop."""

    def __init__(self):
        self.signal_name = None
        self.previous = {}

    def __enter__(self):
        import jax  # Imported here: main.py sets stop_at_once_on_signals before JAX loads.
        multi = jax.process_count() > 1
        self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self.forward if multi else self.note)
        if not multi:  # On several processes JAX's own SIGTERM handler must see the notice (see module doc).
            self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self.note)
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            if handler is not None:  # None: a handler set outside Python (JAX's), which stays.
                signal.signal(number, handler)

    def note(self, number, frame):
        """Records the first signal; the loop acts on it at the end of the current step."""
        del frame
        self.signal_name = self.signal_name or signal.Signals(number).name

    def forward(self, number, frame):
        """SIGINT on several processes: noted, and sent on as the SIGTERM the sync manager listens for."""
        self.note(number, frame)
        os.kill(os.getpid(), signal.SIGTERM)

    def hold(self):
        """From here on (the final save) every signal is only noted, JAX's handler included."""
        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous.setdefault(number, signal.getsignal(number))
            signal.signal(number, self.note)

    def reached(self, step: int) -> bool:
        """True at the step to save and stop at: the signalled one, or on several processes the one they agree on."""
        import jax
        from jax.experimental import multihost_utils
        if jax.process_count() > 1:
            reached = multihost_utils.reached_preemption_sync_point(step)
            self.signal_name = self.signal_name or ("SIGTERM" if reached else None)
            return reached
        return self.signal_name is not None
