"""PyTorch weight files: .pth/.bin (fb/mae's {"model": state dict} or bare), .safetensors and Hugging Face
folders read into numpy state dicts in fb/mae names (plus the hints their metadata and configs give), and written."""
import argparse
import io
import json
import os

import numpy as np

from clmae_jax.interop.hf import hf_to_fbmae, hints_from_hf_config, is_hf_state_dict, preprocessor_config
from clmae_jax.models.geometry import Geometry
from clmae_jax.runtime import paths
from clmae_jax.runtime.errors import MissingInputError, UserError


METADATA_KEY = "clmae_jax"  # Our .pth exports carry the geometry under this key, beside fb/mae's "model".


def to_numpy(value) -> np.ndarray:
    """A torch tensor (bfloat16 included) or array as numpy; floats widened to float32 where torch has no numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    return np.asarray(value)


def read_json(path: str) -> dict:
    """A JSON file's content, {} when there is none."""
    return json.loads(paths.read_text(path)) if paths.exists(path) else {}


def read_torch_file(path: str) -> tuple:
    """(state dict, metadata) of a .pth/.bin: {"model": state dict, ...} as fb/mae saves, or a bare state dict."""
    import torch
    # Official training checkpoints pickle an argparse.Namespace under "args"; that class is harmless to allow.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            content = torch.load(io.BytesIO(paths.read_bytes(path)), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for unreadable files; all mean the same to the user.
            if "weights_only" in str(e):  # torch's message advises loading it unsafely: never repeat that.
                raise UserError(f"{path} holds pickled objects other than tensors, which are never loaded (they "
                                "can run code); use a file of weights only (a state dict of tensors).") from e
            raise UserError(f"{path} is not a readable PyTorch weights file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}).") from e
    if not isinstance(content, dict):
        raise UserError(f"{path} holds a {type(content).__name__}, not a state dict.")
    if isinstance(content.get("model"), dict):
        return content["model"], content.get(METADATA_KEY) or {}
    return content, {}


def read_safetensors(path: str) -> dict:
    """A .safetensors file as a state dict of numpy arrays."""
    from safetensors.numpy import load
    return load(paths.read_bytes(path))


def read_file(path: str) -> tuple:
    """(state dict of numpy arrays, hints) from a .pth/.bin/.safetensors file or a Hugging Face folder."""
    folder = path if paths.isdir(path) else os.path.dirname(path)
    if paths.isdir(path):
        names = [n for n in ("model.safetensors", "pytorch_model.bin") if paths.exists(paths.join(path, n))]
        if not names:
            raise MissingInputError(f"{path} is a folder without model.safetensors or pytorch_model.bin.")
        path = paths.join(path, names[0])
    state_dict, hints = (read_safetensors(path), {}) if path.endswith(".safetensors") else read_torch_file(path)
    config = read_json(paths.join(folder, "config.json"))
    if config.get("model_type") in ("vit_mae", "vit"):
        hints = {**hints, **hints_from_hf_config(config, path)}
    processor = read_json(paths.join(folder, "preprocessor_config.json"))
    if "image_mean" in processor:
        hints = {**hints, "mean": tuple(processor["image_mean"]), "std": tuple(processor["image_std"])}
    return {k: to_numpy(v) for k, v in state_dict.items()}, hints


def read_state_dict(path: str) -> tuple:
    """(state dict in fb/mae names, hints) of any PyTorch file or Hugging Face folder the importers read."""
    if not paths.exists(path):
        raise MissingInputError(f"{path} does not exist.")
    state_dict, hints = read_file(path)
    return (hf_to_fbmae(state_dict, path) if is_hf_state_dict(state_dict) else state_dict), hints


def write_pth(state_dict: dict, geometry: Geometry, path: str):
    """Writes a numpy state dict as fb/mae saves it, {"model": state dict}, with our geometry under "clmae_jax"."""
    paths.makedirs(os.path.dirname(paths.absolute(path)))
    paths.write_bytes(path, torch_bytes({"model": as_tensors(state_dict), METADATA_KEY: dict(geometry)}))


def as_tensors(state_dict: dict) -> dict:
    """A numpy state dict as torch tensors."""
    import torch
    return {k: torch.from_numpy(v) for k, v in state_dict.items()}


def torch_bytes(content) -> bytes:
    """What torch.save writes for `content`."""
    import torch
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


def write_hf_folder(state_dict: dict, config: dict, geometry: Geometry, folder: str):
    """Writes a Hugging Face folder: config.json, preprocessor_config.json (the normalisation) and the weights."""
    paths.makedirs(folder)
    for name, content in (("config.json", config), ("preprocessor_config.json", preprocessor_config(geometry))):
        paths.write_text(paths.join(folder, name), json.dumps(content, indent=2))
    try:
        from safetensors.numpy import save
    except ImportError:  # transformers also reads the older pickle format.
        paths.write_bytes(paths.join(folder, "pytorch_model.bin"), torch_bytes(as_tensors(state_dict)))
        return
    # transformers refuses safetensors files whose metadata does not name their framework.
    paths.write_bytes(paths.join(folder, "model.safetensors"), save(state_dict, metadata={"format": "pt"}))

