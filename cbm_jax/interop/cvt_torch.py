"""CvT weights from PyTorch into the Flax `cbm_jax.models.cvt.CvT`.

Two key layouts are understood, told apart by their keys:
- official microsoft/CvT (`CvT-13-224x224-IN-1k.pth`: `stage0.patch_embed.proj.weight`, `norm.weight`, `head.weight`,
  ...), also as saved by CBM after fine-tuning (`norm_final.weight`);
- Hugging Face `CvtForImageClassification` (`cvt.encoder.stages.0.embedding...`, `layernorm`, `classifier`), which
  is first renamed to the official layout.

Torch is imported only to read a .pth file: converting an already-loaded state dict of numpy arrays (or CPU
tensors) needs numpy and jax alone.
"""
import io
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from cbm_jax.models.cvt import CVT_13, CvT, dense_init, head_bias_init
from clmae_jax.runtime import paths
from clmae_jax.runtime.errors import UserError

# Hugging Face -> official names, applied in order: "attention.output.dense" must go before "output.dense".
HF_TO_OFFICIAL = (
    (r"^cvt\.encoder\.stages\.(\d+)\.", r"stage\1."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
    (r"\.embedding\.convolution_embeddings\.projection\.", ".patch_embed.proj."),
    (r"\.embedding\.convolution_embeddings\.normalization\.", ".patch_embed.norm."),
    (r"\.layers\.(\d+)\.", r".blocks.\1."),
    (r"\.attention\.attention\.convolution_projection_(q|k|v)\w*\.convolution_projection\.convolution\.",
     r".attn.conv_proj_\1.conv."),
    (r"\.attention\.attention\.convolution_projection_(q|k|v)\w*\.convolution_projection\.normalization\.",
     r".attn.conv_proj_\1.bn."),
    (r"\.attention\.attention\.projection_(q|k|v)\w*\.", r".attn.proj_\1."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
)


def read_pth(path: str) -> dict:
    """A .pth state dict as {name: float32 or integer numpy array}; the only place torch is imported."""
    import torch  # pylint: disable=g-import-not-at-top  # Weight import only, never the runtime.
    try:
        state_dict = torch.load(io.BytesIO(paths.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for unreadable or unsafe files; all mean the same to the user.
        raise UserError(f"{path} is not a PyTorch weights file holding only tensors ({type(e).__name__}); give the "
                        "CvT-13 .pth of the model zoo.") from e
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state_dict.items()}


def checkpoint_format(keys) -> str:
    """'official' or 'huggingface' from the state-dict keys; ValueError for anything else."""
    keys = list(keys)
    if any(k.startswith("cvt.encoder.stages.") for k in keys):
        return "huggingface"
    if any(k.startswith("stage0.patch_embed.") for k in keys):
        return "official"
    raise UserError(f"Not a CvT checkpoint: expected official keys ('stage0.patch_embed.proj.weight', ...) or "
                    f"Hugging Face keys ('cvt.encoder.stages.0...'), got e.g. {keys[:5]}.")


def hf_to_official(state_dict: Mapping[str, Any]) -> dict:
    """Renames a Hugging Face CvtForImageClassification state dict to the official microsoft/CvT keys."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in HF_TO_OFFICIAL:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def official_to_flax(key: str, value: np.ndarray):
    """(collection, flax path, array) for one official key, or None for keys without a Flax counterpart."""
    *modules, leaf = re.sub(r"\.blocks\.(\d+)\.", r".blocks_\1.", key).split(".")
    if modules == ["norm"]:  # CBM renames the final norm of the ImageNet checkpoint to norm_final.
        modules = ["norm_final"]
    if leaf == "num_batches_tracked":
        return None
    if leaf in ("running_mean", "running_var"):
        return "batch_stats", (*modules, leaf[len("running_"):]), value
    if leaf == "weight" and value.ndim == 4:  # Conv OIHW -> HWIO; depthwise [C,1,k,k] -> [k,k,1,C] likewise.
        return "params", (*modules, "kernel"), value.transpose(2, 3, 1, 0)
    if leaf == "weight" and value.ndim == 2:  # Linear [out, in] -> Dense [in, out].
        return "params", (*modules, "kernel"), value.T
    if leaf == "weight" and value.ndim == 1:  # LayerNorm / BatchNorm affine scale.
        return "params", (*modules, "scale"), value
    return "params", (*modules, leaf), value


def new_head(width: int, num_classes: int, seed: int):
    """A fresh head as CBM builds it: trunc_normal(0.02) kernel, nn.Linear's default uniform bias."""
    key_kernel, key_bias = jax.random.split(jax.random.key(seed))
    return {"kernel": np.asarray(dense_init(key_kernel, (width, num_classes), jnp.float32)),
            "bias": np.asarray(head_bias_init(width)(key_bias, (num_classes,), jnp.float32))}


def describe(paths) -> str:
    """At most five Flax paths as 'a/b/c' strings, for error messages."""
    names = sorted("/".join(p) for p in paths)
    return f"{names[:5]}{' ...' if len(names) > 5 else ''} ({len(names)} in all)"


def load_cvt_torch_checkpoint(path_or_state_dict, num_classes: Optional[int] = None, config: Mapping = CVT_13,
                              seed: int = 0) -> dict:
    """Flax variables {'params', 'batch_stats'} of `CvT(num_classes, **config)` from a PyTorch CvT checkpoint.

    Args:
      path_or_state_dict: a .pth path, or a state dict of numpy arrays (or CPU tensors), official or Hugging Face.
      num_classes: classes of the new head; None keeps the checkpoint's head. A different count re-initialises
        the head as CBM does, drawn from `seed`.
      config: the CvT stage layout (`CVT_13`, `CVT_21`, ...): the heads are not recorded in the weights.
      seed: seed of a re-initialised head.
    """
    is_path = isinstance(path_or_state_dict, (str, os.PathLike))
    state_dict = read_pth(path_or_state_dict) if is_path else path_or_state_dict
    if checkpoint_format(state_dict) == "huggingface":
        state_dict = hf_to_official(state_dict)
    flat = {}
    for key, value in state_dict.items():
        entry = official_to_flax(key, np.asarray(value, np.float32))
        if entry is not None:
            collection, path, array = entry
            flat[(collection, *path)] = array

    head_kernel = flat.get(("params", "head", "kernel"))
    if head_kernel is None:
        raise UserError("The CvT checkpoint has no classifier head ('head.weight' or 'classifier.weight').")
    width, checkpoint_classes = head_kernel.shape
    if num_classes is not None and num_classes != checkpoint_classes:
        logging.info("CvT checkpoint head has %d classes; re-initialising it for %d classes "
                     "(trunc_normal(0.02) kernel, PyTorch-default bias).", checkpoint_classes, num_classes)
        for name, array in new_head(width, num_classes, seed).items():
            flat[("params", "head", name)] = array

    model = CvT(num_classes=num_classes or checkpoint_classes, **config)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    expected = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}
    missing, unexpected = expected.keys() - flat.keys(), flat.keys() - expected.keys()
    if missing or unexpected:
        raise UserError(f"CvT checkpoint does not match the model config: missing {describe(missing)}, "
                        f"unexpected {describe(unexpected)}; check the checkpoint or pass its `config`.")
    wrong = [f"{'/'.join(p)}: {flat[p].shape} vs {s}" for p, s in expected.items() if flat[p].shape != s]
    if wrong:
        raise UserError(f"CvT checkpoint shapes differ from the model config: {wrong[:5]}; pass its `config`.")
    return traverse_util.unflatten_dict(flat)
