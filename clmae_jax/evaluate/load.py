"""Finds and restores the encoder that config.encoder.checkpoint names.

Accepted: an MAE or CL-MAE workdir (its newest committed checkpoint, or config.encoder.step), one of its step
folders (WORKDIR/checkpoints/<step>), "raw_pixels", or anything else `clmae_jax.interop.load_pretrained` reads
(PyTorch .pth / .safetensors / Hugging Face folders). Only the encoder's leaves are read from disk: the decoder,
CL-MAE's masking module and the optimizer state stay on disk.
"""
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from clmae_jax.evaluate.encoder import RAW_PIXELS, Encoder, encoder_params, raw_pixels
from clmae_jax.models.geometry import Geometry, check_same_encoder, config_geometry
from clmae_jax.models.vit import vit_size
from clmae_jax.runtime.checkpoint import checkpoints_directory, committed_steps
from clmae_jax.runtime.errors import MissingInputError, UserError

ENCODER_KEYS = ("patch_embed", "cls_token", "encoder")


def resolve_step_folder(path: str, step: int = -1) -> tuple[str, str, int]:
    """(workdir, step folder, step) for a workdir (newest step, or `step` when >= 0) or a step folder."""
    path = os.path.abspath(path.rstrip("/"))
    if os.path.isdir(os.path.join(path, "state")):  # A step folder: WORKDIR/checkpoints/<step>.
        return os.path.dirname(os.path.dirname(path)), path, int(os.path.basename(path))
    steps = committed_steps(checkpoints_directory(path))
    if not steps:
        raise MissingInputError(f"No committed checkpoint under {path}/checkpoints; point config.encoder.checkpoint at "
                                "an MAE / CL-MAE workdir or one of its checkpoints/<step> folders.")
    if step >= 0 and step not in steps:
        raise MissingInputError(f"{path} has no checkpoint of step {step} (it has {steps}); fix config.encoder.step.")
    chosen = step if step >= 0 else steps[-1]
    return path, os.path.join(path, "checkpoints", str(chosen)), chosen


def is_workdir_or_step(path: str) -> bool:
    """True for our own run folders (a workdir with checkpoints/, or a step folder with state/)."""
    return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(os.path.join(path, "state"))


def read_train_config(workdir: str, step_folder: str) -> ml_collections.ConfigDict:
    """The training config of a checkpoint: saved in it (metadata/metadata), or for checkpoints written before
    that, the WORKDIR/config.json of its run."""
    try:
        with open(os.path.join(step_folder, "metadata", "metadata")) as f:
            saved = json.load(f).get("config")
    except (OSError, ValueError):
        saved = None
    if saved:
        return ml_collections.ConfigDict(saved)
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise MissingInputError(f"{path} not found: the encoder's geometry (ViT size) is unknown; the run's workdir "
                                "must hold the config.json main.py writes.")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def params_metadata(step_folder: str) -> dict:
    """The tree of parameter metadata (shapes, dtypes) of one of our checkpoints; nothing is read but metadata."""
    tree = ocp.PyTreeCheckpointer().metadata(os.path.join(step_folder, "state"))
    tree = getattr(tree, "item_metadata", tree)
    return getattr(tree, "tree", tree)["params"]


def restore_params(step_folder: str, wanted: dict | None = None) -> dict:
    """The parameters of a checkpoint as numpy: all, or the subtree `wanted` of `params_metadata` (the optimizer
    state and every other leaf stay on disk)."""
    wanted = {"params": params_metadata(step_folder) if wanted is None else wanted}
    item = jax.tree.map(lambda m: np.zeros((), m.dtype), wanted)  # Leaf types only; shapes come from the files.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    return ocp.PyTreeCheckpointer().restore(os.path.join(step_folder, "state"), args=args)["params"]


def restore_encoder_params(step_folder: str) -> dict:
    """The MAE encoder leaves of a checkpoint as numpy (MAE: params/..., CL-MAE: params/mae/...), nothing else."""
    params = params_metadata(step_folder)
    mae = params["mae"] if "mae" in params else params
    missing = [k for k in ENCODER_KEYS if k not in mae]
    if missing:
        raise UserError(f"{step_folder} holds no MAE encoder (no params/{missing[0]}); point config.encoder.checkpoint "
                        "at an MAE or CL-MAE run.")
    wanted = {k: mae[k] for k in ENCODER_KEYS}
    restored = restore_params(step_folder, {"mae": wanted} if "mae" in params else wanted)
    return restored["mae"] if "mae" in params else restored


def load_run_encoder(path: str, step: int = -1) -> Encoder:
    """The encoder of an MAE / CL-MAE workdir or step folder, geometry checked against the config it was saved
    with."""
    workdir, folder, step = resolve_step_folder(path, step)
    train_config = read_train_config(workdir, folder)
    params = restore_encoder_params(folder)
    encoder = Encoder(name=f"{workdir}@{step}", params=params, num_heads=vit_size(train_config.model.size)["num_heads"],
                      mean=tuple(train_config.input.mean), std=tuple(train_config.input.std), step=step)
    check_same_encoder(encoder.geometry, f"checkpoint {folder}", config_geometry(train_config),
                       f"its training config (model.size {train_config.model.size!r})")
    return encoder


def foreign_encoder(path: str, geometry: dict, params) -> Encoder:
    """The encoder part of MAE / CL-MAE weights imported from the PyTorch file at `path`."""
    params = encoder_params(params.get("mae", params))
    return Encoder(name=path, params=jax.tree.map(np.asarray, params), num_heads=int(geometry["num_heads"]),
                   mean=tuple(geometry["mean"]), std=tuple(geometry["std"]))


def load_foreign_encoder(path: str) -> Encoder:
    """A PyTorch / Hugging Face encoder through clmae_jax.interop."""
    from clmae_jax.interop import load_pretrained
    if not os.path.exists(path):
        raise MissingInputError(f"config.encoder.checkpoint={path} does not exist.")
    return foreign_encoder(path, *load_pretrained(path))


def load_weights(path: str, step: int = -1) -> Encoder:
    """The pretrained encoder at `path`: a run folder (newest step, or `step`) or a PyTorch / Hugging Face file."""
    return load_run_encoder(path, step) if is_workdir_or_step(path) else load_foreign_encoder(path)


def check_expected_geometry(encoder: Encoder, encoder_config):
    """config.encoder.size / patch_size, when set, must match the weights: the wrong run fails before extraction."""
    size, patch = encoder_config.get("size", ""), encoder_config.get("patch_size", 0)
    if not (size or patch):
        return
    found = encoder.geometry
    width, depth = (vit_size(size)["width"], vit_size(size)["depth"]) if size else (found.width, found.depth)
    wanted = Geometry(width, depth, patch or found.patch_size, found.channels)
    check_same_encoder(found, f"encoder {encoder.name}", wanted, f"config.encoder (size {size!r}, patch_size {patch})")


def load_encoder(config) -> Encoder:
    """The encoder config.encoder names, checked against config.encoder's optional geometry and normalisation."""
    ec = config.encoder
    path = ec.checkpoint
    if not path:
        raise UserError("config.encoder.checkpoint is empty; set it to an MAE / CL-MAE workdir, a checkpoint step "
                        f"folder, a PyTorch weights file or {RAW_PIXELS!r}.")
    if path == RAW_PIXELS:
        return raw_pixels(config.input.mean, config.input.std)
    encoder = load_weights(path, ec.get("step", -1))
    check_expected_geometry(encoder, ec)
    overrides = {k: tuple(ec[k]) for k in ("mean", "std") if ec.get(k)}
    return Encoder(**{**encoder.__dict__, **overrides, "dtype": ec.get("dtype", "float32"),
                      "attention": ec.get("attention", "einsum")})
