"""The TPU form of the einsum attention (`vit.heads_in_matmuls`): the same numbers as the portable form, and on a
TPU compile no float32 [L, L] tensor and no transpose of the activations between fusions."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmae_jax.models import vit
from conftest import assert_trees_close


def qkv(dtype, length: int = 197, heads: int = 4, dim: int = 16):
    """Random [2, length, heads, dim] queries (logits beyond 100), keys and values."""
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, length, heads, dim))
    return [x.astype(dtype) for x in (7 * q, 7 * k, v)]


def heads_first(attention):
    """`attention` over [B, H, L, D] as a function of [B, L, H, D] inputs, q scaled as `einsum_attention` does."""
    def over_tokens(q, k, v):
        q = q * np.float32(q.shape[-1] ** -0.5).astype(q.dtype)
        return attention(*(x.swapaxes(1, 2) for x in (q, k, v))).swapaxes(1, 2)
    return over_tokens


@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_softmax_attention_and_its_backward_pass_give_the_einsum_attention(dtype, tolerance):
    inputs = qkv(dtype)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), inputs[0].shape, dtype)
    run = lambda f: jax.value_and_grad(lambda *x: jnp.sum((f(*x) * cotangent).astype(jnp.float32)),
                                       argnums=(0, 1, 2))(*inputs)
    (value, grads), (expected, expected_grads) = run(heads_first(vit.softmax_attention)), run(vit.einsum_attention)
    np.testing.assert_allclose(value, expected, rtol=tolerance)
    scale = max(float(jnp.abs(g.astype(jnp.float32)).max()) for g in expected_grads)
    assert_trees_close(jax.tree.map(lambda g: g.astype(jnp.float32), grads),
                       jax.tree.map(lambda g: g.astype(jnp.float32), expected_grads), atol=tolerance * scale)


@pytest.mark.parametrize("implementation", ["einsum", "xla"])
def test_the_tpu_form_of_the_attention_layer_gives_the_portable_numbers(monkeypatch, implementation):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 50, 64))
    layer = vit.Attention(num_heads=4, implementation=implementation)
    params = layer.init(jax.random.PRNGKey(1), x)
    run = lambda: jax.value_and_grad(lambda p: jnp.sum(jnp.sin(layer.apply(p, x))))(params)
    portable = run()
    monkeypatch.setattr(vit, "heads_in_matmuls", lambda: True)
    assert jax.tree.map(jnp.shape, layer.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, params)
    tpu_form = run()
    np.testing.assert_allclose(tpu_form[0], portable[0], rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(portable[1]))
    assert_trees_close(tpu_form[1], portable[1], atol=1e-6 * scale)


def test_on_a_tpu_attention_keeps_its_scores_in_bfloat16_and_transposes_no_activations():
    pytest.importorskip("libtpu", reason="TPU compiles need libtpu: pip install -r requirements-tpu.txt")
    from bench import hlo, tpu
    devices = tpu.topology_devices("v5e:2x2")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    x = jax.ShapeDtypeStruct((8, 197, 512), jnp.bfloat16,  # The MAE decoder's block at 2 images per chip.
                             sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    layer = vit.Attention(num_heads=16, dtype=jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
        step = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32)), argnums=(0, 1)))
        text = step.lower(params, x).compile().as_text()
    blocks, tables, top = tpu.program(text)
    scores = [hlo.result_and_opcode(line)[0] for line, _, _ in top if re.search(r"\[2,16,197,197\]", line)]
    assert scores and not any(re.search(r"f32\[2,16,197,197\]", s) for s in scores), scores
    copies = [hlo.name(line) for line, _, _ in top if hlo.opcode(line) in ("copy", "transpose")
              and re.search(r"\[2,197,(3,)?16,32\]|\[2,16,197,32\]", hlo.result_and_opcode(line)[0])]
    assert not copies, copies
