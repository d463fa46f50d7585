"""Analytic matmul FLOPs of the MAE step and the CL-MAE iteration: the cross-check of XLA's cost analysis."""
from clmae_jax.models.mae import num_visible
from clmae_jax.models.vit import vit_size


def transformer_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward matmul FLOPs of `depth` blocks on `tokens` tokens: qkv, attention, projection, MLP."""
    per_block = 2 * tokens * width * (3 * width + width + 2 * mlp_ratio * width) + 2 * 2 * tokens ** 2 * width
    return depth * per_block


def mae_flops(config) -> float:
    """Forward + backward (3x forward) matmul FLOPs of one MAE step per image."""
    m, size, channels = config.model, vit_size(config.model.size), config.input.channels
    patches = (config.input.image_size // m.patch_size) ** 2
    visible = num_visible(patches, config.mae.mask_ratio)
    embed = 2 * patches * m.patch_size ** 2 * channels * size["width"]
    encoder = transformer_flops(visible + 1, size["width"], size["depth"])
    decoder = transformer_flops(patches + 1, m.decoder_width, m.decoder_depth)
    heads = (2 * (visible + 1) * size["width"] * m.decoder_width
             + 2 * patches * m.decoder_width * m.patch_size ** 2 * channels)
    return 3 * (embed + encoder + decoder + heads)


def clmae_flops(config) -> float:
    """Forward + backward FLOPs of one CL-MAE iteration per image: MAE step + module step on all tokens."""
    m, size = config.model, vit_size(config.model.size)
    patches = (config.input.image_size // m.patch_size) ** 2
    masker = transformer_flops(patches + 1, size["width"], config.clmae.masker.depth) + 2 * size["width"] * patches
    full_mae = (transformer_flops(patches + 1, size["width"], size["depth"])
                + transformer_flops(patches + 1, m.decoder_width, m.decoder_depth))
    # MAE step: its own cost plus a module forward. Module step: module forward + backward (3x), full MAE forward
    # plus the backward to its inputs only (2x: the frozen MAE needs no weight gradients).
    return mae_flops(config) + masker + 3 * masker + 2 * full_mae
