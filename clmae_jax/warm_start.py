"""MAE / CL-MAE pretraining started from pretrained weights: `config.model.init_from`.

The weights come from one of our MAE / CL-MAE runs (a workdir or step folder) or any file `clmae_jax.interop`
reads (facebookresearch/mae, official CL-MAE with its `masking_net.*`, Hugging Face ViTMAE). Every subtree the
source has replaces the fresh one (an encoder-only file leaves the decoder fresh; an MAE file leaves CL-MAE's
masking module fresh); the AdamW moments and the step start from zero, as a new run on those weights.
"""
import jax
import numpy as np
from absl import logging

from clmae_jax.runtime.errors import UserError
from clmae_jax.weights import read_weights


def pretraining_weights(path: str) -> dict:
    """{"mae": MAE tree, "masker"?: module tree} of numpy arrays from a run folder or a PyTorch file / folder."""
    weights = read_weights(path)
    if weights.geometry.num_classes is not None:
        raise UserError(f"config.model.init_from={path} is a ViT classifier, not MAE / CL-MAE pretraining weights; "
                        "fine-tune from it (configs/finetune_fashion_mnist.py) or point at a pretraining run.")
    return weights.params if "mae" in weights.params else {"mae": weights.params}


def replaced(fresh: dict, pretrained: dict, name: str, source: str) -> tuple[dict, list]:
    """(`fresh` with every top-level subtree of `pretrained` put in its place and dtype, names of those kept fresh);
    a leaf of another shape is a one-line UserError naming it and both shapes."""
    unknown = sorted(set(pretrained) - set(fresh))
    if unknown:
        raise UserError(f"config.model.init_from={source}: {name}/{unknown[0]} has no place in this model.")
    out = dict(fresh)
    for key, subtree in pretrained.items():
        leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh[key])
        given = jax.tree.structure(subtree)
        if given != treedef:
            raise UserError(f"config.model.init_from={source}: {name}/{key} has another layout than the config's "
                            "model (other depth or decoder?); use the model config the weights were trained with.")
        for (path, leaf), value in zip(leaves, jax.tree.leaves(subtree)):
            if np.shape(value) != leaf.shape:
                where = "/".join([name, key, *(str(k.key) for k in path)])
                raise UserError(f"config.model.init_from={source}: {where} has shape {tuple(np.shape(value))} but "
                                f"the config's model has {tuple(leaf.shape)}; use the model config the weights were "
                                "trained with.")
        out[key] = jax.tree.map(lambda leaf, value: jax.device_put(np.asarray(value, leaf.dtype), leaf.sharding),
                                fresh[key], subtree)
    return out, sorted(set(fresh) - set(pretrained))


def with_pretrained(state, config):
    """`state` (a fresh MAE or CL-MAE train state) holding the weights config.model.init_from names, if any."""
    source = config.model.get("init_from")
    if not source:
        return state
    weights = pretraining_weights(source)
    clmae = "masker" in state.params
    mae, fresh = replaced(state.params["mae"] if clmae else state.params, weights["mae"], "mae", source)
    if not clmae:
        params = mae
    elif "masker" in weights:
        params = {"mae": mae, "masker": replaced(state.params["masker"], weights["masker"], "masker", source)[0]}
    else:
        params, fresh = {"mae": mae, "masker": state.params["masker"]}, fresh + ["masking module"]
    logging.info("Initialised from %s%s", source, f"; fresh: {', '.join(fresh)}" if fresh else "")
    return state.replace(params=params)
