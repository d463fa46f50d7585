"""MAE steps checked by hand-made inputs, without torch: the shuffle before the encoder and the unshuffle in the
decoder, and norm_pix_loss's targets on a flat patch (where a missing variance epsilon divides 0 by 0)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clmae_jax.models import mae
from clmae_jax.models.vit import Transformer, sincos_2d

WIDTH, GRID = 8, 4  # Encoder and decoder both 8 wide, so an identity decoder_embed hands tokens on unchanged.
TINY = dict(patch_size=4, width=WIDTH, depth=1, num_heads=2, decoder_width=WIDTH, decoder_depth=1, decoder_heads=2,
            channels=1)
MASK_TOKEN = 100.0


def transparent_decoder_params(model):
    """Parameters whose decoder_embed is the identity and whose mask token is MASK_TOKEN everywhere (the rest are
    zeros: only what reaches the decoder's transformer is looked at)."""
    images = jnp.zeros((1, GRID * 4, GRID * 4, 1))
    shapes = jax.eval_shape(lambda rng: model.init(rng, images, jnp.zeros((1, GRID ** 2)), 4), jax.random.key(0))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"])
    params.update(decoder_embed={"kernel": jnp.eye(WIDTH), "bias": jnp.zeros(WIDTH)},
                  mask_token=jnp.full((1, 1, WIDTH), MASK_TOKEN))
    return {"params": params}


def decoder_input(model, params, latent, ids_restore):
    """The tokens forward_decoder hands its transformer (CLS first, positions added), caught on the way in."""
    def run(params, latent, ids_restore):
        caught = []

        def catch(next_fun, args, kwargs, context):
            if isinstance(context.module, Transformer) and context.method_name == "__call__":
                caught.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(catch):
            model.apply(params, latent, ids_restore, method=mae.MaskedAutoencoder.forward_decoder)
        (tokens,) = caught
        return tokens

    return np.asarray(jax.jit(run)(params, latent, ids_restore))  # One compile: faster than op-by-op on CPU.


def test_shuffle_then_unshuffle_is_the_identity_on_visible_tokens_and_puts_mask_tokens_where_the_mask_says():
    """Guards topk_masking's shuffle and forward_decoder's unshuffle (ids_restore), checked without torch."""
    model = mae.MaskedAutoencoder(**TINY)
    params = transparent_decoder_params(model)
    tokens = jax.random.normal(jax.random.PRNGKey(1), (3, GRID ** 2, WIDTH))
    scores = jax.random.uniform(jax.random.PRNGKey(2), (3, GRID ** 2))
    visible, mask, ids_restore = mae.topk_masking(tokens, scores, 5)
    # The mask removes all but the 5 best-scored tokens, and the encoder gets exactly those, best first.
    best = np.argsort(-np.asarray(scores), axis=1)[:, :5]
    np.testing.assert_array_equal(np.asarray(mask), 1 - (np.arange(GRID ** 2) == best[..., None]).any(1))
    np.testing.assert_array_equal(visible, np.take_along_axis(np.asarray(tokens), best[..., None], axis=1))
    # The encoder's output stands in as the visible tokens themselves behind a CLS row.
    cls = jnp.full((3, 1, WIDTH), -7.0)
    received = decoder_input(model, params, jnp.concatenate([cls, visible], axis=1), ids_restore)
    np.testing.assert_array_equal(received[:, 0], cls[:, 0])
    patches = received[:, 1:] - sincos_2d(WIDTH, GRID)[None]
    expected = np.where(np.asarray(mask)[..., None] == 1, MASK_TOKEN, np.asarray(tokens))
    np.testing.assert_allclose(patches, expected, atol=1e-5)


def test_norm_pix_targets_of_a_flat_patch_are_finite_and_equal_to_the_formula():
    """Guards norm_pix_loss's variance epsilon: a flat patch gives 0 / sqrt(0 + 1e-6), not 0 / 0."""
    images = np.zeros((1, 8, 8, 1), np.float32)
    images[0, :4, :4] = 0.3  # Patch 0 flat and non-zero, patch 1 flat at zero (Fashion-MNIST's background).
    images[0, 4:, :4, 0] = np.linspace(-1, 1, 16).reshape(4, 4)
    images[0, 4:, 4:] = np.random.default_rng(0).normal(size=(4, 4, 1))
    target = np.asarray(mae.patch_targets(jnp.asarray(images), 4, norm_pix_loss=True))
    assert np.isfinite(target).all()
    # MAE's formula: (x - mean) / sqrt(unbiased var + 1e-6), per patch, here in float64.
    patches = np.asarray(mae.patchify(jnp.asarray(images), 4), np.float64)
    mean, var = patches.mean(-1, keepdims=True), patches.var(-1, ddof=1, keepdims=True)
    np.testing.assert_allclose(target, (patches - mean) / np.sqrt(var + 1e-6), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(target[0, :2], 0)
    # The loss and its gradient stay finite, and the prediction maps back to the flat pixels.
    mask = jnp.ones((1, 4))
    loss, grad = jax.value_and_grad(lambda p: mae.mae_loss(jnp.asarray(images), p, mask, 4, True))(jnp.ones((1, 4, 16)))
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(mae.denormalize_prediction(jnp.asarray(images), jnp.asarray(target), 4, True), images,
                               atol=1e-5)
