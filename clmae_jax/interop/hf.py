"""Hugging Face <-> fb/mae: ViTMAE / ViT parameter names and config JSON.

HF names come in the Hub's (transformers 4) spelling and transformers 5's renamed one; their q/k/v projections
are separate, ours (and fb/mae's) one fused `qkv`. Everything goes through the fb/mae layout: HF dicts are renamed
into it on import and out of it on export.
"""
import re

import numpy as np
from absl import logging

from clmae_jax.interop.shapes import require
from clmae_jax.models.geometry import Geometry
from clmae_jax.runtime.errors import UserError


LAYER_NORM_EPS = 1e-6  # Hard-coded in our ViT, as in facebookresearch/mae.


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


def vit_config(geometry: Geometry) -> dict:
    """The config.json fields every HF ViT with our geometry shares (LayerNorm eps 1e-6, exact GELU, no dropout)."""
    return {"hidden_size": geometry["width"], "num_hidden_layers": geometry["depth"],
            "num_attention_heads": geometry["num_heads"],
            "intermediate_size": int(round(geometry["width"] * geometry["mlp_ratio"])),
            "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02, "layer_norm_eps": LAYER_NORM_EPS, "qkv_bias": True,
            "image_size": geometry["image_size"], "patch_size": geometry["patch_size"],
            "num_channels": geometry["channels"]}


def hf_config(geometry: Geometry) -> dict:
    """config.json of a ViTMAEForPreTraining with our geometry."""
    return {"architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae", **vit_config(geometry),
            "decoder_hidden_size": geometry["decoder_width"], "decoder_num_hidden_layers": geometry["decoder_depth"],
            "decoder_num_attention_heads": geometry["decoder_heads"],
            "decoder_intermediate_size": int(round(geometry["decoder_width"] * geometry["mlp_ratio"])),
            "mask_ratio": 0.75 if geometry.get("mask_ratio") is None else geometry["mask_ratio"],
            "norm_pix_loss": bool(geometry.get("norm_pix_loss"))}


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


def preprocessor_config(geometry: Geometry) -> dict:
    """preprocessor_config.json carrying the normalisation the encoder was trained with."""
    size = geometry["image_size"]
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(geometry["mean"]), "image_std": list(geometry["std"])}


def hf_classifier_config(geometry: Geometry) -> dict:
    """config.json of a ViTForImageClassification with our geometry."""
    labels = {str(i): f"LABEL_{i}" for i in range(geometry["num_classes"])}
    return {"architectures": ["ViTForImageClassification"], "model_type": "vit", **vit_config(geometry),
            "id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}
