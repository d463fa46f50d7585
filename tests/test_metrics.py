"""Image grids: layout, clipping, and the enlargement of small images."""
import numpy as np

from clmae_jax.runtime.metrics import image_grid


def test_small_images_are_enlarged_by_an_integer_factor_and_tiled_row_per_sample():
    images = np.random.default_rng(0).uniform(-0.5, 1.5, (2, 28, 28, 1))
    grid = image_grid([images, 1 - images], pad=2, min_size=96)
    assert grid.shape == (2 * (84 + 2) + 2, 2 * (84 + 2) + 2, 1)  # 28 px x 3 = 84 px per image.
    clipped = np.clip(images, 0, 1)
    np.testing.assert_allclose(grid[2:86, 2:86, 0], clipped[0, :, :, 0].repeat(3, 0).repeat(3, 1))
    np.testing.assert_allclose(grid[88:172, 88:172, 0], np.clip(1 - images[1], 0, 1)[:, :, 0].repeat(3, 0).repeat(3, 1))
    assert grid[0].min() == 1.0  # White padding.


def test_large_images_keep_their_size():
    images = np.zeros((1, 224, 224, 3))
    assert image_grid([images], pad=2).shape == (228, 228, 3)
