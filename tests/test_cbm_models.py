"""Tests for the CBM classifiers: CIFAR ResNet-18 and the official WRN-52-2."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbm_jax.models.resnet import BasicBlock, ResNet
from cbm_jax.models.wide_resnet import WideBasic, WideResNet

BATCH = 2


def key(seed):
    """An rbg key: its random ops compile several times faster on CPU than threefry, the test's bottleneck."""
    return jax.random.key(seed, impl="rbg")


def images(size, seed=0):
    """A batch of normalised-looking NHWC images."""
    return jax.random.normal(jax.random.key(seed), (BATCH, size, size, 3))


def param_count(tree):
    """Number of scalars in a pytree of arrays or shape structs."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_init(model, size=32):
    """Variable shapes and dtypes of `model` without computing anything."""
    return jax.eval_shape(lambda: model.init(key(0), jnp.zeros((BATCH, size, size, 3)), train=False))


def resnet_param_count(num_classes, stage_sizes):
    """ResNet parameters from the architecture: bias-free convs, BN (scale, bias), linear head."""
    total = 3 * 3 * 3 * 64 + 2 * 64
    in_channels = 64
    for stage, (num_blocks, width) in enumerate(zip(stage_sizes, (64, 128, 256, 512))):
        for block in range(num_blocks):
            total += 9 * in_channels * width + 2 * width + 9 * width * width + 2 * width
            if stage > 0 and block == 0:
                total += in_channels * width + 2 * width
            in_channels = width
    return total + 512 * num_classes + num_classes


def wrn_param_count(num_classes, depth, widen_factor):
    """WRN parameters from the architecture: biased convs, BN before each conv, bare 1x1 shortcuts."""
    total = 3 * 3 * 3 * 16 + 16
    in_channels = 16
    for stage, width in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
        for block in range((depth - 4) // 6):
            total += 2 * in_channels + 9 * in_channels * width + width + 2 * width + 9 * width * width + width
            if in_channels != width or (stage > 0 and block == 0):
                total += in_channels * width + width
            in_channels = width
    return total + 2 * in_channels + in_channels * num_classes + num_classes


def conv2d_reference(x, kernel, bias, stride, pad):
    """Naive NHWC cross-correlation with symmetric zero padding, as torch.nn.functional.conv2d."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for i in range(out_h):
        for j in range(out_w):
            window = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, i, j] = np.einsum("bhwc,hwcd->bd", window, kernel) + bias
    return out


def batch_norm_reference(x, params, stats):
    """Inference BatchNorm with eps 1e-5."""
    return (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"] + params["bias"]


def randomised(variables, seed):
    """The same variables with random values (positive variances) so every term of a block matters."""
    rng = np.random.default_rng(seed)
    return jax.tree.map_with_path(
        lambda path, v: rng.uniform(0.5, 1.5, v.shape) if path[-1].key == "var" else rng.normal(0, 0.5, v.shape),
        jax.tree.map(np.asarray, variables))


@pytest.fixture(scope="module")
def resnet():
    """ResNet-18 for 10 classes and its variables at 32x32."""
    model = ResNet(num_classes=10)
    return model, model.init(key(0), images(32), train=False)


@pytest.fixture(scope="module")
def wrn():
    """WRN-52-2 for 10 classes and its variables at 32x32."""
    model = WideResNet(num_classes=10)
    return model, model.init(key(0), images(32), train=False)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("model,last_block,channels", [
    (ResNet(num_classes=100), "stage4_block1", 512),
    (WideResNet(num_classes=100), "stage3_block7", 128),
])
def test_output_and_feature_map_shapes(model, last_block, channels, size):
    variables = abstract_init(model, size)
    logits, state = jax.eval_shape(
        lambda v: model.apply(v, images(size), train=True, rngs={"dropout": key(1)},
                              mutable=["batch_stats", "intermediates"], capture_intermediates=True), variables)
    chex.assert_shape(logits, (BATCH, 100))
    assert logits.dtype == jnp.float32
    # Three stride-2 stages for ResNet, two for WRN: the last feature map is size / 8 or size / 4.
    downsampling = 8 if isinstance(model, ResNet) else 4
    feature_map = state["intermediates"][last_block]["__call__"][0]
    chex.assert_shape(feature_map, (BATCH, size // downsampling, size // downsampling, channels))


@pytest.mark.parametrize("num_classes,stage_sizes", [(100, (2, 2, 2, 2)), (10, (3, 4, 6, 3))])
def test_resnet_param_count(num_classes, stage_sizes):
    variables = abstract_init(ResNet(num_classes=num_classes, stage_sizes=stage_sizes))
    assert param_count(variables["params"]) == resnet_param_count(num_classes, stage_sizes)
    # Running mean and variance for every BN channel: half the BN parameters (scale, bias).
    bn_params = sum(param_count(p) for path, p in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
                    if "bn" in jax.tree_util.keystr(path))
    assert param_count(variables["batch_stats"]) == bn_params


@pytest.mark.parametrize("num_classes,depth,widen_factor", [(100, 52, 2), (10, 52, 2), (10, 16, 4)])
def test_wrn_param_count(num_classes, depth, widen_factor):
    variables = abstract_init(WideResNet(num_classes=num_classes, depth=depth, widen_factor=widen_factor))
    assert param_count(variables["params"]) == wrn_param_count(num_classes, depth, widen_factor)


def test_resnet_init_matches_official(resnet):
    _, variables = resnet
    params = variables["params"]
    kernel = np.asarray(params["stage4_block1"]["conv2"]["kernel"])
    std = np.sqrt(2.0 / (3 * 3 * 512))
    np.testing.assert_allclose(kernel.std(), std, rtol=0.01)
    assert abs(kernel.mean()) < 0.01 * std
    assert np.abs(kernel).max() > 4 * std  # Untruncated normal, as torch's kaiming_normal_.
    assert "bias" not in params["stage4_block1"]["conv2"]
    np.testing.assert_allclose(np.asarray(params["head"]["kernel"]).std(), 0.01, rtol=0.05)
    np.testing.assert_array_equal(params["head"]["bias"], 0.0)
    np.testing.assert_array_equal(params["bn_stem"]["scale"], 1.0)
    np.testing.assert_array_equal(params["bn_stem"]["bias"], 0.0)


def test_wrn_init_is_torch_default(wrn):
    _, variables = wrn
    params = variables["params"]
    for layer, fan_in in [(params["stage3_block7"]["conv2"], 9 * 128), (params["head"], 128)]:
        bound = 1.0 / np.sqrt(fan_in)
        kernel = np.asarray(layer["kernel"])
        assert bound * 0.99 < np.abs(kernel).max() <= bound
        np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.05)
        bias = np.asarray(layer["bias"])
        assert bound * 0.8 < np.abs(bias).max() <= bound


@pytest.mark.parametrize("stride,in_features", [(2, 2), (1, 3)])
def test_basic_block_matches_reference(stride, in_features):
    block = BasicBlock(features=3, stride=stride)
    x = np.random.default_rng(0).normal(size=(BATCH, 6, 6, in_features))
    variables = randomised(block.init(key(0), x, train=False), seed=1)
    p, s = variables["params"], variables["batch_stats"]
    y = conv2d_reference(x, p["conv1"]["kernel"], 0.0, stride, 1)
    y = np.maximum(batch_norm_reference(y, p["bn1"], s["bn1"]), 0)
    y = batch_norm_reference(conv2d_reference(y, p["conv2"]["kernel"], 0.0, 1, 1), p["bn2"], s["bn2"])
    shortcut = x
    if "shortcut_conv" in p:
        shortcut = conv2d_reference(x, p["shortcut_conv"]["kernel"], 0.0, stride, 0)
        shortcut = batch_norm_reference(shortcut, p["shortcut_bn"], s["shortcut_bn"])
    assert ("shortcut_conv" in p) == (stride != 1 or in_features != 3)
    expected = np.maximum(y + shortcut, 0)
    np.testing.assert_allclose(block.apply(variables, x, train=False), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,in_features", [(2, 2), (1, 3)])
def test_wide_basic_matches_reference(stride, in_features):
    block = WideBasic(features=3, dropout_rate=0.3, stride=stride)
    x = np.random.default_rng(0).normal(size=(BATCH, 6, 6, in_features))
    variables = randomised(block.init(key(0), x, train=False), seed=1)
    p, s = variables["params"], variables["batch_stats"]
    y = np.maximum(batch_norm_reference(x, p["bn1"], s["bn1"]), 0)
    y = conv2d_reference(y, p["conv1"]["kernel"], p["conv1"]["bias"], 1, 1)
    y = np.maximum(batch_norm_reference(y, p["bn2"], s["bn2"]), 0)
    y = conv2d_reference(y, p["conv2"]["kernel"], p["conv2"]["bias"], stride, 1)
    shortcut = x
    if "shortcut_conv" in p:
        shortcut = conv2d_reference(x, p["shortcut_conv"]["kernel"], p["shortcut_conv"]["bias"], stride, 0)
    assert ("shortcut_conv" in p) == (stride != 1 or in_features != 3)
    np.testing.assert_allclose(block.apply(variables, x, train=False), y + shortcut, rtol=1e-4, atol=1e-4)


def test_resnet_train_updates_batch_stats_and_eval_does_not(resnet):
    model, variables = resnet
    x = images(32, seed=1)
    logits, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                                capture_intermediates=True)
    chex.assert_shape(logits, (BATCH, 10))
    stem = np.asarray(state["intermediates"]["conv_stem"]["__call__"][0], np.float64)
    new_stats = state["batch_stats"]
    # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch (flax stores the biased variance).
    np.testing.assert_allclose(new_stats["bn_stem"]["mean"], 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_stats["bn_stem"]["var"], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-4)
    for old, new in zip(jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(new_stats)):
        assert not np.allclose(old, new)

    eval_logits, eval_state = model.apply(variables, x, train=False, mutable=["batch_stats"])
    chex.assert_trees_all_equal(eval_state["batch_stats"], variables["batch_stats"])
    chex.assert_trees_all_equal(eval_logits, model.apply(variables, x, train=False))


def test_wrn_dropout_and_final_batch_norm_momentum(wrn):
    model, variables = wrn
    x = images(32, seed=1)

    def train_pass(seed):
        return model.apply(variables, x, train=True, rngs={"dropout": key(seed)},
                           mutable=["batch_stats", "intermediates"], capture_intermediates=True)

    logits_a, state = train_pass(1)
    logits_b, _ = train_pass(2)
    assert not np.allclose(logits_a, logits_b)
    dropped = np.asarray(state["intermediates"]["stage1_block0"]["dropout"]["__call__"][0])
    np.testing.assert_allclose((dropped == 0).mean(), 0.3, atol=0.01)

    # The official final BN has PyTorch momentum 0.9: running = 0.1 * running + 0.9 * batch.
    features = np.asarray(state["intermediates"]["stage3_block7"]["__call__"][0], np.float64)
    final = state["batch_stats"]["bn_final"]
    np.testing.assert_allclose(final["mean"], 0.9 * features.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(final["var"], 0.1 + 0.9 * features.var(axis=(0, 1, 2)), rtol=1e-4)
    block_bn = state["batch_stats"]["stage1_block0"]["bn1"]["mean"]
    stem = np.asarray(state["intermediates"]["conv_stem"]["__call__"][0], np.float64)
    np.testing.assert_allclose(block_bn, 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)

    eval_logits = model.apply(variables, x, train=False)
    chex.assert_shape(eval_logits, (BATCH, 10))
    chex.assert_trees_all_equal(eval_logits, model.apply(variables, x, train=False))


def test_bfloat16_compute_keeps_float32_params_stats_and_logits(resnet):
    model, variables = resnet
    bf16_model = ResNet(num_classes=10, dtype=jnp.bfloat16)
    for abstract in (abstract_init(bf16_model), abstract_init(WideResNet(num_classes=10, dtype=jnp.bfloat16))):
        assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    wrn_logits = jax.eval_shape(lambda v: WideResNet(num_classes=10, dtype=jnp.bfloat16).apply(
        v, images(32), train=False), abstract_init(WideResNet(num_classes=10)))
    assert wrn_logits.dtype == jnp.float32

    x = images(32, seed=1)
    logits, state = bf16_model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                                     capture_intermediates=True)
    assert state["intermediates"]["conv_stem"]["__call__"][0].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(state["batch_stats"])} == {jnp.dtype(jnp.float32)}
    reference, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(logits, reference, atol=0.05 * np.abs(reference).max())


def test_invalid_configurations_raise():
    with pytest.raises(ValueError, match="6n\\+4"):
        abstract_init(WideResNet(num_classes=10, depth=50))
    with pytest.raises(ValueError, match="4 positive stage sizes"):
        abstract_init(ResNet(num_classes=10, stage_sizes=(2, 2, 2)))
