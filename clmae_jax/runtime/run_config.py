"""The config a workdir's run was started with, checked on every resume before anything in the workdir changes.

WORKDIR/config.json is the config of the latest start; WORKDIR/config_history.json lists every config the run
trained with and the step each one started at. A resume that changes a field the parameters depend on (model
geometry, image size, experiment) is refused in one line listing every changed field; other changes (batch size,
seed, schedule, ...) go on after one warning line that lists them, and enter the history.
"""
import json

import jax
from absl import logging

from clmae_jax.runtime import checkpoint, paths
from clmae_jax.runtime.errors import UserError

CONFIG_FILE, HISTORY_FILE = "config.json", "config_history.json"
# Experiments that evaluate a run of another experiment in its own workdir -> the experiments they read.
EVALUATES = {"cbm_eval": ("cbm", "finetune")}
# Fields whose change changes the parameters (their shapes or what they mean), except the compute-only fields
# below: a checkpoint of the old values is not a checkpoint of the new ones. A new model or masking-module field
# counts as one until it is listed as compute-only.
PARAMETER_FIELDS = ("experiment", "model.", "input.image_size", "input.channels", "clmae.masker.")
COMPUTE_ONLY = ("model.dtype", "model.attention", "model.remat", "model.init_from", "clmae.masker.temperature",
                "clmae.masker.logit_bound")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a.b.c": leaf} of nested dicts."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def as_dict(config) -> dict:
    """A ConfigDict as plain JSON data (what config.json holds)."""
    return json.loads(config.to_json_best_effort())


def changed_fields(old: dict, new: dict) -> dict:
    """{field: (old, new)} of every field whose value differs (absent: None)."""
    old, new = flatten(old), flatten(new)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def changes_parameters(field: str) -> bool:
    """True when a checkpoint written with another value of `field` holds other parameters."""
    return field.startswith(PARAMETER_FIELDS) and field not in COMPUTE_ONLY


def describe(changes: dict) -> str:
    """'model.size 'mini' -> 'tiny', seed 0 -> 5'."""
    return ", ".join(f"{field} {old!r} -> {new!r}" for field, (old, new) in changes.items())


def read(path: str):
    """A JSON file's content, None when absent or unreadable (a run killed while writing it)."""
    try:
        return json.loads(paths.read_text(path))
    except (OSError, ValueError):
        return None


def check_resume(config, workdir: str) -> dict:
    """The fields `config` changes against the run saved in `workdir` ({} for a new run); raises UserError when a
    checkpoint exists and a changed field changes the parameters. Writes nothing."""
    saved = read(paths.join(workdir, CONFIG_FILE))
    if saved is None or not checkpoint.committed_steps(checkpoint.checkpoints_directory(workdir)):
        return {}
    current = as_dict(config)
    # An evaluation of the run (cbm_eval) reads the trainer's checkpoints: the same experiment, as far as they go.
    if saved.get("experiment") in EVALUATES.get(current["experiment"], ()):
        current["experiment"] = saved["experiment"]
    changes = changed_fields(saved, current)
    refused = {k: v for k, v in changes.items() if changes_parameters(k)}
    if refused:
        raise UserError(f"--workdir={workdir} holds a run of another model; this config changes {describe(changes)}. "
                        f"Drop the changes to {', '.join(refused)} to resume, or use a new --workdir.")
    if changes:
        logging.warning("Resuming with a changed config: %s (kept in %s)", describe(changes), HISTORY_FILE)
    return changes


def write_json(path: str, content):
    """Writes JSON atomically: a crash leaves the old file."""
    paths.write_text(path, json.dumps(content, indent=2))


def record(config, workdir: str, start_step: int):
    """config.json := `config`; config_history.json gains it at `start_step` (entries from later steps, which
    this start retrains, are dropped). Process 0 only."""
    if jax.process_index() != 0:
        return
    history = [e for e in read(paths.join(workdir, HISTORY_FILE)) or [] if e["start_step"] < start_step]
    write_json(paths.join(workdir, HISTORY_FILE), [*history, {"start_step": start_step, "config": as_dict(config)}])
    write_json(paths.join(workdir, CONFIG_FILE), as_dict(config))
