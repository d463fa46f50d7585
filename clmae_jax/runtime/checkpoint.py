"""Orbax checkpoints: periodic saves, keep-N, and a resume that survives what long runs meet.

Orbax writes each step into a temporary folder, puts `commit_success.txt` in it and renames it when complete, so a
crash mid-save leaves only a temporary folder (removed on the next start). Orbax keeps no checksums, though: random
bytes in a data file restore silently as wrong numbers. So once a save is on disk, process 0 adds `checksums.json`
(size and CRC-32 of every file) to the step folder, and restore checks it. A step that is uncommitted, fails its
checksums or does not restore is moved to WORKDIR/checkpoints_corrupt/<step>-<reason> (never deleted) and the
next older step is tried. A checkpoint of another model (a different tree or shapes) is an error, not corruption.

Readers of finished runs (evaluation, warm starts, export) find a run's step folder, its training config and its
parameters here too, so "committed step" has one definition.
"""
import json
import posixpath
import re
import zlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from clmae_jax.runtime import paths
from clmae_jax.runtime.errors import MissingInputError, UserError

MANIFEST = "checksums.json"
COMMIT_MARKER = "commit_success.txt"
CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or no checkpoint in the workdir that reads back."""


def file_digests(folder: str) -> dict:
    """{relative path: [size, crc32]} of every file under `folder` except the manifest."""
    digests = {}
    for rel in paths.files_under(folder):
        if rel.startswith(MANIFEST):  # The manifest and a temporary one a crash left behind.
            continue
        crc = size = 0
        with paths.open_file(paths.join(folder, rel)) as f:
            while chunk := f.read(CHUNK):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        digests[rel] = [size, crc]
    return digests


def write_manifest(folder: str):
    """Writes `folder`/checksums.json atomically (a crash leaves the old state: no manifest)."""
    paths.write_text(paths.join(folder, MANIFEST), json.dumps(file_digests(folder)))


def read_manifest(path: str):
    """{relative path: [size, crc32]} of a manifest; None when it is not one (garbled, cut short)."""
    try:
        manifest = json.loads(paths.read_text(path))
    except (OSError, ValueError):
        return None
    valid = isinstance(manifest, dict) and all(isinstance(v, list) and len(v) == 2 for v in manifest.values())
    return manifest if valid else None


def integrity_problem(folder: str) -> str | None:
    """Why the step folder is not a complete, intact checkpoint; None when it is (or has no manifest to check)."""
    if not paths.exists(paths.join(folder, COMMIT_MARKER)):
        return f"uncommitted (no {COMMIT_MARKER})"
    path = paths.join(folder, MANIFEST)
    if not paths.exists(path):
        return None  # Killed between orbax's commit and the manifest: restore reads it, then writes the manifest.
    expected = read_manifest(path)
    if expected is None:
        return f"garbled {MANIFEST}"
    for rel, (size, _) in sorted(expected.items()):  # Sizes first: cheap, and names truncation as such.
        file = paths.join(folder, rel)
        if not paths.exists(file):
            return f"missing {rel}"
        actual_size = paths.size(file)
        if actual_size != size:
            return f"truncated {rel}" if actual_size < size else f"resized {rel}"
    actual = file_digests(folder)
    bad = [rel for rel, digest in sorted(expected.items()) if actual[rel] != digest]
    return f"checksum mismatch in {bad[0]}" if bad else None


def leaf_shapes(tree) -> dict:
    """{"params/encoder/...": shape} of a pytree of arrays or array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in leaves}


def structure_mismatch(saved: dict, wanted: dict) -> str | None:
    """The first leaf where a checkpoint's shapes differ from this config's train state, in words."""
    for path, shape in wanted.items():
        if path not in saved:
            return f"{path} (shape {shape}) is in this config's train state but not in the checkpoint"
        if saved[path] != shape:
            return f"{path} has shape {saved[path]} in the checkpoint and {shape} in this config"
    extra = [path for path in saved if path not in wanted]
    return f"the checkpoint has {extra[0]} (shape {saved[extra[0]]}), which this config does not" if extra else None


def short(error: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}"


def io_reason(error: BaseException) -> str:
    """The operating system's words for a failed write (tensorstore wraps them), else the short error."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    found = re.search(r":\s*([^:\[\]]+?)\s*\[os_error_code='?(\d+)", str(error))
    return found.group(1) if found else short(error)


def checkpoints_directory(workdir: str) -> str:
    """Where a run's step folders live: WORKDIR/checkpoints."""
    return paths.absolute(paths.join(workdir, "checkpoints"))


def committed_steps(checkpoints_dir: str) -> list:
    """Steps under WORKDIR/checkpoints that orbax finalized and marked committed, oldest first."""
    if not paths.isdir(checkpoints_dir):
        return []
    steps = ocp.utils.checkpoint_steps(checkpoints_dir)
    return sorted(s for s in steps if paths.exists(paths.join(checkpoints_dir, str(s), COMMIT_MARKER)))


def is_run_folder(path: str) -> bool:
    """True for our own run folders (a workdir with checkpoints/, or a step folder with state/)."""
    return paths.isdir(paths.join(path, "checkpoints")) or paths.isdir(paths.join(path, "state"))


def resolve_step_folder(path: str, step: int = -1) -> tuple[str, str, int]:
    """(workdir, step folder, step) for a workdir (newest committed step, or `step` when >= 0) or a step folder."""
    path = paths.absolute(path)
    if paths.isdir(paths.join(path, "state")):  # A step folder: WORKDIR/checkpoints/<step>.
        return posixpath.dirname(posixpath.dirname(path)), path, int(posixpath.basename(path))
    steps = committed_steps(checkpoints_directory(path))
    if not steps:
        raise MissingInputError(f"No committed checkpoint under {path}/checkpoints; point the path at a workdir "
                                "of a finished or running run, or at one of its checkpoints/<step> folders.")
    if step >= 0 and step not in steps:
        raise MissingInputError(f"{path} has no checkpoint of step {step} (it has {steps}); choose one of those.")
    chosen = step if step >= 0 else steps[-1]
    return path, paths.join(path, "checkpoints", str(chosen)), chosen


def read_train_config(step_folder: str) -> ml_collections.ConfigDict:
    """The training config saved in a checkpoint (metadata/metadata), which says what its parameters are."""
    try:
        saved = json.loads(paths.read_text(paths.join(step_folder, "metadata", "metadata"))).get("config")
    except (OSError, ValueError):
        saved = None
    if not saved:
        raise MissingInputError(f"{step_folder} holds no training config (metadata/metadata), so its model is "
                                "unknown; point at a checkpoint main.py wrote.")
    return ml_collections.ConfigDict(saved)


def params_metadata(step_folder: str) -> dict:
    """The tree of parameter metadata (shapes, dtypes) of one of our checkpoints; nothing is read but metadata."""
    tree = ocp.PyTreeCheckpointer().metadata(paths.join(step_folder, "state"))
    tree = getattr(tree, "item_metadata", tree)
    return getattr(tree, "tree", tree)["params"]


def restore_params(step_folder: str, wanted: dict | None = None) -> dict:
    """The parameters of a checkpoint as numpy: all, or the subtree `wanted` of `params_metadata` (the optimizer
    state and every other leaf stay on disk)."""
    wanted = {"params": params_metadata(step_folder) if wanted is None else wanted}
    item = jax.tree.map(lambda m: np.zeros((), m.dtype), wanted)  # Leaf types only; shapes come from the files.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    return ocp.PyTreeCheckpointer().restore(paths.join(step_folder, "state"), args=args)["params"]


def read_run(path: str, step: int = -1) -> tuple:
    """(training config, parameters, step) of a run: a workdir (its newest committed step, or `step`) or a step
    folder."""
    workdir, folder, step = resolve_step_folder(path, step)
    return read_train_config(folder), restore_params(folder), step


class Checkpointer:
    """A CheckpointManager over `workdir/checkpoints` holding the train state and a small JSON of metadata."""

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = checkpoints_directory(workdir)
        self.corrupt_directory = paths.absolute(paths.join(workdir, "checkpoints_corrupt"))
        # cleanup_tmp_directories: temporary folders of saves a crash interrupted are never complete checkpoints.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.pending = None  # The step being written in the background, checksummed once it is on disk.

    def step_folder(self, step: int) -> str:
        """Where orbax keeps `step`."""
        return paths.join(self.directory, str(step))

    def latest_step(self):
        """The newest committed step folder, or None (restore falls back if it does not read back)."""
        return self.manager.latest_step()

    def save(self, step: int, state, metadata: dict):
        """Saves asynchronously; training continues while the write finishes. Raises CheckpointError (one line)
        when a write fails, e.g. a full disk; the previous checkpoint stays intact."""
        self.finish()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata))
        try:
            self.manager.save(step, args=args)
        except Exception as e:  # Orbax and tensorstore raise OSError, ValueError and others for failed writes.
            raise self.save_error(step, e) from e
        self.pending = step

    def finish(self):
        """Waits for the background save and writes its checksums; raises CheckpointError if it failed."""
        step, self.pending = self.pending, None
        if step is None:
            return
        try:
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                write_manifest(self.step_folder(step))
        except Exception as e:  # As in save: whatever the writer raises, the user needs the step and the reason.
            raise self.save_error(step, e) from e

    def save_error(self, step: int, error: BaseException) -> CheckpointError:
        """The one-line error for a failed save of `step`."""
        self.manager.reload()  # The failed step must not count as saved.
        previous = [s for s in self.manager.all_steps() if s != step]
        kept = f"the checkpoint of step {max(previous)} is intact" if previous else "no earlier checkpoint exists"
        return CheckpointError(f"Saving checkpoint step {step} in {self.directory} failed ({io_reason(error)}); "
                               f"{kept}. Free disk space (or fix the folder's permissions) and rerun to resume.")

    def restore(self, template_state, step=None):
        """Restores (state, metadata) at `step` (default: the newest that reads back) into the shardings of
        `template_state`. Steps that do not read back are moved to checkpoints_corrupt/ with a warning."""
        wanted = leaf_shapes(template_state)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore())
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        failed = []
        for candidate in steps:
            reason = self.problem(candidate, wanted)
            if reason is None:
                try:
                    restored = self.manager.restore(candidate, args=args)
                except Exception as e:  # Orbax raises many types for unreadable files.
                    reason = f"unreadable ({short(e)})"
            if reason is not None:
                failed.append((candidate, reason))
                continue
            self.set_aside(failed)
            self.add_missing_manifest(candidate)
            logging.info("Restored checkpoint %s%s", self.step_folder(candidate),
                         ", the newest that reads back" if failed else "")
            return restored["state"], restored["metadata"]
        raise CheckpointError(f"No checkpoint in {self.directory} can be restored: {self.describe(failed)}. "
                              f"Move those step folders elsewhere to start over, or use a new --workdir.")

    def problem(self, step: int, wanted: dict) -> str | None:
        """Why `step` cannot be restored (None: try it). Raises UserError when it holds another model."""
        reason = integrity_problem(self.step_folder(step))
        if reason is not None:
            return reason
        try:
            metadata = self.manager.item_metadata(step)["state"]
        except Exception as e:  # A missing or garbled _METADATA file.
            return f"unreadable metadata ({short(e)})"
        mismatch = structure_mismatch(leaf_shapes(getattr(metadata, "tree", metadata)), wanted)
        if mismatch:
            raise UserError(f"Checkpoint {self.step_folder(step)} was written by another config: {mismatch}; "
                            "use a new --workdir, or the config (experiment, model size) that wrote it.")
        return None

    def add_missing_manifest(self, step: int):
        """Checksums a step that restored but has none (a run killed between orbax's commit and the manifest)."""
        if jax.process_index() == 0 and not paths.exists(paths.join(self.step_folder(step), MANIFEST)):
            write_manifest(self.step_folder(step))
            logging.info("Wrote the missing %s of checkpoint step %d", MANIFEST, step)

    def describe(self, failed) -> str:
        """'step 6 (reason), step 5 (reason)'."""
        return ", ".join(f"step {step} ({reason})" for step, reason in failed) or "no step folders"

    def set_aside(self, failed):
        """Moves unusable step folders to checkpoints_corrupt/<step>-<reason> (process 0; the others wait)."""
        if failed and jax.process_index() == 0:
            paths.makedirs(self.corrupt_directory)
            for step, reason in failed:
                target = paths.join(self.corrupt_directory, f"{step}-{reason.split()[0].strip('()')}")
                while paths.exists(target):
                    target += "+"
                paths.rename(self.step_folder(step), target)
                logging.warning("Checkpoint step %d cannot be restored: %s; moved it to %s", step, reason, target)
        if failed and jax.process_count() > 1:
            ocp.multihost.sync_global_processes("clmae_checkpoint_set_aside")
        self.manager.reload()

    def close(self):
        """Blocks until pending saves are on disk (and checksummed)."""
        self.finish()
        self.manager.close()
