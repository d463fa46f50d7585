"""Starting a ViT classifier from pretrained weights (config.model.init_from): an MAE / CL-MAE encoder from one
of our runs or a PyTorch file, or a whole PyTorch / Hugging Face ViT classifier."""
from absl import logging

from clmae_jax import warm_start
from clmae_jax.evaluate import load
from clmae_jax.models.geometry import Geometry, check_same_encoder, config_geometry
from clmae_jax.models.vit import resize_positions
from clmae_jax.runtime.errors import UserError
from clmae_jax.weights import read_weights


def with_pretrained_weights(variables: dict, config, path: str) -> dict:
    """ViT classifier `variables` started from `path`: an MAE / CL-MAE run or PyTorch file (its encoder) or a
    PyTorch / Hugging Face ViT classifier (every weight that fits)."""
    weights = read_weights(path, encoder_only=True)
    if weights.geometry.num_classes is not None:
        return with_pretrained_classifier(variables, config, weights.geometry, weights.params, path)
    return with_pretrained_encoder(variables, config, load.pretrained_encoder(weights))


def model_description(config) -> str:
    """'config.model (size 'mini', patch_size 4)', for error messages."""
    return f"config.model (size {config.model.size!r}, patch_size {config.model.patch_size})"


def with_leaves(variables: dict, pretrained: dict, source: str) -> dict:
    """`variables` whose top-level params named in `pretrained` are replaced, every leaf's shape checked."""
    params, _ = warm_start.replaced(variables["params"], pretrained, "params", source)
    logging.info("Initialised %s from the %s", ", ".join(sorted(pretrained)), source)
    return {**variables, "params": params}


def with_pretrained_encoder(variables: dict, config, encoder) -> dict:
    """ViT classifier `variables` whose patch embedding, CLS token and blocks are a pretrained MAE / CL-MAE
    encoder's; the head (and fc_norm, and a learned position table: the sin-cos one) stay fresh, as in MAE
    fine-tuning."""
    check_same_encoder(encoder.geometry, f"encoder {encoder.name}", config_geometry(config),
                       model_description(config))
    pretrained = dict(encoder.params)
    if config.model.pool == "gap_norm":  # The encoder's final norm is replaced by fc_norm after pooling.
        pretrained["encoder"] = {k: v for k, v in pretrained["encoder"].items() if k != "norm"}
    return with_leaves(variables, pretrained, f"encoder {encoder.name}")


def with_pretrained_classifier(variables: dict, config, geometry: Geometry, params: dict, path: str) -> dict:
    """ViT classifier `variables` holding an imported classifier's weights; the head stays fresh when the number
    of classes differs, and a learned position table is resized to the config's patch grid."""
    check_same_encoder(geometry, f"classifier {path}", config_geometry(config), model_description(config))
    if geometry["pool"] != config.model.pool:
        raise UserError(f"{path} pools {geometry['pool']!r} but config.model.pool={config.model.pool!r}; set "
                        f"config.model.pool={geometry['pool']!r}.")
    if geometry["pos_embed"] == "learned" and config.model.pos_embed != "learned":
        raise UserError(f"{path} has a learned position table; set config.model.pos_embed='learned'.")
    pretrained = dict(params)
    if "pos_embed" in pretrained:
        grid = config.input.image_size // config.model.patch_size
        pretrained["pos_embed"] = {"table": resize_positions(pretrained["pos_embed"]["table"], grid)}
    classes = variables["params"]["head"]["kernel"].shape[1]
    if geometry["num_classes"] != classes:
        logging.info("%s has %d classes, the config %d: its head is not used.", path, geometry["num_classes"],
                     classes)
        del pretrained["head"]
    return with_leaves(variables, pretrained, f"classifier {path}")
