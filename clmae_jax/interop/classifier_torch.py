"""ViT classifiers between our `ViTClassifier` trees and PyTorch, for fine-tuned MAE / CL-MAE encoders.

Two PyTorch layouts, both mapped through the fb/mae names of layout.py:
- facebookresearch/mae fine-tuned models and timm `VisionTransformer` (the same names): patch_embed.proj,
  cls_token, pos_embed (a learned parameter once fine-tuned), blocks.N, then `norm` + `head` (CLS pooling, timm's
  default; or the mean of the normed tokens, our "gap", named by our files' metadata) or `fc_norm` + `head` (MAE's
  global pool, whose `norm` is deleted: our "gap_norm");
- Hugging Face `ViTForImageClassification`: the ViT encoder names plus `classifier`, CLS pooling only.
A file whose position table is the fixed sin-cos one imports as `pos_embed="sincos"`, any other as "learned" (our
own exports say which in their metadata: a learned table that has not moved yet stays learned).
"""
import jax
import jax.numpy as jnp
import numpy as np

from clmae_jax.interop.files import read_state_dict, write_hf_folder, write_pth
from clmae_jax.interop.hf import fbmae_to_hf, hf_classifier_config
from clmae_jax.interop.layout import (blocks_keys, check_keys, fixed_buffer_tables, get_leaf, linear_keys, norm_keys,
                                      params_from_layout, to_torch_layout)
from clmae_jax.interop.mae_torch import from_fbmae_state_dict
from clmae_jax.interop.shapes import fbmae_geometry, require
from clmae_jax.models.geometry import Geometry
from clmae_jax.models.vit import ViTClassifier
from clmae_jax.runtime.errors import UserError


def is_classifier_state_dict(state_dict: dict) -> bool:
    """True for a classifier (fb/mae names, a `head`), False for MAE / CL-MAE pretraining weights."""
    return "head.weight" in state_dict


def classifier_layout(geometry: Geometry) -> dict:
    """Every fb/mae / timm classifier parameter name for `geometry`, mapped to (our path, layout kind)."""
    layout = {"patch_embed.proj.weight": (("patch_embed", "proj", "kernel"), "conv"),
              "patch_embed.proj.bias": (("patch_embed", "proj", "bias"), "plain"),
              "cls_token": (("cls_token", "cls"), "plain"),
              **blocks_keys("blocks", geometry["depth"], ("encoder",)), **linear_keys("head", ("head",))}
    if geometry["pool"] == "gap_norm":
        layout.update(norm_keys("fc_norm", ("fc_norm",)))
    else:
        layout.update(norm_keys("norm", ("encoder", "norm")))
    if geometry["pos_embed"] == "learned":
        layout["pos_embed"] = (("pos_embed", "table"), "table")
    return layout


def sincos_table(geometry: Geometry) -> np.ndarray:
    """The fixed [1, 1 + L, D] position table our ViT computes for `geometry` (zero CLS row)."""
    return fixed_buffer_tables({**geometry, "decoder_depth": 0, "masker_depth": 0})["pos_embed"]


def position_kind(state_dict: dict, geometry: Geometry) -> str:
    """'sincos' when the file's position table is the fixed one our ViT computes, else 'learned'."""
    table = sincos_table(geometry)
    found = np.asarray(state_dict["pos_embed"], np.float32)
    return "sincos" if found.shape == table.shape and np.allclose(found, table, atol=1e-5) else "learned"


def classifier_geometry(state_dict: dict, what: str, hints: dict) -> Geometry:
    """Geometry of an fb/mae / timm classifier state dict: the encoder's, plus classes, pooling, position table."""
    require(state_dict, "pos_embed", what)
    pool = "gap_norm" if "fc_norm.weight" in state_dict else hints.get("pool") or "cls"
    geometry = fbmae_geometry(state_dict, what, hints).replace(num_classes=int(np.shape(state_dict["head.weight"])[0]),
                                                               pool=pool)
    return geometry.replace(pos_embed=hints.get("pos_embed") or position_kind(state_dict, geometry))


def classifier_shapes(geometry: Geometry) -> dict:
    """Leaf shapes of our ViTClassifier for `geometry`, keyed by path tuple."""
    side = geometry["image_size"]
    tree = jax.eval_shape(lambda rng: classifier_for_geometry(geometry).init(rng, jnp.zeros((1, side, side,
                                                                                      geometry["channels"]))),
                          jax.random.key(0))["params"]
    return {tuple(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def classifier_for_geometry(geometry: Geometry) -> ViTClassifier:
    """Our ViTClassifier for `geometry` (float32, no drop path)."""
    return ViTClassifier(geometry["num_classes"], patch_size=geometry["patch_size"], width=geometry["width"],
                         depth=geometry["depth"], num_heads=geometry["num_heads"], mlp_ratio=geometry["mlp_ratio"],
                         pool=geometry["pool"], pos_embed=geometry["pos_embed"])


def from_classifier_state_dict(state_dict: dict, what: str = "state dict", hints: dict | None = None) -> tuple:
    """(geometry, our ViTClassifier params) from an fb/mae / timm classifier state dict of numpy arrays."""
    geometry = classifier_geometry(state_dict, what, hints or {})
    layout = classifier_layout(geometry)
    check_keys(state_dict, layout, what, allowed=("pos_embed",),
               hint=f" for a ViT classifier with {geometry['pool']!r} pooling (distillation tokens, layer "
                    "scale, registers and relative positions have no place in our ViT).")
    return geometry, params_from_layout(state_dict, layout, classifier_shapes(geometry), geometry, what, "a ViT")


def to_classifier_state_dict(params, geometry: Geometry) -> dict:
    """fb/mae / timm state dict {name: float32 numpy} of our classifier params (the sin-cos table when fixed)."""
    state_dict = {key: to_torch_layout(get_leaf(params, path), kind)
                  for key, (path, kind) in classifier_layout(geometry).items()}
    if geometry["pos_embed"] == "sincos":
        state_dict["pos_embed"] = sincos_table(geometry)
    return state_dict


def load_torch_weights(path: str, num_heads=None, decoder_heads=None) -> tuple:
    """(geometry, our params) of an MAE / CL-MAE or ViT-classifier file; a classifier's geometry has num_classes."""
    state_dict, hints = read_state_dict(path)
    hints = {**hints, **{k: v for k, v in (("num_heads", num_heads), ("decoder_heads", decoder_heads)) if v}}
    if is_classifier_state_dict(state_dict):
        return from_classifier_state_dict(state_dict, path, hints)
    return from_fbmae_state_dict(state_dict, path, hints)


def save_classifier_fbmae(params, geometry: Geometry, path: str):
    """Writes our classifier as an fb/mae / timm .pth: {"model": state dict, "clmae_jax": geometry}."""
    write_pth(to_classifier_state_dict(params, geometry), geometry, path)


def save_classifier_hf(params, geometry: Geometry, folder: str):
    """Writes a folder ViTForImageClassification.from_pretrained loads (CLS-pooling classifiers only)."""
    if geometry["pool"] != "cls":
        raise UserError(f"Hugging Face ViTForImageClassification pools the CLS token; this classifier pools "
                        f"{geometry['pool']!r}: export it to the fb/mae / timm .pth layout instead.")
    state_dict = fbmae_to_hf(to_classifier_state_dict(params, geometry))
    write_hf_folder(state_dict, hf_classifier_config(geometry), geometry, folder)
