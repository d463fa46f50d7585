"""Finds and restores the encoder that config.encoder.checkpoint names.

Accepted: an MAE or CL-MAE workdir (its newest committed checkpoint, or config.encoder.step), one of its step
folders (WORKDIR/checkpoints/<step>), "raw_pixels", or anything else `clmae_jax.interop.load_pretrained` reads
(PyTorch .pth / .safetensors / Hugging Face folders). Only the encoder's leaves are read from disk: the decoder,
CL-MAE's masking module and the optimizer state stay on disk.
"""

import jax
import numpy as np

from clmae_jax.evaluate.encoder import RAW_PIXELS, Encoder, config_encoder, encoder_params, raw_pixels
from clmae_jax.interop import load_pretrained
from clmae_jax.models.geometry import Geometry, check_same_encoder, config_geometry
from clmae_jax.models.vit import vit_size
from clmae_jax.runtime.checkpoint import (is_run_folder, params_metadata, read_train_config, resolve_step_folder,
                                          restore_params)
from clmae_jax.runtime.errors import UserError

ENCODER_KEYS = ("patch_embed", "cls_token", "encoder")


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
    encoder = config_encoder(train_config, params, f"{workdir}@{step}", step=step)
    check_same_encoder(encoder.geometry, f"checkpoint {folder}", config_geometry(train_config),
                       f"its training config (model.size {train_config.model.size!r})")
    return encoder


def foreign_encoder(path: str, geometry: dict, params) -> Encoder:
    """The encoder part of MAE / CL-MAE weights imported from the PyTorch file at `path`."""
    params = encoder_params(params.get("mae", params))
    return Encoder(name=path, params=jax.tree.map(np.asarray, params), num_heads=int(geometry["num_heads"]),
                   mean=tuple(geometry["mean"]), std=tuple(geometry["std"]))


def load_foreign_encoder(path: str) -> Encoder:
    """A PyTorch / Hugging Face encoder through clmae_jax.interop (a missing file: validate.check_weights)."""
    return foreign_encoder(path, *load_pretrained(path))


def load_weights(path: str, step: int = -1) -> Encoder:
    """The pretrained encoder at `path`: a run folder (newest step, or `step`) or a PyTorch / Hugging Face file."""
    return load_run_encoder(path, step) if is_run_folder(path) else load_foreign_encoder(path)


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
