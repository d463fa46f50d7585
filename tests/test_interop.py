"""PyTorch interoperability of the MAE family: Hugging Face ViTMAE parity, fb/mae and HF round trips, errors."""
import argparse
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clmae_jax.evaluate import load  # noqa: E402
from clmae_jax.evaluate.encoder import ENCODER_KEYS  # noqa: E402
from conftest import load_params, run_main  # noqa: E402
from clmae_jax.interop import load_pretrained, mae_for_geometry, params_geometry, save_fbmae, save_hf  # noqa: E402
from clmae_jax.interop import hf, mae_torch, shapes  # noqa: E402
from clmae_jax.models.mae import mae_loss, num_visible, topk_masking  # noqa: E402
from clmae_jax.models.masker import CurriculumMasker  # noqa: E402
from clmae_jax.runtime.errors import UserError  # noqa: E402

ATOL = 1e-5
IMAGE, PATCH, BATCH = 16, 4, 3
NUM_PATCHES = (IMAGE // PATCH) ** 2


def random_hf_model(seed=0, norm_pix_loss=False):
    """A small ViTMAEForPreTraining with every trainable weight drawn at random (biases and norms included)."""
    config = transformers.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=IMAGE,
        patch_size=PATCH, num_channels=3, decoder_hidden_size=16, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=64, layer_norm_eps=1e-6, mask_ratio=0.75,
        norm_pix_loss=norm_pix_loss)
    torch.manual_seed(seed)
    model = transformers.ViTMAEForPreTraining(config).eval()
    with torch.no_grad():
        # transformers 5.17 leaves both sin-cos tables at zero in a model built from a config (its _init_weights
        # zeroes the decoder's and skips the encoder's); its own initialisers give the published tables.
        model.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
        model.vit.embeddings.initialize_weights()
        model.decoder.initialize_weights(NUM_PATCHES)
        for p in model.parameters():
            if p.requires_grad:  # The position tables are fixed sin-cos (requires_grad=False) in both models.
                torch.nn.init.normal_(p, std=0.3)
    return model


def inputs(seed=1):
    """Images [B,C,H,W] and masking noise [B,L] as torch tensors."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, 3, IMAGE, IMAGE, generator=gen), torch.rand(BATCH, NUM_PATCHES, generator=gen)


def hf_outputs(model, images, noise):
    """HF's loss, reconstructions, mask and encoder output (visible tokens) as numpy."""
    with torch.no_grad():
        out = model(images, noise=noise)
        latent = model.vit(images, noise=noise).last_hidden_state
    return {"loss": out.loss.numpy(), "pred": out.logits.numpy(), "mask": out.mask.numpy(), "latent": latent.numpy()}


def encode(mae, images, keep_scores, num_keep):
    """Our encoder output on the visible tokens, as HF's `vit(...).last_hidden_state`."""
    return mae.forward_encoder(topk_masking(mae.embed(images), keep_scores, num_keep)[0])


def our_outputs(geometry, params, images, noise, norm_pix_loss=False):
    """Our loss, reconstructions, mask and encoder output for the same images and noise."""
    mae, images = mae_for_geometry(geometry), jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
    # HF keeps the tokens with the smallest noise; ours keeps the highest scores.
    scores, keep = -jnp.asarray(noise.numpy()), num_visible(NUM_PATCHES, 0.75)

    @jax.jit  # One compilation instead of one per operation.
    def run(params, images, scores):
        pred, mask = mae.apply({"params": params}, images, scores, keep)
        latent = mae.apply({"params": params}, images, scores, keep, method=encode)
        return {"loss": mae_loss(images, pred, mask, geometry["patch_size"], norm_pix_loss), "pred": pred,
                "mask": mask, "latent": latent}
    return jax.tree.map(np.asarray, run(params, images, scores))


def max_differences(a, b):
    """{output: max |a - b|}."""
    return {k: float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in a}


def random_params(geometry, seed=0, masker=False):
    """Our MAE (and masker) tree with every leaf random, so no zero bias or unit norm hides a mapping slip."""
    mae, images = mae_for_geometry(geometry), jnp.zeros((1, IMAGE, IMAGE, geometry["channels"]))
    params = jax.eval_shape(lambda rng: mae.init(rng, images, jnp.zeros((1, NUM_PATCHES)), 4), jax.random.key(0))
    params = params["params"]
    if masker:
        module = CurriculumMasker(depth=geometry["masker_depth"], num_heads=geometry["masker_heads"])
        tokens = jnp.zeros((1, NUM_PATCHES, geometry["width"]))
        params = {"mae": params, "masker": jax.eval_shape(module.init, jax.random.key(0), tokens)["params"]}
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32), params)


GEOMETRY = dict(width=32, depth=2, num_heads=2, mlp_ratio=4.0, patch_size=PATCH, channels=3, image_size=IMAGE,
                decoder_width=16, decoder_depth=1, decoder_heads=2, masker_depth=0, masker_heads=None,
                mean=shapes.IMAGENET_MEAN, std=shapes.IMAGENET_STD)
CLMAE_GEOMETRY = {**GEOMETRY, "masker_depth": 2, "masker_heads": 4}


def assert_trees_equal(a, b):
    """Same structure, every leaf bit for bit."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hugging_face_vitmae_imports_with_the_same_outputs(tmp_path, norm_pix_loss):
    model = random_hf_model(norm_pix_loss=norm_pix_loss)
    model.save_pretrained(tmp_path / "hf")  # transformers 5 names (q_proj, layers.N, ...).
    geometry, params = load_pretrained(str(tmp_path / "hf"))
    assert {k: geometry[k] for k in ("width", "depth", "num_heads", "decoder_heads", "image_size")} == dict(
        width=32, depth=2, num_heads=2, decoder_heads=2, image_size=IMAGE)
    images, noise = inputs()
    theirs, ours = hf_outputs(model, images, noise), our_outputs(geometry, params, images, noise, norm_pix_loss)
    np.testing.assert_array_equal(ours["mask"], theirs["mask"])
    differences = max_differences(ours, theirs)
    assert max(differences.values()) < ATOL, differences


@pytest.mark.parametrize("masker", [False, True], ids=["mae", "clmae"])
def test_fbmae_round_trip_is_bit_exact(tmp_path, masker):
    geometry = CLMAE_GEOMETRY if masker else GEOMETRY
    params = random_params(geometry, masker=masker)
    state_dict = mae_torch.to_fbmae_state_dict(params, geometry)
    assert ("masking_net.mlp_head.1.weight" in state_dict) == masker
    assert "decoder_blocks.0.attn.qkv.weight" in state_dict
    assert_trees_equal(mae_torch.from_fbmae_state_dict(state_dict, hints=geometry)[1], params)
    save_fbmae(params, geometry, str(tmp_path / "mae.pth"))
    loaded_geometry, loaded = load_pretrained(str(tmp_path / "mae.pth"))
    assert_trees_equal(loaded, params)
    assert {k: loaded_geometry[k] for k in geometry} == geometry


def test_hugging_face_round_trip_is_bit_exact(tmp_path):
    params = random_params(GEOMETRY)
    state_dict = hf.fbmae_to_hf(mae_torch.to_fbmae_state_dict(params, GEOMETRY))
    assert "vit.encoder.layer.1.attention.attention.value.weight" in state_dict
    fbmae = hf.hf_to_fbmae(state_dict)
    assert_trees_equal(mae_torch.from_fbmae_state_dict(fbmae, hints=GEOMETRY)[1], params)
    save_hf(params, GEOMETRY, str(tmp_path / "hf"))
    geometry, loaded = load_pretrained(str(tmp_path / "hf"))
    assert_trees_equal(loaded, params)
    assert geometry["num_heads"] == 2 and geometry["decoder_heads"] == 2
    assert tuple(geometry["mean"]) == shapes.IMAGENET_MEAN


def test_exported_hugging_face_folder_loads_with_the_same_outputs(tmp_path):
    params = random_params(GEOMETRY, seed=3)
    save_hf(params, GEOMETRY, str(tmp_path / "hf"))
    model, info = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.layer_norm_eps == 1e-6
    images, noise = inputs(seed=4)
    theirs, ours = hf_outputs(model.eval(), images, noise), our_outputs(GEOMETRY, params, images, noise)
    np.testing.assert_array_equal(ours["mask"], theirs["mask"])
    differences = max_differences(ours, theirs)
    assert max(differences.values()) < ATOL, differences


def saved_state_dict(tmp_path, edit):
    """Path of an fb/mae .pth of random weights after `edit(state_dict)`."""
    state_dict = mae_torch.to_fbmae_state_dict(random_params(GEOMETRY), GEOMETRY)
    edit(state_dict)
    path = str(tmp_path / "edited.pth")
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state_dict.items()}}, path)
    return path


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.update({"dist_token": np.zeros((1, 1, 32), np.float32)}), "dist_token"),
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), "blocks.1.mlp.fc2.bias"),
    (lambda sd: sd.update({"pos_embed": sd["pos_embed"] + 0.1}), "pos_embed"),
    (lambda sd: sd.update({"decoder_pred.weight": np.zeros((50, 16), np.float32)}), "decoder_pred.weight"),
], ids=["unknown", "missing", "learned_pos_embed", "wrong_shape"])
def test_unmappable_files_are_one_line_user_errors(tmp_path, edit, named):
    with pytest.raises(UserError) as error:
        load_pretrained(saved_state_dict(tmp_path, edit), num_heads=2, decoder_heads=2)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_hub_layer_norm_eps_is_imported_with_a_warning(tmp_path, caplog):
    model = random_hf_model()
    model.config.layer_norm_eps = 1e-12  # What the Hub's facebook/vit-mae-* configs say.
    model.save_pretrained(tmp_path / "hf")
    geometry, _ = load_pretrained(str(tmp_path / "hf"))
    assert geometry["width"] == 32
    assert any("layer_norm_eps=1e-12" in r.getMessage() for r in caplog.records)


def test_official_training_checkpoint_needs_heads_only_for_non_standard_sizes(tmp_path):
    params = random_params(CLMAE_GEOMETRY, masker=True)
    state_dict = {k: torch.from_numpy(v) for k, v in mae_torch.to_fbmae_state_dict(params, CLMAE_GEOMETRY).items()}
    path = str(tmp_path / "checkpoint-199.pth")  # As CL-MAE's main_pretrain.py saves: args pickled, no geometry.
    torch.save({"model": state_dict, "args": argparse.Namespace(model="mae_vit_tiny"), "epoch": 199}, path)
    with pytest.raises(UserError, match="num_heads="):
        load_pretrained(path)
    geometry, loaded = load_pretrained(path, num_heads=2, decoder_heads=2)
    assert_trees_equal(loaded, params)
    assert geometry["masker_depth"] == 2 and geometry["masker_heads"] == shapes.MASKER_HEADS


@pytest.mark.parametrize("encoder_only", [False, True], ids=["full", "encoder_only"])
def test_load_encoder_reads_an_exported_pth_bit_for_bit(tmp_path, encoder_only):
    params = random_params(CLMAE_GEOMETRY, masker=True)
    mae = {k: params["mae"][k] for k in ENCODER_KEYS} if encoder_only else params
    geometry = params_geometry(mae, image_size=IMAGE, num_heads=2, decoder_heads=2, mean=(0.1, 0.2, 0.3),
                               std=(0.4, 0.5, 0.6))
    path = str(tmp_path / "weights.pth")
    save_fbmae(mae, geometry, path)
    config = ml_collections.ConfigDict(dict(encoder=dict(checkpoint=path, step=-1),
                                            input=dict(mean=(0.5,), std=(0.5,))))
    encoder = load.load_encoder(config)
    assert_trees_equal(encoder.params, {k: params["mae"][k] for k in ENCODER_KEYS})
    assert encoder.num_heads == 2 and encoder.mean == (0.1, 0.2, 0.3) and encoder.std == (0.4, 0.5, 0.6)


def test_cli_converts_between_formats(tmp_path):
    from clmae_jax.interop.__main__ import convert
    params = random_params(CLMAE_GEOMETRY, masker=True)
    save_fbmae(params, CLMAE_GEOMETRY, str(tmp_path / "clmae.pth"))
    assert convert(str(tmp_path / "clmae.pth"), str(tmp_path / "hf")) == "hf"
    assert_trees_equal(load_pretrained(str(tmp_path / "hf"))[1], params["mae"])  # HF has no masking module.
    assert convert(str(tmp_path / "clmae.pth"), str(tmp_path / "params.npz")) == "npz"
    with np.load(tmp_path / "params.npz") as saved:
        np.testing.assert_array_equal(saved["masker/head/kernel"], params["masker"]["head"]["kernel"])
        assert '"masker_depth": 2' in str(saved["__geometry__"])
    assert os.path.exists(tmp_path / "hf" / "model.safetensors")


@pytest.mark.slow
def test_cli_exports_a_clmae_run_bit_for_bit(tmp_path):
    from clmae_jax.interop.__main__ import main
    workdir = str(tmp_path / "run")
    run_main(workdir, "clmae_fashion_mnist.py:test", "--config.total_steps=1", "--config.checkpoint_every_steps=1")
    main([f"--from={workdir}", f"--to={tmp_path / 'clmae.pth'}"])
    geometry, params = load_pretrained(str(tmp_path / "clmae.pth"))
    assert_trees_equal(params, jax.tree.map(np.asarray, load_params(workdir, 1)))
    assert geometry["channels"] == 1 and geometry["image_size"] == 28 and geometry["masker_depth"] > 0
    with pytest.raises(SystemExit, match="^error: Unknown --format='onnx'"):
        main([f"--from={workdir}", f"--to={tmp_path / 'x'}", "--format=onnx"])


class TorchBlock(torch.nn.Module):
    """A pre-norm ViT block as the spec describes MaskingNet's (timm 0.3.2 layout, explicit softmax, LN eps 1e-5)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.norm1, self.norm2 = heads, torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn, self.mlp = torch.nn.Module(), torch.nn.Module()
        self.attn.qkv, self.attn.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.mlp.fc1, self.mlp.fc2 = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x):
        batch, length, width = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * (width // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((weights @ v).transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class TorchMaskingNet(torch.nn.Module):
    """The official CL-MAE masking module built from the spec's layout: own CLS (zero position buffer), blocks,
    mlp_head = LayerNorm -> Linear(D, L) on the CLS output, sigmoid."""

    def __init__(self, width, num_tokens, depth, heads):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", torch.zeros(1, 1, width))
        self.blocks = torch.nn.ModuleList([TorchBlock(width, heads) for _ in range(depth)])
        self.mlp_head = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, num_tokens))

    def forward(self, tokens):
        x = torch.cat([(self.cls_token + self.pos_embed).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return torch.sigmoid(self.mlp_head(x[:, 0]))


def test_official_masking_module_imports_with_the_same_keep_probabilities(tmp_path):
    reference = TorchMaskingNet(32, NUM_PATCHES, depth=2, heads=4)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in reference.parameters():
            torch.nn.init.normal_(p, std=0.3)
    state_dict = mae_torch.to_fbmae_state_dict(random_params(CLMAE_GEOMETRY, masker=True), CLMAE_GEOMETRY)
    state_dict.update({f"masking_net.{k}": v.numpy() for k, v in reference.state_dict().items()})
    path = str(tmp_path / "clmae.pth")
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}}, path)
    geometry, params = load_pretrained(path, num_heads=2, decoder_heads=2)
    tokens = torch.randn(BATCH, NUM_PATCHES, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = reference(tokens).numpy()
    masker = CurriculumMasker(depth=geometry["masker_depth"], num_heads=geometry["masker_heads"])
    ours = np.asarray(masker.apply({"params": params["masker"]}, jnp.asarray(tokens.numpy())))
    assert np.max(np.abs(ours - theirs)) < ATOL
    assert np.std(theirs) > 0.05  # Random weights give spread-out probabilities, not a saturated 0 / 1.
