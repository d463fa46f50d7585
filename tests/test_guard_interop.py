"""The orientation of every imported PyTorch layer, checked by hand-made inputs and without torch: a state dict
written here in PyTorch's layouts (fb/mae and CL-MAE, Hugging Face ViTMAE, timm classifiers, CvT) is imported,
and each imported linear layer (and patch projection) must compute what PyTorch computes with the same tensors.

A round trip (ours -> PyTorch -> ours) cannot see a transpose missing on both ways, and a square layer (attn.proj,
CvT's q/k/v projections) fits its shape either way round: only a comparison with PyTorch's own arithmetic
(y = x W^T + b) tells. The Hugging Face / timm comparisons make it too, but skip where torch is not installed.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cbm_jax.interop.cvt_torch import load_cvt_torch_checkpoint
from cbm_jax.models.cvt import CvT
from clmae_jax.interop import classifier_torch, hf, layout, mae_torch
from clmae_jax.models.vit import PatchEmbed

WIDTH, DEPTH, HEADS, PATCH, IMAGE, CHANNELS = 16, 1, 2, 4, 8, 3
DECODER_WIDTH, CLASSES = 8, 5
PATCHES = (IMAGE // PATCH) ** 2
CVT_TINY = dict(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 1, 1), drop_path_rate=(0.0, 0.0, 0.0))


def timm_block(prefix: str, width: int) -> dict:
    """{name: shape} of one timm 0.3.2 pre-norm block, as PyTorch stores it (nn.Linear weight [out, in])."""
    hidden = 4 * width
    return {f"{prefix}.norm1.weight": (width,), f"{prefix}.norm1.bias": (width,),
            f"{prefix}.attn.qkv.weight": (3 * width, width), f"{prefix}.attn.qkv.bias": (3 * width,),
            f"{prefix}.attn.proj.weight": (width, width), f"{prefix}.attn.proj.bias": (width,),
            f"{prefix}.norm2.weight": (width,), f"{prefix}.norm2.bias": (width,),
            f"{prefix}.mlp.fc1.weight": (hidden, width), f"{prefix}.mlp.fc1.bias": (hidden,),
            f"{prefix}.mlp.fc2.weight": (width, hidden), f"{prefix}.mlp.fc2.bias": (width,)}


def encoder_shapes() -> dict:
    """{name: shape} of a ViT encoder in fb/mae / timm names (patch projection [D, C, p, p])."""
    return {"patch_embed.proj.weight": (WIDTH, CHANNELS, PATCH, PATCH), "patch_embed.proj.bias": (WIDTH,),
            "cls_token": (1, 1, WIDTH), **timm_block("blocks.0", WIDTH), "norm.weight": (WIDTH,),
            "norm.bias": (WIDTH,)}


def clmae_shapes() -> dict:
    """{name: shape} of an official CL-MAE file: the fb/mae MAE plus the masking module (masking_net.*)."""
    return {**encoder_shapes(),
            "decoder_embed.weight": (DECODER_WIDTH, WIDTH), "decoder_embed.bias": (DECODER_WIDTH,),
            "mask_token": (1, 1, DECODER_WIDTH), **timm_block("decoder_blocks.0", DECODER_WIDTH),
            "decoder_norm.weight": (DECODER_WIDTH,), "decoder_norm.bias": (DECODER_WIDTH,),
            "decoder_pred.weight": (PATCH * PATCH * CHANNELS, DECODER_WIDTH),
            "decoder_pred.bias": (PATCH * PATCH * CHANNELS,),
            "masking_net.cls_token": (1, 1, WIDTH), **timm_block("masking_net.blocks.0", WIDTH),
            "masking_net.mlp_head.0.weight": (WIDTH,), "masking_net.mlp_head.0.bias": (WIDTH,),
            "masking_net.mlp_head.1.weight": (PATCHES, WIDTH), "masking_net.mlp_head.1.bias": (PATCHES,)}


def random_state_dict(shapes: dict, seed: int = 0) -> dict:
    """A PyTorch-layout state dict with every tensor random (no zero bias or unit scale to hide a slip)."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def hand_made_input(features: int) -> np.ndarray:
    """Rows that read a layer one input at a time (the identity), then all at once with distinct weights."""
    return np.concatenate([np.eye(features), np.linspace(-1, 1, features)[None]]).astype(np.float32)


def torch_linear(x, weight, bias):
    """What torch.nn.Linear computes: x W^T + b, W stored [out, in]."""
    return x @ weight.T + bias


def assert_linear_imported_upright(kernel, bias, weight, torch_bias, name):
    """Our nn.Dense with the imported leaves computes PyTorch's nn.Linear with the file's tensors."""
    x = hand_made_input(weight.shape[1])
    ours = nn.Dense(weight.shape[0]).apply({"params": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}, x)
    np.testing.assert_allclose(ours, torch_linear(x, weight, torch_bias), rtol=1e-4, atol=1e-4, err_msg=name)


def assert_every_linear_upright(state_dict: dict, params: dict, paths: dict):
    """Every nn.Linear of `state_dict` (its 2-D weights) against our leaf at `paths[name]` (the importer's map,
    consulted for where a tensor goes, never for how it is laid out)."""
    linears = [name for name, value in state_dict.items() if name.endswith(".weight") and value.ndim == 2]
    assert linears
    for name in linears:
        bias = name.removesuffix(".weight") + ".bias"
        assert_linear_imported_upright(layout.get_leaf(params, paths[name][0]),
                                       layout.get_leaf(params, paths[bias][0]), state_dict[name],
                                       state_dict[bias], name)


def assert_patch_projection_upright(state_dict: dict, proj: dict):
    """Our PatchEmbed with the imported conv computes PyTorch's Conv2d(kernel = stride = p) on one p x p patch."""
    weight, bias = state_dict["patch_embed.proj.weight"], state_dict["patch_embed.proj.bias"]
    patch = np.arange(PATCH * PATCH * CHANNELS, dtype=np.float32).reshape(PATCH, PATCH, CHANNELS) / 10 - 2
    ours = PatchEmbed(PATCH, WIDTH).apply({"params": {"proj": proj}}, patch[None])
    # Conv2d on [C, H, W]: out[d] = sum over c, i, j of W[d, c, i, j] x[c, i, j] + b[d].
    expected = np.einsum("dcij,cij->d", weight, patch.transpose(2, 0, 1)) + bias
    np.testing.assert_allclose(np.asarray(ours)[0, 0], expected, rtol=1e-5, atol=1e-4)


def test_every_layer_of_an_fbmae_clmae_file_is_imported_upright():
    """Guards the fb/mae / CL-MAE importer's orientation of every linear layer and the patch projection."""
    geometry = {"width": WIDTH, "depth": DEPTH, "patch_size": PATCH, "channels": CHANNELS, "image_size": IMAGE,
                "decoder_width": DECODER_WIDTH, "decoder_depth": 1, "masker_depth": 1}
    state_dict = {**random_state_dict(clmae_shapes()), **layout.fixed_buffer_tables(geometry)}
    found, params = mae_torch.from_fbmae_state_dict(state_dict, "hand-made", {"num_heads": HEADS,
                                                                               "decoder_heads": HEADS})
    assert (found["width"], found["masker_depth"], found["decoder_width"]) == (WIDTH, 1, DECODER_WIDTH)
    assert_every_linear_upright(state_dict, params, layout.fbmae_layout(found))
    assert_patch_projection_upright(state_dict, params["mae"]["patch_embed"]["proj"])


def test_hugging_face_query_key_value_are_imported_upright_and_in_order():
    """Guards the Hugging Face importer: separate query / key / value fused into qkv, each upright, q-k-v order."""
    geometry = {"width": WIDTH, "depth": DEPTH, "patch_size": PATCH, "channels": CHANNELS, "image_size": IMAGE,
                "decoder_width": DECODER_WIDTH, "decoder_depth": 1}
    shapes = {k: v for k, v in clmae_shapes().items() if not k.startswith("masking_net.")}
    hub = hf.fbmae_to_hf({**random_state_dict(shapes, seed=1), **layout.fixed_buffer_tables(geometry)})
    _, params = mae_torch.from_fbmae_state_dict(hf.hf_to_fbmae(hub, "hand-made"), "hand-made",
                                                {"num_heads": HEADS, "decoder_heads": HEADS})
    for stack, ours in (("vit.encoder.layer.0", params["encoder"]["block0"]),
                        ("decoder.decoder_layers.0", params["decoder"]["block0"])):
        parts = [(hub[f"{stack}.attention.attention.{p}.weight"], hub[f"{stack}.attention.attention.{p}.bias"])
                 for p in ("query", "key", "value")]
        x = hand_made_input(parts[0][0].shape[1])
        qkv = nn.Dense(3 * x.shape[1]).apply({"params": ours["attn"]["qkv"]}, x)
        np.testing.assert_allclose(qkv, np.concatenate([torch_linear(x, w, b) for w, b in parts], axis=1),
                                   rtol=1e-4, atol=1e-4, err_msg=stack)
        proj = (hub[f"{stack}.attention.output.dense.weight"], hub[f"{stack}.attention.output.dense.bias"])
        assert_linear_imported_upright(ours["attn"]["proj"]["kernel"], ours["attn"]["proj"]["bias"], *proj, stack)


@pytest.mark.parametrize("pool", ["cls", "gap_norm"])
def test_every_layer_of_a_timm_classifier_is_imported_upright(pool):
    """Guards the classifier importer (fb/mae fine-tuned / timm names): blocks, head and patch projection."""
    shapes = {**encoder_shapes(), "pos_embed": (1, 1 + PATCHES, WIDTH), "head.weight": (CLASSES, WIDTH),
              "head.bias": (CLASSES,)}
    if pool == "gap_norm":  # MAE's global pool: fc_norm instead of the final norm.
        shapes = {**{k: v for k, v in shapes.items() if not k.startswith("norm.")}, "fc_norm.weight": (WIDTH,),
                  "fc_norm.bias": (WIDTH,)}
    state_dict = random_state_dict(shapes, seed=2)
    found, params = classifier_torch.from_classifier_state_dict(state_dict, "hand-made", {"num_heads": HEADS})
    assert (found["pool"], found["pos_embed"], found["num_classes"]) == (pool, "learned", CLASSES)
    assert_every_linear_upright(state_dict, params, classifier_torch.classifier_layout(found))
    assert_patch_projection_upright(state_dict, params["patch_embed"]["proj"])
    np.testing.assert_array_equal(params["pos_embed"]["table"], state_dict["pos_embed"][0])


def cvt_official_state_dict(seed: int = 3) -> dict:
    """A random official microsoft/CvT state dict for CVT_TINY, names and PyTorch shapes derived from our tree:
    Linear [out, in], Conv2d [O, I, kH, kW], norms' scale as weight, BatchNorm statistics as running_*."""
    model = CvT(num_classes=CLASSES, **CVT_TINY)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    rng, state_dict = np.random.default_rng(seed), {}
    for (collection, *modules, leaf), value in traverse_util.flatten_dict(variables).items():
        name = "norm" if modules == ["norm_final"] else ".".join(modules).replace("blocks_", "blocks.")
        shape = value.shape
        if leaf == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}.get(leaf, leaf)
        state_dict[f"{name}.{leaf}"] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return state_dict


def test_every_linear_layer_of_a_cvt_checkpoint_is_imported_upright():
    """Guards the CvT importer's orientation of every nn.Linear (q/k/v and output projections are square)."""
    state_dict = cvt_official_state_dict()
    params = load_cvt_torch_checkpoint(state_dict, config=CVT_TINY)["params"]
    linears = [name for name, value in state_dict.items() if name.endswith(".weight") and value.ndim == 2]
    assert sum(state_dict[n].shape[0] == state_dict[n].shape[1] for n in linears) >= 9  # q, k, v, proj...
    for name in linears:
        *modules, _ = name.replace(".blocks.", ".blocks_").split(".")
        leaves = layout.get_leaf(params, tuple(modules))
        bias = name.removesuffix(".weight") + ".bias"
        assert_linear_imported_upright(leaves["kernel"], leaves["bias"], state_dict[name], state_dict[bias], name)
