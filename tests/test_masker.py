"""Tests for the Curriculum Masking Module."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from clmae_jax.models.masker import CurriculumMasker


def _init(model, tokens):
    return model.init(jax.random.PRNGKey(0), tokens)


def _tokens(n=3, length=7, width=32, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, length, width))


def test_output_shape_range_and_length_from_input():
    model = CurriculumMasker(depth=2)
    for length in (7, 12):
        tokens = _tokens(length=length)
        m = model.apply(_init(model, tokens), tokens)
        chex.assert_shape(m, (3, length))
        chex.assert_type(m, jnp.float32)
        assert np.all((m > 0) & (m < 1))


def test_output_depends_on_inputs():
    model = CurriculumMasker(depth=2)
    tokens = _tokens()
    params = _init(model, tokens)
    # Random, not constant: LayerNorm would erase a constant shift of a token.
    perturbed = tokens.at[:, 3].add(jax.random.normal(jax.random.PRNGKey(2), tokens.shape[-1:]))
    assert np.max(np.abs(model.apply(params, tokens) - model.apply(params, perturbed))) > 1e-4
    # Each image is scored from its own tokens only.
    m = model.apply(params, tokens)
    np.testing.assert_allclose(model.apply(params, tokens[:1]), m[:1], atol=1e-6)


def test_head_reads_cls_token_only():
    # The module has no position embedding of its own, so the CLS output is invariant to the order of the patch
    # tokens; a head reading per-patch outputs would permute with them instead.
    model = CurriculumMasker(depth=2)
    tokens = _tokens(length=9)
    params = _init(model, tokens)
    permuted = tokens[:, np.random.default_rng(0).permutation(9)]
    m = model.apply(params, tokens)
    np.testing.assert_allclose(model.apply(params, permuted), m, atol=1e-5)
    assert np.max(np.abs(m - m[:, ::-1])) > 1e-4


def _block_params(width, mlp_ratio=4):
    hidden = mlp_ratio * width
    norms = 2 * 2 * width
    attention = (3 * width * width + 3 * width) + (width * width + width)
    mlp = (width * hidden + hidden) + (hidden * width + width)
    return norms + attention + mlp


def test_parameter_count_vit_base_width():
    width, length, depth = 768, 196, 5
    tokens = jax.ShapeDtypeStruct((1, length, width), jnp.float32)
    shapes = jax.eval_shape(lambda t: CurriculumMasker().init(jax.random.PRNGKey(0), t), tokens)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    cls, head = width, 2 * width + width * length + length
    assert count == depth * _block_params(width) + cls + head
    assert abs(count - 35.6e6) < 0.05e6, count


def test_head_init_xavier_zero_bias_and_norm_eps():
    model = CurriculumMasker(depth=1)
    params = _init(model, _tokens())["params"]
    np.testing.assert_array_equal(params["head"]["bias"], 0.0)
    limit = np.sqrt(6.0 / (32 + 7))
    assert np.all(np.abs(params["head"]["kernel"]) <= limit)
    assert np.max(np.abs(params["head"]["kernel"])) > 0.5 * limit
    assert CurriculumMasker().norm_eps == 1e-5


def test_bf16_compute_keeps_float32_params_and_output():
    model = CurriculumMasker(depth=2, dtype=jnp.bfloat16)
    tokens = _tokens()
    params = _init(model, tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    m = model.apply(params, tokens)
    chex.assert_type(m, jnp.float32)
    reference = CurriculumMasker(depth=2).apply(params, tokens)
    np.testing.assert_allclose(m, reference, atol=0.05)
