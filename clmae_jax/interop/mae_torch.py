"""MAE-family weights between our Flax parameter trees and PyTorch state dicts.

Two PyTorch layouts:
- facebookresearch/mae (= timm 0.3.2 ViT names), also used by the official CL-MAE code, whose checkpoints add the
  curriculum masking module as `masking_net.*` (cls_token, zero pos_embed buffer, blocks.N, mlp_head.0 = LayerNorm,
  mlp_head.1 = Linear);
- Hugging Face `ViTMAEForPreTraining`, in the Hub's (transformers 4) names and in transformers 5's renamed ones;
  its q/k/v projections are separate, ours are one fused `qkv`.

Everything goes through the fb/mae layout: HF dicts are renamed into it on import and out of it on export. State
dicts here are flat `{name: numpy array}` in PyTorch's layouts; position embeddings are fixed sin-cos tables that
our models recompute, so they are checked on import and written on export, never stored in our trees.
"""
import argparse
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from clmae_jax.models.mae import MaskedAutoencoder
from clmae_jax.models.masker import CurriculumMasker
from clmae_jax.models.vit import VIT_SIZES, sincos_2d
from clmae_jax.runtime.errors import MissingInputError, UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_NORM_EPS = 1e-6  # Hard-coded in our ViT, as in facebookresearch/mae.
MAE_DECODER_HEADS = 16  # Every published MAE decoder (512 wide) uses 16 heads.
MASKER_HEADS = 4  # The official MaskingNet's constructor default; not recoverable from shapes.
FIXED_BUFFERS = ("pos_embed", "decoder_pos_embed", "masking_net.pos_embed")
# What a file's metadata or config may tell beyond its shapes.
HINT_KEYS = ("num_heads", "decoder_heads", "masker_heads", "image_size", "mean", "std", "mask_ratio", "norm_pix_loss",
             "pool", "pos_embed")


# ---------------------------------------------------------------- the fb/mae layout: torch key -> our leaf


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


def fbmae_layout(geometry: dict) -> dict:
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


def to_torch_layout(value, kind: str) -> np.ndarray:
    """Our leaf in PyTorch's layout (a writable copy: torch.from_numpy shares memory)."""
    value = np.array(value, np.float32)
    if kind == "linear":
        value = value.T
    elif kind == "conv":  # [p, p, C, D] -> [D, C, p, p].
        value = value.transpose(3, 2, 0, 1)
    elif kind == "table":  # A learned position table [1 + L, D] -> [1, 1 + L, D].
        value = value[None]
    return np.ascontiguousarray(value)


def from_torch_layout(value, kind: str) -> np.ndarray:
    """A PyTorch tensor (as numpy) in our layout, float32."""
    value = np.asarray(value, np.float32)
    if kind == "linear":
        value = value.T
    elif kind == "conv":  # [D, C, p, p] -> [p, p, C, D].
        value = value.transpose(2, 3, 1, 0)
    elif kind == "table":
        value = value[0]
    return np.ascontiguousarray(value)


# ---------------------------------------------------------------- geometry


def count_blocks(state_dict: dict, prefix: str) -> int:
    """Number of blocks `prefix.N.*` in a state dict."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    return len({m.group(1) for m in map(pattern.match, state_dict) if m})


def require(state_dict: dict, key: str, what: str) -> np.ndarray:
    """state_dict[key], or a one-line UserError naming the missing key."""
    if key not in state_dict:
        raise UserError(f"{what}: missing key {key!r}; this is not an MAE / CL-MAE state dict in the "
                        "facebookresearch/mae or Hugging Face ViTMAE layout.")
    return state_dict[key]


def known_heads(width: int, depth: int):
    """Heads of a named ViT size with this width and depth (MAE's published sizes), else None."""
    return next((s["num_heads"] for s in VIT_SIZES.values() if (s["width"], s["depth"]) == (width, depth)), None)


def fbmae_geometry(state_dict: dict, what: str, hints: dict) -> dict:
    """Geometry read from an fb/mae state dict's shapes; `hints` (file metadata, HF config) fill what shapes lack."""
    width, channels, patch, _ = require(state_dict, "patch_embed.proj.weight", what).shape
    depth = count_blocks(state_dict, "blocks")
    hidden = require(state_dict, "blocks.0.mlp.fc1.weight", what).shape[0]
    geometry = dict(width=width, depth=depth, num_heads=known_heads(width, depth), mlp_ratio=hidden / width,
                    patch_size=patch, channels=channels, image_size=None, decoder_width=None, decoder_depth=0,
                    decoder_heads=None, masker_depth=0, masker_heads=None,
                    mean=IMAGENET_MEAN if channels == 3 else (0.5,) * channels,
                    std=IMAGENET_STD if channels == 3 else (0.5,) * channels)
    if "pos_embed" in state_dict:
        geometry["image_size"] = int(round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)) * patch
    if "decoder_embed.weight" in state_dict:
        decoder_width = state_dict["decoder_embed.weight"].shape[0]
        geometry.update(decoder_width=decoder_width, decoder_depth=count_blocks(state_dict, "decoder_blocks"),
                        decoder_heads=MAE_DECODER_HEADS if decoder_width == 512 else None)
    if any(k.startswith("masking_net.") for k in state_dict):
        geometry.update(masker_depth=count_blocks(state_dict, "masking_net.blocks"), masker_heads=MASKER_HEADS)
    geometry.update({k: hints[k] for k in HINT_KEYS if hints.get(k) is not None})
    if geometry["num_heads"] is None:
        raise UserError(f"{what}: cannot tell the number of attention heads of a width-{width}, depth-{depth} ViT "
                        "(not a standard size); pass num_heads= to load_pretrained.")
    return geometry


def params_geometry(params, *, image_size: int, num_heads: int, decoder_heads=None, masker_heads=MASKER_HEADS,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """Geometry of one of our MAE / CL-MAE trees: sizes from its shapes, the rest from the arguments."""
    mae = params.get("mae", params)
    patch, _, channels, width = np.shape(mae["patch_embed"]["proj"]["kernel"])
    count = lambda tree: sum(1 for name in tree if name.startswith("block"))
    hidden = np.shape(mae["encoder"]["block0"]["mlp"]["fc1"]["kernel"])[1]
    geometry = dict(width=width, depth=count(mae["encoder"]), num_heads=num_heads, mlp_ratio=hidden / width,
                    patch_size=patch, channels=channels, image_size=image_size, decoder_width=None, decoder_depth=0,
                    decoder_heads=None, masker_depth=0, masker_heads=None, mean=tuple(mean), std=tuple(std))
    if "decoder" in mae:
        geometry.update(decoder_width=np.shape(mae["mask_token"])[-1], decoder_depth=count(mae["decoder"]),
                        decoder_heads=decoder_heads)
    if "masker" in params:
        geometry.update(masker_depth=count(params["masker"]["blocks"]), masker_heads=masker_heads)
    return geometry


def build_mae(geometry: dict) -> MaskedAutoencoder:
    """Our MaskedAutoencoder for `geometry` (float32); an encoder-only geometry gets a small placeholder decoder."""
    if geometry.get("decoder_depth") and geometry.get("decoder_heads") is None:
        raise UserError(f"The decoder's number of heads is unknown (width {geometry['decoder_width']}, not MAE's "
                        "512); pass decoder_heads= to load_pretrained.")
    return MaskedAutoencoder(patch_size=geometry["patch_size"], width=geometry["width"], depth=geometry["depth"],
                             num_heads=geometry["num_heads"], decoder_width=geometry.get("decoder_width") or 8,
                             decoder_depth=geometry.get("decoder_depth") or 1,
                             decoder_heads=geometry.get("decoder_heads") or 1, mlp_ratio=geometry["mlp_ratio"],
                             channels=geometry["channels"])


def expected_shapes(geometry: dict, num_patches: int) -> dict:
    """Leaf shapes our models have for `geometry`, keyed by path tuple."""
    mae = build_mae({**geometry, "decoder_heads": geometry.get("decoder_heads") or 1})
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


# ---------------------------------------------------------------- fb/mae <-> ours


def fixed_buffer_tables(geometry: dict) -> dict:
    """The position-embedding buffers our models imply: sin-cos with a zero CLS row; zeros for the masker's CLS."""
    grid = geometry["image_size"] // geometry["patch_size"]
    table = lambda width: np.concatenate([np.zeros((1, width), np.float32), sincos_2d(width, grid)])[None]
    tables = {"pos_embed": table(geometry["width"])}
    if geometry.get("decoder_depth"):
        tables["decoder_pos_embed"] = table(geometry["decoder_width"])
    if geometry.get("masker_depth"):
        tables["masking_net.pos_embed"] = np.zeros((1, 1, geometry["width"]), np.float32)
    return tables


def check_fixed_buffers(state_dict: dict, geometry: dict, what: str):
    """Position embeddings in the file must be the fixed ones our models compute (learned ones cannot be held)."""
    if geometry.get("image_size") is None:
        return
    for key, table in fixed_buffer_tables(geometry).items():
        found = np.asarray(state_dict.get(key, table), np.float32)
        if found.shape != table.shape or not np.allclose(found, table, atol=1e-5):
            raise UserError(f"{what}: {key!r} is not the fixed 2-D sin-cos table our ViT uses (learned or "
                            "interpolated position embeddings cannot be imported).")


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


def layout_num_patches(state_dict: dict, geometry: dict) -> int:
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


def params_from_layout(state_dict: dict, layout: dict, shapes: dict, geometry: dict, what: str, model: str) -> dict:
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


def get_leaf(tree, path: tuple):
    """tree[path[0]][path[1]]..."""
    for name in path:
        tree = tree[name]
    return tree


def to_fbmae_state_dict(params, geometry: dict) -> dict:
    """fb/mae (CL-MAE when `params` has a masker) state dict {name: float32 numpy} of our params.

    `geometry` (from `params_geometry` or `load_pretrained`) gives the image size the position tables are built for.
    """
    if not geometry.get("image_size"):
        raise UserError("Exporting to PyTorch needs geometry['image_size'] for the position-embedding tables.")
    state_dict = {key: to_torch_layout(get_leaf(params, path), kind)
                  for key, (path, kind) in fbmae_layout(geometry).items()}
    return {**state_dict, **fixed_buffer_tables(geometry)}


# ---------------------------------------------------------------- Hugging Face <-> fb/mae

# Sub-layer names inside one HF layer -> fb/mae block names; both the Hub's (transformers 4) and transformers 5's.
HF_LAYER_NAMES = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
HF_TOP_NAMES = {
    "vit.embeddings.cls_token": "cls_token", "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection": "patch_embed.proj", "vit.layernorm": "norm",
    "decoder.decoder_embed": "decoder_embed", "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed", "decoder.decoder_norm": "decoder_norm",
    "decoder.decoder_pred": "decoder_pred", "classifier": "head",  # ViTForImageClassification's head.
}
# Layer stacks: the Hub's names, transformers 5's in-memory names, and what transformers 5.x's save_pretrained writes
# for the decoder (its reverse renaming of "encoder.layer" <-> "layers" also hits "decoder_layers").
HF_STACKS = {"vit.encoder.layer": "blocks", "vit.layers": "blocks", "decoder.decoder_layers": "decoder_blocks",
             "decoder.decoder_encoder.layer": "decoder_blocks"}
HF_LAYER = re.compile(rf"^({'|'.join(map(re.escape, HF_STACKS))})\.(\d+)\.(.+)\.(weight|bias)$")
# transformers 4's ViTMAEModel (the encoder alone) saves without the "vit." prefix.
ENCODER_ONLY_PREFIXES = ("embeddings.", "encoder.", "layers.", "layernorm.")


def is_hf_state_dict(state_dict: dict) -> bool:
    """True when the names are Hugging Face ViTMAE's rather than fb/mae's."""
    return any(k.startswith(("vit.", "decoder.decoder_")) or k.startswith(ENCODER_ONLY_PREFIXES) for k in state_dict)


def hf_name(key: str, what: str) -> str:
    """The fb/mae name of one HF name; q/k/v come out as blocks.N.q.weight etc., fused later."""
    match = HF_LAYER.match(key)
    if match:
        stack, index, sub, kind = match.groups()
        if sub not in HF_LAYER_NAMES:
            raise UserError(f"{what}: unknown key {key!r} in the Hugging Face ViTMAE layout.")
        return f"{HF_STACKS[stack]}.{index}.{HF_LAYER_NAMES[sub]}.{kind}"
    base, _, kind = key.rpartition(".")
    if base in HF_TOP_NAMES:
        return f"{HF_TOP_NAMES[base]}.{kind}"
    if key in HF_TOP_NAMES:  # Parameters without .weight/.bias: cls_token, mask_token, position tables.
        return HF_TOP_NAMES[key]
    raise UserError(f"{what}: unknown key {key!r} in the Hugging Face ViTMAE layout.")


def hf_to_fbmae(state_dict: dict, what: str = "state dict") -> dict:
    """An HF ViTMAE state dict renamed to fb/mae's, with q/k/v fused into qkv (q, k, v order, as timm)."""
    prefixed = {("vit." + k if k.startswith(ENCODER_ONLY_PREFIXES) else k): v for k, v in state_dict.items()}
    renamed = {hf_name(k, what): v for k, v in prefixed.items()}
    fused = {k: v for k, v in renamed.items() if not re.search(r"\.[qkv]\.(weight|bias)$", k)}
    for key in renamed:
        match = re.match(r"^(.+)\.q\.(weight|bias)$", key)
        if match:
            stem, kind = match.groups()
            parts = [require(renamed, f"{stem}.{p}.{kind}", what) for p in "qkv"]
            fused[f"{stem}.attn.qkv.{kind}"] = np.concatenate([np.asarray(p) for p in parts])
    orphans = [k for k in renamed if re.search(r"\.[kv]\.(weight|bias)$", k)
               and re.sub(r"\.[kv]\.", ".q.", k) not in renamed]
    if orphans:
        raise UserError(f"{what}: {orphans[0]!r} has no matching query projection.")
    return fused


def fbmae_to_hf(state_dict: dict) -> dict:
    """An fb/mae MAE state dict in Hugging Face ViTMAEForPreTraining's Hub (transformers 4) names."""
    top = {v: k for k, v in HF_TOP_NAMES.items()}
    layer = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    stacks = {"blocks": "vit.encoder.layer", "decoder_blocks": "decoder.decoder_layers"}
    out = {}
    for key, value in state_dict.items():
        match = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if match and match.group(3) == "attn.qkv":
            stack, index, _, kind = match.groups()
            for name, part in zip(("query", "key", "value"), np.split(value, 3)):
                out[f"{stacks[stack]}.{index}.attention.attention.{name}.{kind}"] = np.ascontiguousarray(part)
        elif match:
            stack, index, sub, kind = match.groups()
            out[f"{stacks[stack]}.{index}.{layer[sub]}.{kind}"] = value
        else:
            base, _, kind = key.rpartition(".")
            out[f"{top[base]}.{kind}" if base in top else top[key]] = value
    return out


def hf_config(geometry: dict) -> dict:
    """config.json of a ViTMAEForPreTraining with our geometry (LayerNorm eps 1e-6, exact GELU, no dropout)."""
    return {"architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae",
            "hidden_size": geometry["width"], "num_hidden_layers": geometry["depth"],
            "num_attention_heads": geometry["num_heads"],
            "intermediate_size": int(round(geometry["width"] * geometry["mlp_ratio"])),
            "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02, "layer_norm_eps": LAYER_NORM_EPS, "qkv_bias": True,
            "image_size": geometry["image_size"], "patch_size": geometry["patch_size"],
            "num_channels": geometry["channels"], "decoder_hidden_size": geometry["decoder_width"],
            "decoder_num_hidden_layers": geometry["decoder_depth"],
            "decoder_num_attention_heads": geometry["decoder_heads"],
            "decoder_intermediate_size": int(round(geometry["decoder_width"] * geometry["mlp_ratio"])),
            "mask_ratio": geometry.get("mask_ratio", 0.75), "norm_pix_loss": geometry.get("norm_pix_loss", False)}


def hints_from_hf_config(config: dict, what: str) -> dict:
    """Heads and sizes from an HF config.json; a UserError when it describes a ViT ours cannot run exactly."""
    eps = config.get("layer_norm_eps", 1e-12)  # ViTMAEConfig's default when the field is absent.
    if eps != LAYER_NORM_EPS:
        # The Hub's facebook/vit-mae-* configs say 1e-12, but those weights were trained by facebookresearch/mae
        # with 1e-6: ours runs them as trained. A file really trained at another eps differs only in the last bits.
        logging.warning("%s: config.json has layer_norm_eps=%g; imported into our ViT, which uses %g (the "
                        "facebookresearch/mae value the published weights were trained with).", what, eps,
                        LAYER_NORM_EPS)
    if config.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{what}: config.json has hidden_act={config['hidden_act']!r}; our ViT uses exact 'gelu'.")
    if not config.get("qkv_bias", True):
        raise UserError(f"{what}: config.json has qkv_bias=false; our ViT always has q/k/v biases.")
    return {"num_heads": config.get("num_attention_heads"), "decoder_heads": config.get("decoder_num_attention_heads"),
            "image_size": config.get("image_size"), "mask_ratio": config.get("mask_ratio"),
            "norm_pix_loss": config.get("norm_pix_loss")}


def preprocessor_config(geometry: dict) -> dict:
    """preprocessor_config.json carrying the normalisation the encoder was trained with."""
    size = geometry["image_size"]
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(geometry["mean"]), "image_std": list(geometry["std"])}


# ---------------------------------------------------------------- files

METADATA_KEY = "clmae_jax"  # Our .pth exports carry the geometry under this key, beside fb/mae's "model".


def to_numpy(value) -> np.ndarray:
    """A torch tensor (bfloat16 included) or array as numpy; floats widened to float32 where torch has no numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    return np.asarray(value)


def read_json(path: str) -> dict:
    """A JSON file's content, {} when there is none."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_torch_file(path: str) -> tuple:
    """(state dict, metadata) of a .pth/.bin: {"model": state dict, ...} as fb/mae saves, or a bare state dict."""
    import torch
    # Official training checkpoints pickle an argparse.Namespace under "args"; that class is harmless to allow.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for unreadable files; all mean the same to the user.
            raise UserError(f"{path} is not a readable PyTorch weights file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}).") from e
    if not isinstance(content, dict):
        raise UserError(f"{path} holds a {type(content).__name__}, not a state dict.")
    if isinstance(content.get("model"), dict):
        return content["model"], content.get(METADATA_KEY) or {}
    return content, {}


def read_safetensors(path: str) -> dict:
    """A .safetensors file as a state dict of numpy arrays."""
    from safetensors.numpy import load_file
    return load_file(path)


def read_weights(path: str) -> tuple:
    """(state dict of numpy arrays, hints) from a .pth/.bin/.safetensors file or a Hugging Face folder."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        names = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(path, n))]
        if not names:
            raise MissingInputError(f"{path} is a folder without model.safetensors or pytorch_model.bin.")
        path = os.path.join(path, names[0])
    state_dict, hints = (read_safetensors(path), {}) if path.endswith(".safetensors") else read_torch_file(path)
    config = read_json(os.path.join(folder, "config.json"))
    if config.get("model_type") in ("vit_mae", "vit"):
        hints = {**hints, **hints_from_hf_config(config, path)}
    processor = read_json(os.path.join(folder, "preprocessor_config.json"))
    if "image_mean" in processor:
        hints = {**hints, "mean": tuple(processor["image_mean"]), "std": tuple(processor["image_std"])}
    return {k: to_numpy(v) for k, v in state_dict.items()}, hints


def read_state_dict(path: str) -> tuple:
    """(state dict in fb/mae names, hints) of any PyTorch file or Hugging Face folder the importers read."""
    if not os.path.exists(path):
        raise MissingInputError(f"{path} does not exist.")
    state_dict, hints = read_weights(path)
    return (hf_to_fbmae(state_dict, path) if is_hf_state_dict(state_dict) else state_dict), hints


def load_pretrained(path: str, num_heads=None, decoder_heads=None) -> tuple:
    """(geometry, our params) of an MAE / CL-MAE PyTorch file or HF folder; encoder-only files give the encoder."""
    state_dict, hints = read_state_dict(path)
    if "head.weight" in state_dict:
        raise UserError(f"{path} is a ViT classifier (it has a head), not MAE / CL-MAE pretraining weights: "
                        "fine-tune from it with config.model.init_from or convert it with python -m clmae_jax.interop.")
    given = {"num_heads": num_heads, "decoder_heads": decoder_heads}
    return from_fbmae_state_dict(state_dict, path, {**hints, **{k: v for k, v in given.items() if v}})


def write_pth(state_dict: dict, geometry: dict, path: str):
    """Writes a numpy state dict as fb/mae saves it, {"model": state dict}, with our geometry under "clmae_jax"."""
    import torch
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state_dict.items()}, METADATA_KEY: dict(geometry)}, path)


def write_hf_folder(state_dict: dict, config: dict, geometry: dict, folder: str):
    """Writes a Hugging Face folder: config.json, preprocessor_config.json (the normalisation) and the weights."""
    os.makedirs(folder, exist_ok=True)
    for name, content in (("config.json", config), ("preprocessor_config.json", preprocessor_config(geometry))):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    try:
        from safetensors.numpy import save_file
    except ImportError:  # transformers also reads the older pickle format.
        import torch
        torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, os.path.join(folder, "pytorch_model.bin"))
        return
    # transformers refuses safetensors files whose metadata does not name their framework.
    save_file(state_dict, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def save_fbmae(params, geometry: dict, path: str):
    """Writes `params` as an fb/mae (CL-MAE when it has a masker) .pth: {"model": state dict, "clmae_jax": geometry}."""
    write_pth(to_fbmae_state_dict(params, geometry), geometry, path)


def save_hf(params, geometry: dict, folder: str):
    """Writes a folder ViTMAEForPreTraining.from_pretrained loads (the masking module has no place there: left out)."""
    if not geometry.get("decoder_depth") or geometry.get("decoder_heads") is None:
        raise UserError("A Hugging Face ViTMAEForPreTraining needs the decoder and its number of heads; export an "
                        "encoder alone with save_fbmae.")
    mae_geometry = {**geometry, "masker_depth": 0, "masker_heads": None}
    state_dict = fbmae_to_hf(to_fbmae_state_dict(params.get("mae", params), mae_geometry))
    write_hf_folder(state_dict, hf_config(geometry), geometry, folder)
