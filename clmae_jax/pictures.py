"""Pictures of masked image modeling shared by MAE and CL-MAE: input, mask, reconstruction, side by side."""
import jax.numpy as jnp
import numpy as np

from clmae_jax.models.mae import denormalize_prediction
from clmae_jax.runtime import data, metrics


TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")


def masking_columns(config, images, pred, mask) -> np.ndarray:
    """The titled grid of TITLES for a batch given predicted patches and the binary mask (1 = removed)."""
    mean, std = jnp.asarray(config.input.mean), jnp.asarray(config.input.std)
    normalized = data.normalize(images, mean, std)
    recon = denormalize_prediction(normalized, pred, config.model.patch_size, config.mae.norm_pix_loss) * std + mean
    pixel_mask = metrics.upsample_cells(mask, images.shape[1])
    original = np.asarray(images, np.float32) / 255.0
    recon = np.asarray(recon)
    return metrics.image_grid([original, original * (1 - pixel_mask) + 0.5 * pixel_mask, recon,
                               original * (1 - pixel_mask) + recon * pixel_mask], TITLES)
