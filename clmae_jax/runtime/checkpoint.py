"""Orbax checkpoints: periodic and final saves, keep-N, resume from the latest good step in the workdir.

Orbax writes each step into a temporary folder and renames it when complete, so a crash mid-save leaves the last
good checkpoint untouched and the partial one is ignored.
"""
import os

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be read back."""


class Checkpointer:
    """A CheckpointManager over `workdir/checkpoints` holding the train state and a small JSON of metadata."""

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        """The newest complete step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state, metadata: dict):
        """Saves asynchronously; training continues while the write finishes."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata))
        self.manager.save(step, args=args)

    def restore(self, template_state, step=None):
        """Restores (state, metadata) at `step` (default: latest) into the shardings of `template_state`."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:  # Orbax raises many types for unreadable or mismatched files.
            raise CheckpointError(
                f"Checkpoint {self.directory}/{step} cannot be restored ({type(e).__name__}: {str(e)[:200]}); "
                f"delete that step folder to resume from the one before, or use a new --workdir.") from e
        logging.info("Restored checkpoint %s/%d", self.directory, step)
        return restored["state"], restored["metadata"]

    def close(self):
        """Blocks until pending saves are on disk."""
        self.manager.wait_until_finished()
        self.manager.close()
