"""Tests for the Flax CvT and the PyTorch CvT importer (parity tests need requirements-interop.txt)."""
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors, traverse_util

from cbm_jax.interop.cvt_torch import load_cvt_torch_checkpoint
from cbm_jax.models.cvt import CVT_13, Block, ConvAttention, CvT, quick_gelu
from clmae_jax.models.vit import Mlp, exact_gelu

# A small layout for fast tests; Hugging Face indexes drop-path rates by stage, so depth[i] must exceed i.
TINY = dict(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 3), drop_path_rate=(0.0, 0.0, 0.1))


def key(seed):
    """An rbg key: its random ops compile faster on CPU than threefry."""
    return jax.random.key(seed, impl="rbg")


def images(batch, height, width=None, seed=0):
    """A batch of normalised-looking NHWC images."""
    return np.random.default_rng(seed).normal(size=(batch, height, width or height, 3)).astype(np.float32)


# Compiling dominates these tests on CPU: skip XLA's slow backend optimisations, which do not change the math.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def jitted_forward(model, variables, x):
    """Eval-mode logits, jitted once per model and shape across tests (the compile dominates their time)."""
    return model.apply(variables, x, train=False)


def forward(model, variables, x):
    """Eval-mode logits in full float32 precision (no TF32 on GPUs), for comparisons with PyTorch."""
    with jax.default_matmul_precision("highest"):
        return jitted_forward(model, variables, x)


def param_count(tree):
    """Number of scalars in a pytree of arrays or shape structs."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def cvt_param_count(num_classes, embed_dim, depth, patch_size=(7, 3, 3), mlp_ratio=4):
    """CvT parameters from the architecture: conv embeddings, blocks with three dw_bn projections, head."""
    total, in_channels = 0, 3
    for stage, (width, blocks, patch) in enumerate(zip(embed_dim, depth, patch_size)):
        total += patch * patch * in_channels * width + width + 2 * width  # Conv embedding + LayerNorm.
        total += width if stage == len(depth) - 1 else 0  # Class token.
        hidden = mlp_ratio * width
        block = 2 * 2 * width + 3 * (9 * width + 2 * width) + 4 * (width * width + width)
        block += width * hidden + hidden + hidden * width + width
        total += blocks * block
        in_channels = width
    return total + 2 * in_channels + in_channels * num_classes + num_classes


def flax_to_official(variables):
    """Flax CvT variables -> a numpy state dict in the official microsoft/CvT layout (the importer's inverse)."""
    state_dict = {}
    for path, value in traverse_util.flatten_dict(variables["params"]).items():
        *modules, leaf = path
        name = "norm" if modules == ["norm_final"] else ".".join(modules).replace("blocks_", "blocks.")
        if leaf == "kernel":
            value = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else np.transpose(value)
        state_dict[name + "." + {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)] = np.asarray(value)
    for path, value in traverse_util.flatten_dict(variables["batch_stats"]).items():
        *modules, leaf = path
        name = ".".join(modules).replace("blocks_", "blocks.")
        state_dict[f"{name}.running_{leaf}"] = np.asarray(value)
        state_dict[f"{name}.num_batches_tracked"] = np.array(100)
    return state_dict


def randomised(variables, seed):
    """Random float32 values (positive variances) in the shapes of `variables`, so every term matters."""
    rng = np.random.default_rng(seed)
    return jax.tree.map_with_path(
        lambda path, v: np.float32(rng.uniform(0.5, 1.5, v.shape) if path[-1].key == "var"
                                   else rng.normal(0, 0.5, v.shape)), variables)


def random_variables(model, height, seed=0):
    """Random variables of `model` without running its (slow to compile) initialisers."""
    shapes = jax.eval_shape(lambda: model.init(key(0), images(1, height), train=False))
    return randomised(shapes, seed)


def assert_trees_equal(a, b):
    """Same structure, shapes and values."""
    chex.assert_trees_all_equal_structs(a, b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def tiny():
    """A tiny CvT for 5 classes and random variables."""
    model = CvT(num_classes=5, **TINY)
    return model, random_variables(model, 32)


@pytest.fixture(scope="module")
def tiny_train_step(tiny):
    """(logits, new batch_stats) of the tiny CvT in training mode, jitted: fn(x, dropout_seed)."""
    model, variables = tiny
    apply = jax.jit(lambda x, rng: model.apply(variables, x, train=True, rngs={"dropout": rng},
                                               mutable=["batch_stats"]), compiler_options=FAST_COMPILE)
    return lambda x, seed: apply(x, key(seed))


# ---------------------------------------------------------------- model, without torch


@pytest.mark.parametrize("size,batch", [(64, 2), (224, 1)])
def test_cvt13_logits_shape(size, batch):
    model = CvT(num_classes=10)
    x = images(batch, size)
    variables = jax.tree.map(lambda v: 0.1 * v, random_variables(model, size))
    logits = forward(model, variables, x)
    chex.assert_shape(logits, (batch, 10))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("num_classes", [1000, 10])
def test_cvt13_param_count(num_classes):
    variables = jax.eval_shape(lambda: CvT(num_classes).init(key(0), images(1, 32), train=False))
    expected = cvt_param_count(num_classes, CVT_13["embed_dim"], CVT_13["depth"])
    assert param_count(variables["params"]) == expected
    if num_classes == 1000:
        assert 19.9e6 < expected < 20.1e6  # "CvT-13: 20M parameters" (Wu et al. 2021, Table 2).
    # Running mean and variance for the 3 dw_bn projections of every block.
    assert param_count(variables["batch_stats"]) == sum(2 * 3 * w * d for w, d in zip(CVT_13["embed_dim"],
                                                                                     CVT_13["depth"]))


def test_bf16_compute_keeps_f32_params_and_logits():
    model = CvT(num_classes=7, dtype=jnp.bfloat16, **TINY)
    shapes = jax.eval_shape(lambda: model.init(key(0), images(1, 32), train=False))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    variables = jax.tree.map(lambda v: 0.3 * v, randomised(shapes, seed=0))
    x = images(2, 64, 48)  # The shapes of test_hf_parity_tiny_non_square, which reuses the f32 compile.
    logits = forward(model, variables, x)
    assert logits.dtype == jnp.float32
    f32 = forward(CvT(num_classes=7, **TINY), variables, x)
    np.testing.assert_allclose(logits, f32, atol=0.05 * np.abs(f32).max())
    assert not np.array_equal(logits, f32)  # The blocks did run in bfloat16.


def test_attention_matches_naive_reference():
    """Conv projections with BN, the class token skipping them, and the width**-0.5 scale, in numpy."""
    batch, height, width, channels, heads = 2, 4, 3, 6, 2
    x = np.random.default_rng(0).normal(size=(batch, 1 + height * width, channels)).astype(np.float32)
    attn = ConvAttention(num_heads=heads, with_cls_token=True)
    variables = randomised(jax.eval_shape(lambda: attn.init(key(0), x, (height, width), train=False)), seed=1)
    p, s = variables["params"], variables["batch_stats"]
    cls_token, grid = x[:, :1], x[:, 1:].reshape(batch, height, width, channels)

    def dw_bn(name, stride):
        kernel = p[f"conv_proj_{name}"]["conv"]["kernel"][:, :, 0]  # [3, 3, C]
        padded = np.pad(grid, ((0, 0), (1, 1), (1, 1), (0, 0)))
        rows, cols = range(0, height, stride), range(0, width, stride)
        out = np.array([[np.einsum("bhwc,hwc->bc", padded[:, i:i + 3, j:j + 3], kernel) for j in cols]
                        for i in rows]).transpose(2, 0, 1, 3).reshape(batch, -1, channels)
        bn, stats = p[f"conv_proj_{name}"]["bn"], s[f"conv_proj_{name}"]["bn"]
        out = (out - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * bn["scale"] + bn["bias"]
        tokens = np.concatenate([cls_token, out], axis=1) @ p[f"proj_{name}"]["kernel"] + p[f"proj_{name}"]["bias"]
        return tokens.reshape(batch, tokens.shape[1], heads, -1)

    q, k, v = dw_bn("q", 1), dw_bn("k", 2), dw_bn("v", 2)
    assert k.shape[1] == 1 + 2 * 2  # A 4x3 grid strided by 2 with padding 1 is 2x2.
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * channels ** -0.5
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, -1, channels)
    expected = out @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(attn.apply(variables, x, (height, width), train=False), expected,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quick", [False, True])
def test_mlp_activation_is_exact_gelu_or_quick_gelu(quick):
    x = images(2, 3, seed=4).reshape(2, 27, 1) * 3.0
    mlp = Mlp(hidden=1, activation=quick_gelu if quick else exact_gelu)
    identity = {"fc1": {"kernel": np.ones((1, 1)), "bias": np.zeros(1)},
                "fc2": {"kernel": np.ones((1, 1)), "bias": np.zeros(1)}}
    erf = np.vectorize(math.erf)
    expected = x / (1.0 + np.exp(-1.702 * x)) if quick else 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    np.testing.assert_allclose(mlp.apply({"params": identity}, x), expected, rtol=1e-5, atol=1e-6)


def test_drop_path_draws_from_the_dropout_rng_in_training(tiny, tiny_train_step):
    model, variables = tiny
    x = images(4, 32, seed=1)
    assert not np.allclose(tiny_train_step(x, 1)[0], tiny_train_step(x, 2)[0])
    with pytest.raises(errors.InvalidRngError, match="dropout"):
        jax.eval_shape(lambda: model.apply(variables, x, train=True, mutable=["batch_stats"]))


def test_drop_path_rises_linearly_in_the_last_stage_only(tiny):
    model, variables = tiny
    rates = {}

    def record(call, args, kwargs, context):
        if isinstance(context.module, Block):
            rates.setdefault(context.module.parent.name, []).append(context.module.drop_path)
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.apply(variables, images(2, 32), train=True, rngs={"dropout": key(0)},
                                           mutable=["batch_stats"]))
    # torch.linspace(0, DROP_PATH_RATE[i], DEPTH[i]) per stage, as the official VisionTransformer.
    assert rates == {"stage0": [0.0], "stage1": [0.0, 0.0], "stage2": [0.0, 0.05, 0.1]}


def test_train_updates_batch_stats_with_torch_momentum(tiny, tiny_train_step):
    _, variables = tiny
    x = images(4, 32, seed=1)
    _, state = tiny_train_step(x, 1)
    old = variables["batch_stats"]["stage0"]["blocks_0"]["attn"]["conv_proj_q"]["bn"]["mean"]
    new = state["batch_stats"]["stage0"]["blocks_0"]["attn"]["conv_proj_q"]["bn"]["mean"]
    # The batch mean of the depthwise conv output, recomputed from the layers before it.
    embed = variables["params"]["stage0"]["patch_embed"]
    conv = jax.lax.conv_general_dilated(x, embed["proj"]["kernel"], (4, 4), ((2, 2), (2, 2)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + embed["proj"]["bias"]
    mu, var = conv.mean(-1, keepdims=True), conv.var(-1, keepdims=True)
    tokens = (conv - mu) / jnp.sqrt(var + 1e-5) * embed["norm"]["scale"] + embed["norm"]["bias"]
    norm1 = variables["params"]["stage0"]["blocks_0"]["norm1"]
    mu, var = tokens.mean(-1, keepdims=True), tokens.var(-1, keepdims=True)
    tokens = (tokens - mu) / jnp.sqrt(var + 1e-5) * norm1["scale"] + norm1["bias"]
    kernel = variables["params"]["stage0"]["blocks_0"]["attn"]["conv_proj_q"]["conv"]["kernel"]
    dw = jax.lax.conv_general_dilated(tokens, kernel, (1, 1), ((1, 1), (1, 1)), feature_group_count=16,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(new, 0.9 * old + 0.1 * dw.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change,message", [(dict(depth=(1, 2)), "differ in length"),
                                            (dict(num_heads=(1, 3, 3)), "divisible by num_heads")])
def test_bad_stage_settings_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: CvT(num_classes=5, **dict(TINY, **change)).init(key(0), images(1, 32), train=False))


# ---------------------------------------------------------------- importer, numpy only


@pytest.mark.parametrize("final_norm", ["norm", "norm_final"])
def test_official_state_dict_round_trips(tiny, final_norm):
    _, variables = tiny
    state_dict = flax_to_official(variables)
    if final_norm == "norm_final":  # As CBM saves its fine-tuned models.
        state_dict = {k.replace("norm.", "norm_final.") if k.startswith("norm.") else k: v
                      for k, v in state_dict.items()}
    assert "stage2.blocks.2.attn.conv_proj_v.bn.running_var" in state_dict
    assert state_dict["stage0.patch_embed.proj.weight"].shape == (16, 3, 7, 7)
    assert state_dict["stage1.blocks.0.attn.conv_proj_k.conv.weight"].shape == (32, 1, 3, 3)
    imported = load_cvt_torch_checkpoint(state_dict, config=TINY)
    assert_trees_equal(imported, variables)


def test_new_num_classes_reinitialises_only_the_head(tiny):
    _, variables = tiny
    state_dict = flax_to_official(variables)
    imported = load_cvt_torch_checkpoint(state_dict, num_classes=700, config=TINY, seed=1)
    head = imported["params"].pop("head")
    expected = dict(variables, params={k: v for k, v in variables["params"].items() if k != "head"})
    assert_trees_equal(imported, expected)
    chex.assert_shape([head["kernel"], head["bias"]], [(48, 700), (700,)])
    np.testing.assert_allclose(head["kernel"].std(), 0.02 * 0.88, rtol=0.05)  # Truncated at 2 sigma.
    assert np.abs(head["kernel"]).max() <= 0.04
    bound = 48 ** -0.5  # nn.Linear's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert 0.9 * bound < np.abs(head["bias"]).max() <= bound
    same = load_cvt_torch_checkpoint(state_dict, num_classes=700, config=TINY, seed=1)["params"]["head"]
    np.testing.assert_array_equal(same["kernel"], head["kernel"])


def test_importer_errors_name_the_problem(tiny):
    _, variables = tiny
    state_dict = flax_to_official(variables)
    with pytest.raises(ValueError, match="Not a CvT checkpoint.*'encoder.weight'"):
        load_cvt_torch_checkpoint({"encoder.weight": np.zeros(3)})
    without_q = {k: v for k, v in state_dict.items() if k != "stage1.blocks.1.attn.proj_q.weight"}
    with pytest.raises(ValueError, match="missing.*stage1/blocks_1/attn/proj_q/kernel"):
        load_cvt_torch_checkpoint(without_q, config=TINY)
    with pytest.raises(ValueError, match="unexpected.*stage2/pos_embed"):
        load_cvt_torch_checkpoint(dict(state_dict, **{"stage2.pos_embed": np.zeros((1, 4, 48))}), config=TINY)
    with pytest.raises(ValueError, match=r"missing.*stage2/blocks_3/.*\(217 in all\)"):
        load_cvt_torch_checkpoint(state_dict)  # A tiny checkpoint read as CvT-13.
    with pytest.raises(ValueError, match="shapes differ"):
        load_cvt_torch_checkpoint(state_dict, config=dict(TINY, embed_dim=(16, 32, 60)))


# ---------------------------------------------------------------- parity with PyTorch (requirements-interop.txt)


@pytest.fixture(scope="module")
def transformers():
    """The transformers package, or a skip when the interop requirements are not installed."""
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def hf_cvt(transformers, layout, num_labels, seed=0):
    """A random Hugging Face CvtForImageClassification in eval mode, every weight and BN statistic randomised."""
    import torch  # pylint: disable=g-import-not-at-top
    from transformers.initialization import no_init_weights  # pylint: disable=g-import-not-at-top
    config = transformers.CvtConfig(num_labels=num_labels, embed_dim=list(layout["embed_dim"]),
                                    num_heads=list(layout["num_heads"]), depth=list(layout["depth"]))
    with no_init_weights():  # Every tensor is overwritten below; HF's own initialisation takes seconds.
        model = transformers.CvtForImageClassification(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif tensor.ndim >= 2 and "cls_token" not in name:  # Linear and conv weights, O(1) activations.
                tensor.copy_(noise / np.sqrt(tensor[0].numel()))
            elif name.endswith("weight"):  # LayerNorm and BatchNorm scales.
                tensor.copy_(1.0 + 0.2 * noise)
            else:
                tensor.copy_(0.2 * noise)
    return model


def numpy_state_dict(model):
    """A torch module's state dict as numpy arrays."""
    return {k: v.numpy() for k, v in model.state_dict().items()}


def assert_same_logits(transformers, layout, num_labels, batch, height, width):
    """HF logits on NCHW input == Flax logits on the same images in NHWC, within 1e-4; returns the error."""
    import torch  # pylint: disable=g-import-not-at-top
    hf = hf_cvt(transformers, layout, num_labels)
    x = np.random.default_rng(0).normal(size=(batch, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        expected = hf(torch.from_numpy(x)).logits.numpy()
    variables = load_cvt_torch_checkpoint(numpy_state_dict(hf), config=layout)
    logits = forward(CvT(num_classes=num_labels, **layout), variables, x.transpose(0, 2, 3, 1))
    assert expected.std() > 0.3  # Randomised weights give O(1) logits, so 1e-4 is a tight bound.
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    return np.abs(np.asarray(logits) - expected).max()


def test_hf_parity_tiny_non_square(transformers):
    assert_same_logits(transformers, TINY, num_labels=7, batch=2, height=64, width=48)


def test_hf_parity_cvt13(transformers):
    assert_same_logits(transformers, CVT_13, num_labels=10, batch=2, height=64, width=64)


def test_cvt13_param_count_matches_hf(transformers):
    from transformers.initialization import no_init_weights  # pylint: disable=g-import-not-at-top
    with no_init_weights():
        hf = transformers.CvtForImageClassification(transformers.CvtConfig(num_labels=1000))
    variables = jax.eval_shape(lambda: CvT(num_classes=1000).init(key(0), images(1, 32), train=False))
    assert param_count(variables["params"]) == sum(p.numel() for p in hf.parameters())


# HF module names inside a block -> official ones, read from microsoft/CvT lib/models/cls_cvt.py.
HF_BLOCK_TO_OFFICIAL = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
for _short, _long in [("q", "query"), ("k", "key"), ("v", "value")]:
    HF_BLOCK_TO_OFFICIAL[f"attention.attention.projection_{_long}"] = f"attn.proj_{_short}"
    _prefix = f"attention.attention.convolution_projection_{_long}.convolution_projection"
    HF_BLOCK_TO_OFFICIAL[f"{_prefix}.convolution"] = f"attn.conv_proj_{_short}.conv"
    HF_BLOCK_TO_OFFICIAL[f"{_prefix}.normalization"] = f"attn.conv_proj_{_short}.bn"


def official_key(hf_key):
    """The official microsoft/CvT name of a Hugging Face CvtForImageClassification key."""
    top = {"layernorm": "norm", "classifier": "head"}
    parts = hf_key.split(".")
    if parts[0] in top:
        return f"{top[parts[0]]}.{parts[1]}"
    stage, rest = parts[3], parts[4:]
    if rest[0] == "cls_token":
        return f"stage{stage}.cls_token"
    if rest[0] == "embedding":
        return f"stage{stage}.patch_embed.{dict(projection='proj', normalization='norm')[rest[2]]}.{rest[3]}"
    return f"stage{stage}.blocks.{rest[1]}.{HF_BLOCK_TO_OFFICIAL['.'.join(rest[2:-1])]}.{rest[-1]}"


def test_official_and_hf_formats_give_the_same_variables(transformers, tmp_path):
    import torch  # pylint: disable=g-import-not-at-top
    hf = hf_cvt(transformers, TINY, num_labels=7)
    official = {official_key(k): v for k, v in hf.state_dict().items()}
    assert len(official) == len(hf.state_dict())
    path = tmp_path / "CvT-tiny.pth"
    torch.save(official, path)
    from_hf = load_cvt_torch_checkpoint(numpy_state_dict(hf), config=TINY)
    from_pth = load_cvt_torch_checkpoint(path, config=TINY)
    assert_trees_equal(from_pth, from_hf)
