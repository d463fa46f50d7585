"""Patch salience for CBM: mean Sobel gradient magnitude per grid cell, normalised to a distribution.

The official code (data_handlers.py) runs cv2.Sobel (3x3, BORDER_REFLECT_101) on each RGB channel of the uint8
image, takes sqrt(dx^2 + dy^2), averages it over each cell of a 4x4 grid and divides by the sum. Here it runs on
device, on un-normalised pixels (any scale: the normalisation to a distribution cancels it).
"""
import jax.numpy as jnp

from clmae_jax.runtime.errors import check_tiling


def sobel_magnitude(images):
    """Per-channel 3x3 Sobel magnitude sqrt(dx^2 + dy^2), as cv2.Sobel; [B,H,W,C] -> [B,H,W,C] float32."""
    x = jnp.pad(images.astype(jnp.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")  # BORDER_REFLECT_101.
    # The Sobel kernels are separable: a central difference along one axis, [1, 2, 1] smoothing along the other.
    diff_w = x[:, :, 2:] - x[:, :, :-2]
    diff_h = x[:, 2:] - x[:, :-2]
    dx = diff_w[:, :-2] + 2 * diff_w[:, 1:-1] + diff_w[:, 2:]
    dy = diff_h[:, :, :-2] + 2 * diff_h[:, :, 1:-1] + diff_h[:, :, 2:]
    return jnp.sqrt(dx**2 + dy**2)


def patch_salience(images, grid=4):
    """p_i = m_i / sum_j m_j, m_i the mean Sobel magnitude of cell i (row-major); [B,H,W,C] -> [B,grid^2] float32."""
    b, h, w, c = images.shape
    check_tiling(h, w, grid, f"the {grid}x{grid} patch grid",
                 f"resize the images to a multiple of {grid} or change config.cbm.grid")
    magnitude = sobel_magnitude(images).reshape(b, grid, h // grid, grid, w // grid, c)
    cell_means = magnitude.mean(axis=(2, 4, 5)).reshape(b, grid * grid)
    total = cell_means.sum(axis=1, keepdims=True)
    # The official code has no epsilon and gives NaN for a flat image; uniform (= random masking) is the safe fallback.
    return jnp.where(total > 0, cell_means / jnp.where(total > 0, total, 1.0), 1.0 / (grid * grid))
