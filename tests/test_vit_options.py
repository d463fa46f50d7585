"""ViT options that change speed and memory, not the numbers: the einsum attention and GELU against their textbook
formulas, fused attention (`jax.nn.dot_product_attention`) against the einsum one, per-block rematerialisation, and
bfloat16 parameters (the same losses within bfloat16's rounding)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmae_jax import train_clmae, train_mae
from clmae_jax.models.clmae import build_mae, init_params, random_masked_loss
from clmae_jax.models.vit import Attention, PatchEmbed, einsum_attention, exact_gelu
from clmae_jax.runtime import loop, mesh as mesh_lib
from configs import clmae_fashion_mnist, mae_fashion_mnist
from conftest import assert_trees_close


def loss_and_grads(attention: str, remat: bool):
    """MAE loss and parameter gradients on fixed images, with the given attention implementation and remat."""
    config = mae_fashion_mnist.get_config("smoke")
    config.model.attention, config.model.remat = attention, remat
    model = build_mae(config)
    params = init_params(model, config, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1))
    loss_fn = lambda p: random_masked_loss(model, config, p, images, jax.random.PRNGKey(2))[0]
    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.fixture(scope="module")
def reference():
    """The einsum attention without remat."""
    return loss_and_grads("einsum", False)


@pytest.mark.parametrize("attention, remat", [("xla", False), ("einsum", True)])
def test_option_gives_the_reference_loss_and_gradients(reference, attention, remat):
    loss, grads = loss_and_grads(attention, remat)
    np.testing.assert_allclose(loss, reference[0], rtol=1e-6)
    assert_trees_close(grads, reference[1], atol=1e-6)


def test_remat_gives_the_masking_modules_probabilities_and_gradients():
    from clmae_jax.models.masker import CurriculumMasker
    tokens = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 32))
    params = CurriculumMasker(depth=2).init(jax.random.PRNGKey(1), tokens)
    outputs, programs = {}, {}
    for remat in (False, True):
        masker = CurriculumMasker(depth=2, remat=remat)
        loss = lambda p: jnp.sum(masker.apply(p, tokens) * jnp.arange(16.0))
        outputs[remat] = jax.jit(jax.value_and_grad(loss))(params)
        programs[remat] = str(jax.make_jaxpr(loss)(params))
    assert "remat" in programs[True] and "remat" not in programs[False]
    np.testing.assert_allclose(outputs[True][0], outputs[False][0], rtol=1e-6)
    assert_trees_close(outputs[True][1], outputs[False][1], atol=1e-6)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(outputs[False][1]['params']['blocks']))


def training_losses(config_module, experiment_cls, loss_key: str, param_dtype: str, steps: int = 4):
    """(losses of `steps` updates of the real experiment on fixed real-sized images, the final train state)."""
    config = config_module.get_config("smoke")
    config.model.param_dtype = param_dtype
    experiment = experiment_cls(config, mesh_lib.make_mesh(), loop.Budget(config, 100, 100))
    state = experiment.create_train_state()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (config.batch_size, 28, 28, 1), dtype=np.uint8)
    batch = mesh_lib.to_global({"image": images}, experiment.mesh)
    losses = []
    for step in range(1, steps + 1):  # The loop's 1-based step numbers.
        state, measurements = experiment.train_step(state, batch, step)
        losses.append(float(measurements[loss_key]))
    return np.array(losses), state


@pytest.mark.slow
@pytest.mark.parametrize("setup", [(mae_fashion_mnist, train_mae.MAE, "loss"),
                                   (clmae_fashion_mnist, train_clmae.CLMAEExperiment, "mae_loss")],
                         ids=["mae", "clmae"])
def test_bfloat16_parameters_halve_the_state_and_keep_the_losses(setup):
    reference, fp32_state = training_losses(*setup, "float32")
    losses, state = training_losses(*setup, "bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    nbytes = lambda tree: sum(leaf.nbytes for leaf in jax.tree.leaves(tree) if leaf.ndim)
    assert nbytes(state.params) * 2 == nbytes(fp32_state.params)
    assert nbytes(state.opt_state) * 2 == nbytes(fp32_state.opt_state)  # AdamW's moments follow the parameters.
    np.testing.assert_allclose(losses, reference, rtol=2e-2)
    assert losses[-1] < losses[0]


def textbook_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v over [B, L, H, D], normalised before the product with v."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def test_einsum_attention_is_softmax_attention_with_its_gradients():
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 197, 4, 16))  # 197 tokens: ViT-B/16's decoder.
    q, k = 7 * q, 7 * k  # Logits beyond 100, which overflow exp in float32 without the max shift.
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q64, k64) / 4.0
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    expected = np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v64)
    np.testing.assert_allclose(einsum_attention(q, k, v), expected, atol=2e-5)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), q.shape)
    grads = lambda f: jax.grad(lambda *qkv: jnp.sum(f(*qkv) * cotangent), argnums=(0, 1, 2))(q, k, v)
    assert_trees_close(grads(einsum_attention), grads(textbook_attention), atol=2e-4)
    assert einsum_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v))).dtype == jnp.bfloat16


def test_exact_gelu_is_torchs_erf_gelu_with_its_gradient():
    x = jnp.linspace(-6.0, 6.0, 1001)
    expected = [0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in np.asarray(x, np.float64)]
    np.testing.assert_allclose(exact_gelu(x), expected, atol=1e-6)
    grad = jax.vmap(jax.grad(exact_gelu))(x)
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(lambda t: nn.gelu(t, approximate=False)))(x), atol=1e-6)
    assert exact_gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_patch_embedding_is_the_stride_p_convolution_it_replaced():
    """PatchEmbed (patchify, then one matmul with the [p, p, C, width] kernel) gives timm's Conv2d(kernel = stride =
    p) tokens, in the same row-major order, over a 2 x 3 grid of patches."""
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 12, 3))
    embed = PatchEmbed(patch_size=4, width=5)
    params = embed.init(jax.random.PRNGKey(1), images)
    proj = params["params"]["proj"]
    conv = jax.lax.conv_general_dilated(images, proj["kernel"], (4, 4), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + proj["bias"]
    np.testing.assert_allclose(embed.apply(params, images), conv.reshape(2, 6, 5), rtol=1e-5, atol=1e-5)


def test_xla_attention_equals_einsum_on_long_sequences():
    # 197 tokens and 64-wide heads: the ViT-B/16 shapes at 224 px, where a fused kernel would tile the softmax.
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 197, 128))
    outputs = {}
    for implementation in ("einsum", "xla"):
        layer = Attention(num_heads=2, implementation=implementation)
        params = layer.init(jax.random.PRNGKey(1), x)
        outputs[implementation] = layer.apply(params, x)
    np.testing.assert_allclose(outputs["xla"], outputs["einsum"], atol=1e-5)
    assert float(jnp.max(jnp.abs(outputs["einsum"]))) > 0.1  # Not trivially equal.


def test_drop_path_drops_whole_branches_per_image_and_only_in_training():
    from clmae_jax.models.vit import Block, ViTClassifier
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 5, 16))
    block = Block(num_heads=2, drop_path=0.5, deterministic=False)
    params = block.init(jax.random.PRNGKey(1), x)
    kept = Block(num_heads=2).apply(params, x)
    out = block.apply(params, x, rngs={"dropout": jax.random.PRNGKey(2)})
    # Both branches of an image are dropped with probability 1/4: that image passes through unchanged.
    dropped = np.all(np.asarray(out) == np.asarray(x), axis=(1, 2))
    assert 4 <= dropped.sum() <= 30
    assert not np.allclose(out, kept)
    images = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 1))
    model = ViTClassifier(10, patch_size=4, width=16, depth=2, num_heads=2, pool="gap_norm", drop_path=0.3)
    variables = model.init(jax.random.PRNGKey(4), images)
    plain = ViTClassifier(10, patch_size=4, width=16, depth=2, num_heads=2, pool="gap_norm")
    np.testing.assert_array_equal(model.apply(variables, images), plain.apply(variables, images))
    trained = [model.apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(s)}) for s in (0, 1)]
    assert not np.allclose(trained[0], trained[1])
