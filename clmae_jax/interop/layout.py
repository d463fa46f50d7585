"""The facebookresearch/mae (= timm 0.3.2) key layout: each PyTorch name mapped to a leaf of our trees, and the
transposes between PyTorch's tensor layouts and ours.

Layout kinds: "plain" (same array), "linear" (nn.Linear weight [out, in] is kernel [in, out]), "conv" (patch
projection [D, C, p, p] is [p, p, C, D]), "table" (a learned position table [1, 1 + L, D] is [1 + L, D]). Position
embeddings that our models compute (fixed sin-cos tables) are buffers of the layout, never leaves of our trees.
"""
import numpy as np

from clmae_jax.models.geometry import Geometry
from clmae_jax.models.vit import sincos_2d
from clmae_jax.runtime.errors import UserError


def linear_keys(torch_name: str, path: tuple) -> dict:
    """nn.Linear <-> nn.Dense (weight [out, in] is kernel [in, out])."""
    return {f"{torch_name}.weight": (path + ("kernel",), "linear"), f"{torch_name}.bias": (path + ("bias",), "plain")}


def norm_keys(torch_name: str, path: tuple) -> dict:
    """nn.LayerNorm <-> nn.LayerNorm (weight is scale)."""
    return {f"{torch_name}.weight": (path + ("scale",), "plain"), f"{torch_name}.bias": (path + ("bias",), "plain")}


def block_keys(prefix: str, path: tuple) -> dict:
    """One timm pre-norm block <-> vit.Block."""
    return {**norm_keys(f"{prefix}.norm1", path + ("norm1",)),
            **linear_keys(f"{prefix}.attn.qkv", path + ("attn", "qkv")),
            **linear_keys(f"{prefix}.attn.proj", path + ("attn", "proj")),
            **norm_keys(f"{prefix}.norm2", path + ("norm2",)),
            **linear_keys(f"{prefix}.mlp.fc1", path + ("mlp", "fc1")),
            **linear_keys(f"{prefix}.mlp.fc2", path + ("mlp", "fc2"))}


def blocks_keys(prefix: str, depth: int, path: tuple) -> dict:
    """`depth` blocks named prefix.N <-> path/blockN."""
    return {k: v for i in range(depth) for k, v in block_keys(f"{prefix}.{i}", path + (f"block{i}",)).items()}


def fbmae_layout(geometry: Geometry) -> dict:
    """Every fb/mae parameter name for `geometry`, mapped to (our path, layout kind)."""
    mae = ("mae",) if geometry.get("masker_depth") else ()  # CL-MAE trees hold the MAE under "mae".
    layout = {"patch_embed.proj.weight": (mae + ("patch_embed", "proj", "kernel"), "conv"),
              "patch_embed.proj.bias": (mae + ("patch_embed", "proj", "bias"), "plain"),
              "cls_token": (mae + ("cls_token", "cls"), "plain"),
              **blocks_keys("blocks", geometry["depth"], mae + ("encoder",)),
              **norm_keys("norm", mae + ("encoder", "norm"))}
    if geometry.get("decoder_depth"):
        layout.update({**linear_keys("decoder_embed", mae + ("decoder_embed",)),
                       "mask_token": (mae + ("mask_token",), "plain"),
                       **blocks_keys("decoder_blocks", geometry["decoder_depth"], mae + ("decoder",)),
                       **norm_keys("decoder_norm", mae + ("decoder", "norm")),
                       **linear_keys("decoder_pred", mae + ("decoder_pred",))})
    if geometry.get("masker_depth"):
        # Our masker's Transformer ends in the LayerNorm that is MaskingNet's mlp_head.0 (see models/masker.py).
        layout.update({"masking_net.cls_token": (("masker", "cls_token", "cls"), "plain"),
                       **blocks_keys("masking_net.blocks", geometry["masker_depth"], ("masker", "blocks")),
                       **norm_keys("masking_net.mlp_head.0", ("masker", "blocks", "norm")),
                       **linear_keys("masking_net.mlp_head.1", ("masker", "head"))})
    return layout


# Our leaf -> PyTorch's tensor for each layout kind, and back.
TO_TORCH = {"plain": lambda v: v, "linear": lambda v: v.T,
            "conv": lambda v: v.transpose(3, 2, 0, 1),  # [p, p, C, D] -> [D, C, p, p].
            "table": lambda v: v[None]}  # A learned position table [1 + L, D] -> [1, 1 + L, D].
FROM_TORCH = {"plain": lambda v: v, "linear": lambda v: v.T, "conv": lambda v: v.transpose(2, 3, 1, 0),
              "table": lambda v: v[0]}


def to_torch_layout(value, kind: str) -> np.ndarray:
    """Our leaf in PyTorch's layout (a writable copy: torch.from_numpy shares memory)."""
    return np.ascontiguousarray(TO_TORCH[kind](np.array(value, np.float32)))


def from_torch_layout(value, kind: str) -> np.ndarray:
    """A PyTorch tensor (as numpy) in our layout, float32."""
    return np.ascontiguousarray(FROM_TORCH[kind](np.asarray(value, np.float32)))


def fixed_buffer_tables(geometry: Geometry) -> dict:
    """The position-embedding buffers our models imply: sin-cos with a zero CLS row; zeros for the masker's CLS."""
    grid = geometry["image_size"] // geometry["patch_size"]
    table = lambda width: np.concatenate([np.zeros((1, width), np.float32), sincos_2d(width, grid)])[None]
    tables = {"pos_embed": table(geometry["width"])}
    if geometry.get("decoder_depth"):
        tables["decoder_pos_embed"] = table(geometry["decoder_width"])
    if geometry.get("masker_depth"):
        tables["masking_net.pos_embed"] = np.zeros((1, 1, geometry["width"]), np.float32)
    return tables


FIXED_BUFFERS = ("pos_embed", "decoder_pos_embed", "masking_net.pos_embed")


MAE_ONLY = "; only MAE / CL-MAE pretraining weights (encoder, decoder, masking_net) can be imported."


def check_keys(state_dict: dict, layout: dict, what: str, allowed=FIXED_BUFFERS, hint: str = MAE_ONLY):
    """One-line UserError naming the first unknown key (neither in `layout` nor `allowed`; `hint` says what can be
    imported), then the first missing one."""
    unknown = [k for k in state_dict if k not in layout and k not in allowed]
    if unknown:
        raise UserError(f"{what}: unknown key {unknown[0]!r} ({len(unknown)} unknown in all){hint}")
    missing = [k for k in layout if k not in state_dict]
    if missing:
        raise UserError(f"{what}: missing key {missing[0]!r} ({len(missing)} missing in all).")


def set_leaf(tree: dict, path: tuple, value):
    """tree[path[0]][path[1]]... = value, creating dicts on the way."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def get_leaf(tree, path: tuple):
    """tree[path[0]][path[1]]..."""
    for name in path:
        tree = tree[name]
    return tree


def params_from_layout(state_dict: dict, layout: dict, shapes: dict, geometry: Geometry, what: str, model: str) -> dict:
    """Our parameter tree from the `layout` entries of `state_dict`, every leaf checked against `shapes`; a misfit
    is one line naming the key and `model` ("an MAE", "a ViT") at the geometry's sizes."""
    params = {}
    for key, (path, kind) in layout.items():
        value = from_torch_layout(state_dict[key], kind)
        if shapes.get(path) != value.shape:
            raise UserError(f"{what}: {key!r} has shape {tuple(np.shape(state_dict[key]))}, which does not fit "
                            f"{model} of width {geometry['width']}, patch {geometry['patch_size']} and MLP ratio "
                            f"{geometry['mlp_ratio']:g}.")
        set_leaf(params, path, value)
    return params

