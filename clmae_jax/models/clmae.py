"""The MAE and the CL-MAE pair (MAE + curriculum masking module) assembled from a config.

Everything a trainer, a benchmark, an evaluator or an importer needs to build these models lives here, so no
trainer imports another trainer.
"""
import jax
import jax.numpy as jnp

from clmae_jax.models.mae import MaskedAutoencoder, mae_loss, num_visible, per_patch_error
from clmae_jax.models.masker import CurriculumMasker
from clmae_jax.models.vit import vit_size


def num_patches(config) -> int:
    """Patches per image (validate.check_model has checked that the image tiles into patches)."""
    return (config.input.image_size // config.model.patch_size) ** 2


def build_mae(config) -> MaskedAutoencoder:
    """The MAE named by config.model (ViT size + decoder) for config.input's image channels."""
    m = config.model
    return MaskedAutoencoder(patch_size=m.patch_size, **vit_size(m.size), decoder_width=m.decoder_width,
                             decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                             channels=config.input.channels, dtype=jnp.dtype(m.dtype),
                             attention=m.attention, remat=m.remat)


def stored_params(params, config):
    """`params` in config.model.param_dtype: float32, or bfloat16 to halve parameter and AdamW-moment memory (the
    update itself is then rounded to bfloat16; compute runs in config.model.dtype either way)."""
    dtype = jnp.dtype(config.model.param_dtype)
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def init_params(model, config, rng):
    """Parameters of `model` for config.input's image shape, stored in config.model.param_dtype."""
    shape = (1, config.input.image_size, config.input.image_size, config.input.channels)
    patches = num_patches(config)
    params = model.init(rng, jnp.zeros(shape), jnp.zeros((1, patches)), patches // 4)["params"]
    return stored_params(params, config)


def random_masked_loss(model, config, params, images, rng):
    """MAE loss with per-image random masking of config.mae.mask_ratio of the patches: (loss, (pred, mask))."""
    patches = num_patches(config)
    keep_scores = jax.random.uniform(rng, (images.shape[0], patches))
    pred, mask = model.apply({"params": params}, images, keep_scores, num_visible(patches, config.mae.mask_ratio))
    return mae_loss(images, pred, mask, config.model.patch_size, config.mae.norm_pix_loss), (pred, mask)


def build_masker(config) -> CurriculumMasker:
    """The curriculum masking module with config.clmae.masker's hyperparameters, at the MAE encoder's width and with
    its dtype, attention and remat (config.model); its 4 heads are 192 to 320 wide, so cuDNN's fused attention takes
    ViT-B's and ViT-L's only."""
    m = config.model
    return CurriculumMasker(**config.clmae.masker, dtype=jnp.dtype(m.dtype), attention=m.attention, remat=m.remat)


class CLMAE:
    """The MAE and its masking module, applied the two ways CL-MAE needs."""

    def __init__(self, config):
        self.config, self.mae, self.masker = config, build_mae(config), build_masker(config)
        self.num_keep = num_visible(num_patches(config), config.mae.mask_ratio)

    def init(self, rng):
        """Parameters of both halves: {"mae", "masker"}."""
        mae_params = init_params(self.mae, self.config, rng)
        tokens = jnp.zeros((1, num_patches(self.config), self.mae.width))
        masker_params = self.masker.init(jax.random.fold_in(rng, 1), tokens)["params"]
        return {"mae": mae_params, "masker": stored_params(masker_params, self.config)}

    def keep_probabilities(self, params, images):
        """(tokens, keep-probabilities): the module reads the MAE's patch + position embedding, never trains it."""
        tokens = self.mae.apply({"params": params["mae"]}, images, method=MaskedAutoencoder.embed)
        tokens = jax.lax.stop_gradient(tokens)
        return tokens, self.masker.apply({"params": params["masker"]}, tokens)

    def learned_mask_loss(self, mae_params, images, keep_prob):
        """MAE loss when the top-k tokens by keep-probability stay visible (the MAE step): (loss, (pred, mask))."""
        pred, mask = self.mae.apply({"params": mae_params}, images, keep_prob, self.num_keep)
        return mae_loss(images, pred, mask, self.config.model.patch_size, self.config.mae.norm_pix_loss), (pred, mask)

    def soft_errors(self, mae_params, tokens, keep_prob, images):
        """Per-patch errors when every token is scaled by its keep-probability (the masking-module step)."""
        pred = self.mae.apply({"params": mae_params}, tokens, keep_prob, method=MaskedAutoencoder.reconstruct_soft)
        return per_patch_error(images, pred, self.config.model.patch_size, self.config.mae.norm_pix_loss)
