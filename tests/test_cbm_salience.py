"""CBM patch salience: Sobel magnitude against a direct numpy convolution, and the per-cell distribution."""
import chex
import jax
import numpy as np
import pytest

from cbm_jax.salience import patch_salience, sobel_magnitude

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)  # cv2.getDerivKernels(1, 0, 3) as a 2-D kernel.


def _numpy_sobel_magnitude(images):
    padded = np.pad(images.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    h, w = images.shape[1:3]
    dx = np.zeros(images.shape)
    dy = np.zeros(images.shape)
    for i in range(3):
        for j in range(3):
            window = padded[:, i:i + h, j:j + w]
            dx += SOBEL_X[i, j] * window
            dy += SOBEL_X.T[i, j] * window
    return np.sqrt(dx**2 + dy**2)


def _numpy_patch_salience(images, grid):
    magnitude = _numpy_sobel_magnitude(images)
    ch, cw = images.shape[1] // grid, images.shape[2] // grid
    means = np.array([[magnitude[b, r * ch:(r + 1) * ch, c * cw:(c + 1) * cw].mean()
                       for r in range(grid) for c in range(grid)] for b in range(len(images))])
    return means / means.sum(axis=1, keepdims=True)


def test_sobel_magnitude_matches_numpy_convolution():
    images = np.random.default_rng(0).integers(0, 256, (2, 12, 10, 3), dtype=np.uint8)
    magnitude = jax.jit(sobel_magnitude)(images)
    chex.assert_shape(magnitude, images.shape)
    chex.assert_type(magnitude, np.float32)
    np.testing.assert_allclose(magnitude, _numpy_sobel_magnitude(images), rtol=1e-4, atol=1e-4)


def test_sobel_of_a_ramp_is_eight_times_the_slope_inside():
    ramp = np.broadcast_to((np.arange(6, dtype=np.float32) * 3)[:, None], (1, 5, 6, 1))  # +3 per column.
    magnitude = np.asarray(sobel_magnitude(ramp))
    np.testing.assert_allclose(magnitude[0, :, 1:-1, 0], 24.0)  # (1 + 2 + 1) * (2 * 3).
    np.testing.assert_allclose(magnitude[0, :, [0, -1], 0], 0.0)  # Reflect-101 makes the border symmetric.


@pytest.mark.parametrize("row,col", [(0, 0), (2, 1), (1, 3), (3, 3)])
def test_textured_cell_is_the_most_salient(row, col):
    grid, cell = 4, 8
    image = np.full((1, grid * cell, grid * cell, 3), 100, np.uint8)
    texture = np.random.default_rng(row * grid + col).integers(0, 256, (cell, cell, 3), dtype=np.uint8)
    image[0, row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = texture
    probs = np.asarray(patch_salience(image, grid))
    assert probs.argmax() == row * grid + col
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)


def test_patch_salience_matches_numpy_on_random_images():
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    probs = jax.jit(patch_salience, static_argnums=1)(images, 4)
    chex.assert_shape(probs, (3, 16))
    chex.assert_type(probs, np.float32)
    np.testing.assert_allclose(probs, _numpy_patch_salience(images, 4), rtol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_flat_image_gives_exactly_uniform():
    images = np.stack([np.zeros((8, 8, 3), np.float32), np.full((8, 8, 3), 200.0, np.float32)])
    probs = np.asarray(patch_salience(images, 2))
    np.testing.assert_array_equal(probs, np.full((2, 4), 0.25, np.float32))


def test_indivisible_size_raises():
    with pytest.raises(ValueError, match="not divisible"):
        patch_salience(np.zeros((1, 10, 8, 3), np.float32), 4)
