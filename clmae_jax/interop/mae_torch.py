"""MAE-family weights between our Flax parameter trees and fb/mae state dicts, and the MAE's file importer and
exporters.

facebookresearch/mae's names are timm 0.3.2's; the official CL-MAE code adds the curriculum masking module as
`masking_net.*` (cls_token, zero pos_embed buffer, blocks.N, mlp_head.0 = LayerNorm, mlp_head.1 = Linear). Hugging
Face `ViTMAEForPreTraining` goes through hf.py. State dicts are flat `{name: numpy array}` in PyTorch's layouts;
position embeddings are fixed sin-cos tables that our models recompute, so they are checked on import and written
on export, never stored in our trees.
"""
import jax
import jax.numpy as jnp
import numpy as np

from clmae_jax.interop.files import read_state_dict, write_hf_folder, write_pth
from clmae_jax.interop.hf import fbmae_to_hf, hf_config
from clmae_jax.interop.layout import (check_keys, fbmae_layout, fixed_buffer_tables, get_leaf, params_from_layout,
                                      to_torch_layout)
from clmae_jax.interop.shapes import fbmae_geometry
from clmae_jax.models.geometry import Geometry
from clmae_jax.models.mae import MaskedAutoencoder
from clmae_jax.models.masker import CurriculumMasker
from clmae_jax.runtime.errors import UserError


def mae_for_geometry(geometry: Geometry) -> MaskedAutoencoder:
    """Our MaskedAutoencoder for `geometry` (float32); an encoder-only geometry gets a small placeholder decoder."""
    if geometry.get("decoder_depth") and geometry.get("decoder_heads") is None:
        raise UserError(f"The decoder's number of heads is unknown (width {geometry['decoder_width']}, not MAE's "
                        "512); pass decoder_heads= to load_pretrained.")
    return MaskedAutoencoder(patch_size=geometry["patch_size"], width=geometry["width"], depth=geometry["depth"],
                             num_heads=geometry["num_heads"], decoder_width=geometry.get("decoder_width") or 8,
                             decoder_depth=geometry.get("decoder_depth") or 1,
                             decoder_heads=geometry.get("decoder_heads") or 1, mlp_ratio=geometry["mlp_ratio"],
                             channels=geometry["channels"])


def expected_shapes(geometry: Geometry, num_patches: int) -> dict:
    """Leaf shapes our models have for `geometry`, keyed by path tuple."""
    mae = mae_for_geometry({**geometry, "decoder_heads": geometry.get("decoder_heads") or 1})
    side = int(round(num_patches ** 0.5)) * geometry["patch_size"]
    init = lambda rng: mae.init(rng, jnp.zeros((1, side, side, geometry["channels"])), jnp.zeros((1, num_patches)), 1)
    tree = {"mae": jax.eval_shape(init, jax.random.key(0))["params"]}
    if geometry.get("masker_depth"):
        masker = CurriculumMasker(depth=geometry["masker_depth"], num_heads=geometry["masker_heads"],
                                  mlp_ratio=geometry["mlp_ratio"])
        tokens = jnp.zeros((1, num_patches, geometry["width"]))
        tree["masker"] = jax.eval_shape(lambda rng: masker.init(rng, tokens), jax.random.key(0))["params"]
    else:
        tree = tree["mae"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf.shape for path, leaf in flat}


def check_fixed_buffers(state_dict: dict, geometry: Geometry, what: str):
    """Position embeddings in the file must be the fixed ones our models compute (learned ones cannot be held)."""
    if geometry.get("image_size") is None:
        return
    for key, table in fixed_buffer_tables(geometry).items():
        found = np.asarray(state_dict.get(key, table), np.float32)
        if found.shape != table.shape or not np.allclose(found, table, atol=1e-5):
            raise UserError(f"{what}: {key!r} is not the fixed 2-D sin-cos table our ViT uses (learned or "
                            "interpolated position embeddings cannot be imported).")


def layout_num_patches(state_dict: dict, geometry: Geometry) -> int:
    """Patches per image: from the masker's head or the position table when present (else any square works)."""
    if geometry.get("masker_depth"):
        return int(np.shape(state_dict["masking_net.mlp_head.1.weight"])[0])
    if geometry.get("image_size"):
        return (geometry["image_size"] // geometry["patch_size"]) ** 2
    return 4


def from_fbmae_state_dict(state_dict: dict, what: str = "state dict", hints: dict | None = None) -> tuple:
    """(geometry, our params) from an fb/mae (or CL-MAE) state dict of numpy arrays."""
    geometry = fbmae_geometry(state_dict, what, hints or {})
    layout = fbmae_layout(geometry)
    check_keys(state_dict, layout, what)
    check_fixed_buffers(state_dict, geometry, what)
    num_patches = layout_num_patches(state_dict, geometry)
    shapes = expected_shapes(geometry, num_patches)
    return geometry, params_from_layout(state_dict, layout, shapes, geometry, what, "an MAE")


def to_fbmae_state_dict(params, geometry: Geometry) -> dict:
    """fb/mae (CL-MAE when `params` has a masker) state dict {name: float32 numpy} of our params.

    `geometry` (from `params_geometry` or `load_pretrained`) gives the image size the position tables are built for.
    """
    if not geometry.get("image_size"):
        raise UserError("Exporting to PyTorch needs geometry['image_size'] for the position-embedding tables.")
    state_dict = {key: to_torch_layout(get_leaf(params, path), kind)
                  for key, (path, kind) in fbmae_layout(geometry).items()}
    return {**state_dict, **fixed_buffer_tables(geometry)}


def load_pretrained(path: str, num_heads=None, decoder_heads=None) -> tuple:
    """(geometry, our params) of an MAE / CL-MAE PyTorch file or HF folder; encoder-only files give the encoder."""
    state_dict, hints = read_state_dict(path)
    if "head.weight" in state_dict:
        raise UserError(f"{path} is a ViT classifier (it has a head), not MAE / CL-MAE pretraining weights: "
                        "fine-tune from it with config.model.init_from or convert it with python -m clmae_jax.interop.")
    given = {"num_heads": num_heads, "decoder_heads": decoder_heads}
    return from_fbmae_state_dict(state_dict, path, {**hints, **{k: v for k, v in given.items() if v}})


def save_fbmae(params, geometry: Geometry, path: str):
    """Writes `params` as an fb/mae (CL-MAE when it has a masker) .pth: {"model": state dict, "clmae_jax": geometry}."""
    write_pth(to_fbmae_state_dict(params, geometry), geometry, path)


def save_hf(params, geometry: Geometry, folder: str):
    """Writes a folder ViTMAEForPreTraining.from_pretrained loads (the masking module has no place there: left out)."""
    if not geometry.get("decoder_depth") or geometry.get("decoder_heads") is None:
        raise UserError("A Hugging Face ViTMAEForPreTraining needs the decoder and its number of heads; export an "
                        "encoder alone with save_fbmae.")
    mae_geometry = {**geometry, "masker_depth": 0, "masker_heads": None}
    state_dict = fbmae_to_hf(to_fbmae_state_dict(params.get("mae", params), mae_geometry))
    write_hf_folder(state_dict, hf_config(geometry), geometry, folder)

