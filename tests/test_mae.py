"""MAE model: patchify round trip, top-k/random masking, encoder on visible tokens only, masked-only loss."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmae_jax.models import mae
from clmae_jax.models.vit import sincos_2d

TINY = dict(patch_size=4, width=32, depth=2, num_heads=4, decoder_width=16, decoder_depth=1, decoder_heads=2)


def test_patchify_roundtrip_and_layout():
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 12, 3))
    patches = mae.patchify(images, 4)
    chex.assert_shape(patches, (2, 9, 48))
    # Patch 5 is row 1, column 2 (row-major), pixels ordered (p, q, c) inside it.
    np.testing.assert_array_equal(patches[0, 5], images[0, 4:8, 8:12].reshape(-1))
    np.testing.assert_array_equal(mae.unpatchify(patches, 4, 3), images)


def test_sincos_matches_mae_reference_layout():
    emb = sincos_2d(8, 3)
    chex.assert_shape(emb, (9, 8))
    # First half encodes the column, second half the row (MAE's get_2d_sincos_pos_embed).
    np.testing.assert_allclose(emb[1, :4], [np.sin(1), np.sin(1e-2), np.cos(1), np.cos(1e-2)], rtol=1e-6)
    np.testing.assert_allclose(emb[1, 4:], [0, 0, 1, 1], atol=1e-7)
    np.testing.assert_allclose(emb[3, 4:], [np.sin(1), np.sin(1e-2), np.cos(1), np.cos(1e-2)], rtol=1e-6)


@pytest.mark.parametrize("ratio", [0.75, 0.6, 0.9])
def test_random_masking_keeps_exactly_len_keep(ratio):
    tokens = jnp.arange(2 * 49 * 3, dtype=jnp.float32).reshape(2, 49, 3)
    k = mae.num_visible(49, ratio)  # Uniform noise as keep scores: MAE's random masking (clmae.random_masked_loss).
    visible, mask, ids_restore = mae.topk_masking(tokens, jax.random.uniform(jax.random.PRNGKey(1), (2, 49)), k)
    assert k == int(49 * (1 - ratio))
    chex.assert_shape(visible, (2, k, 3))
    np.testing.assert_array_equal(mask.sum(axis=1), [49 - k] * 2)
    for b in range(2):  # Visible tokens are exactly the unmasked positions.
        kept = np.flatnonzero(np.asarray(mask[b]) == 0)
        np.testing.assert_array_equal(np.sort(np.asarray(visible[b, :, 0])), tokens[b, kept, 0])
    np.testing.assert_array_equal(jnp.sort(ids_restore, axis=1), jnp.tile(jnp.arange(49), (2, 1)))


def test_topk_masking_keeps_highest_scores():
    scores = jnp.array([[0.1, 0.9, 0.5, 0.7]])
    tokens = jnp.arange(4, dtype=jnp.float32).reshape(1, 4, 1)
    visible, mask, _ = mae.topk_masking(tokens, scores, 2)
    np.testing.assert_array_equal(visible[0, :, 0], [1, 3])
    np.testing.assert_array_equal(mask[0], [1, 0, 1, 0])


def test_encoder_sees_only_visible_tokens():
    model = mae.MaskedAutoencoder(**TINY)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    scores = jax.random.uniform(jax.random.PRNGKey(1), (2, 16))
    params = model.init(jax.random.PRNGKey(2), images, scores, 4)
    (pred, mask), inter = model.apply(params, images, scores, 4, capture_intermediates=True,
                                      mutable=["intermediates"])
    encoder_out = inter["intermediates"]["encoder"]["__call__"][0]
    chex.assert_shape(encoder_out, (2, 1 + 4, 32))  # CLS + the 4 kept tokens.
    chex.assert_shape(pred, (2, 16, 48))
    np.testing.assert_array_equal(mask.sum(axis=1), [12, 12])


def test_loss_counts_masked_patches_only():
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    target = mae.patchify(images, 4)
    mask = jnp.array([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    # Wrong only where visible: zero loss.
    pred = jnp.where(mask[..., None] == 1, target, target + 5.0)
    assert float(mae.mae_loss(images, pred, mask, 4, norm_pix_loss=False)) == 0.0
    # Wrong by 1 on masked patches: loss exactly 1 (mean over masked patches of per-patch MSE).
    pred = jnp.where(mask[..., None] == 1, target + 1.0, target)
    np.testing.assert_allclose(mae.mae_loss(images, pred, mask, 4, norm_pix_loss=False), 1.0, rtol=1e-6)


def test_norm_pix_targets_and_denormalization_invert():
    images = jax.random.uniform(jax.random.PRNGKey(0), (1, 8, 8, 3))
    target = mae.patch_targets(images, 4, norm_pix_loss=True)
    np.testing.assert_allclose(target.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(mae.denormalize_prediction(images, target, 4, True), images, atol=1e-3)


def test_soft_reconstruction_uses_all_tokens_and_no_mask_token():
    model = mae.MaskedAutoencoder(**TINY)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    params = model.init(jax.random.PRNGKey(2), images, jnp.zeros((2, 16)), 4)
    tokens = model.apply(params, images, method=mae.MaskedAutoencoder.embed)
    keep = jnp.full((2, 16), 0.5)
    pred = model.apply(params, tokens, keep, method=mae.MaskedAutoencoder.reconstruct_soft)
    chex.assert_shape(pred, (2, 16, 48))
    # The mask token must not matter on this path.
    changed = jax.tree_util.tree_map(lambda x: x, params)
    changed["params"]["mask_token"] = params["params"]["mask_token"] + 10.0
    np.testing.assert_allclose(model.apply(changed, tokens, keep, method=mae.MaskedAutoencoder.reconstruct_soft),
                               pred, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
    model = mae.MaskedAutoencoder(**TINY, dtype=jnp.bfloat16)
    images = jnp.ones((1, 16, 16, 3))
    params = model.init(jax.random.PRNGKey(0), images, jnp.zeros((1, 16)), 4)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    pred, _ = model.apply(params, images, jnp.zeros((1, 16)), 4)
    assert pred.dtype == jnp.bfloat16


def test_image_size_not_divisible_by_patch_is_a_clear_error():
    model = mae.MaskedAutoencoder(**TINY)
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 18, 18, 3)), jnp.zeros((1, 16)), 4)
