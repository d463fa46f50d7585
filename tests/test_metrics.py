"""Image grids: layout, clipping, and the enlargement of small images; reading logged scalars back."""
import numpy as np

from clmae_jax.runtime.metrics import create_writer, image_grid, read_scalars, read_tags


def test_several_scalars_read_back_in_one_pass_as_written(tmp_path):
    writer = create_writer(str(tmp_path))
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": 2.0 ** -step, "accuracy": 0.25 * step})
    writer.write_scalars(3, {"test_accuracy": 0.5})
    writer.flush()
    read = read_tags(str(tmp_path), ("loss", "test_accuracy", "never_logged"))
    assert read == {"loss": {1: 0.5, 2: 0.25, 3: 0.125}, "test_accuracy": {3: 0.5}, "never_logged": {}}
    assert read_scalars(str(tmp_path), "accuracy") == {1: 0.25, 2: 0.5, 3: 0.75}


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


def test_titles_sit_in_a_band_above_their_columns_and_leave_the_images_unchanged():
    images = np.random.default_rng(0).uniform(0, 1, (2, 28, 28, 3))
    titles = ["original", "reconstruction + visible"]
    plain, titled = image_grid([images, 1 - images]), image_grid([images, 1 - images], titles)
    band = titled.shape[0] - plain.shape[0]
    assert band > 0 and titled.shape[1:] == plain.shape[1:]
    np.testing.assert_array_equal(titled[band:], plain)
    for j in range(len(titles)):  # Ink over each column, none over the padding between them.
        left = 2 + j * (84 + 2)
        assert titled[:band, left:left + 84].min() < 0.5
        assert titled[:band, left - 2:left].min() == 1.0


def test_reconstruction_pictures_are_titled_columns():
    import ml_collections
    from clmae_jax.pictures import TITLES, masking_columns
    config = ml_collections.ConfigDict(dict(input=dict(mean=[0.5], std=[0.25]), model=dict(patch_size=4),
                                            mae=dict(norm_pix_loss=True)))
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1)).astype(np.uint8)
    pred, mask = np.zeros((2, 4, 16), np.float32), np.array([[1, 0, 0, 1]] * 2, np.float32)
    grid = masking_columns(config, images, pred, mask)
    untitled_height = 2 * (96 + 2) + 2
    assert grid.shape == (grid.shape[0], len(TITLES) * (96 + 2) + 2, 1) and grid.shape[0] > untitled_height
    assert grid[:grid.shape[0] - untitled_height].min() < 0.5
