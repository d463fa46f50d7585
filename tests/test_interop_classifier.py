"""PyTorch interoperability of ViT classifiers: timm and Hugging Face parity, fb/mae round trips, init_from."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cbm_jax import pretrained  # noqa: E402
from clmae_jax.interop import classifier_torch as ct, layout  # noqa: E402
from clmae_jax.interop import load_pretrained  # noqa: E402
from clmae_jax.models.vit import ViTClassifier, resize_positions, sincos_2d  # noqa: E402
from clmae_jax.runtime.errors import UserError  # noqa: E402

ATOL = 1e-5
IMAGE, PATCH, WIDTH, DEPTH, HEADS, CLASSES = 16, 4, 32, 2, 2, 5


def geometry_for(pool="cls", pos_embed="learned", num_classes=CLASSES):
    """A small classifier geometry."""
    return dict(width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0, patch_size=PATCH, channels=3,
                image_size=IMAGE, num_classes=num_classes, pool=pool, pos_embed=pos_embed,
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def random_params(geometry, seed=0):
    """Our ViTClassifier tree with every leaf random."""
    shapes = ct.classifier_shapes(geometry)
    rng, params = np.random.default_rng(seed), {}
    for path, shape in shapes.items():
        layout.set_leaf(params, path, (0.3 * rng.standard_normal(shape)).astype(np.float32))
    return params


def images_nchw(seed=1, batch=3):
    """Random images [B, C, H, W] as a torch tensor."""
    return torch.rand(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def our_logits(geometry, params, images):
    """Our classifier's logits for NCHW torch images."""
    model = ct.classifier_for_geometry(geometry)
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images.numpy().transpose(0, 2, 3, 1))))


def randomised(model, seed=0):
    """`model` with every parameter (position table included) drawn at random."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def random_timm_model(global_pool):
    """A small timm VisionTransformer with random weights."""
    timm = pytest.importorskip("timm")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES,
        global_pool=global_pool)
    return randomised(model)


def save_timm(model, path):
    """Saves a timm model as facebookresearch/mae does: {"model": state_dict}."""
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.mark.parametrize("global_pool, pool", [("token", "cls"), ("avg", "gap_norm")])
def test_timm_vision_transformer_imports_with_the_same_logits(tmp_path, global_pool, pool):
    model = random_timm_model(global_pool)
    path = save_timm(model, tmp_path / "timm.pth")
    with pytest.raises(UserError, match="num_heads="):  # Width 32 is no standard size: heads are not in the file.
        ct.load_torch_weights(path)
    geometry, params = ct.load_torch_weights(path, num_heads=HEADS)
    assert (geometry["pool"], geometry["pos_embed"], geometry["num_classes"]) == (pool, "learned", CLASSES)
    images = images_nchw()
    with torch.no_grad():
        theirs = model(images).numpy()
    assert np.max(np.abs(our_logits(geometry, params, images) - theirs)) < ATOL


@pytest.mark.parametrize("pool", ["cls", "gap_norm"])
def test_export_loads_in_timm_with_the_same_logits(tmp_path, pool):
    timm = pytest.importorskip("timm")
    geometry = geometry_for(pool=pool)
    params = random_params(geometry, seed=2)
    ct.save_classifier_fbmae(params, geometry, str(tmp_path / "ours.pth"))
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES,
        global_pool="avg" if pool == "gap_norm" else "token")
    state_dict = torch.load(tmp_path / "ours.pth", weights_only=True)["model"]
    model.load_state_dict(state_dict, strict=True)
    images = images_nchw(seed=5)
    with torch.no_grad():
        theirs = model.eval()(images).numpy()
    assert np.max(np.abs(our_logits(geometry, params, images) - theirs)) < ATOL


def random_hf_classifier():
    """A small ViTForImageClassification with every weight random."""
    config = transformers.ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                    intermediate_size=4 * WIDTH, image_size=IMAGE, patch_size=PATCH, num_channels=3,
                                    num_labels=CLASSES, layer_norm_eps=1e-6)
    return randomised(transformers.ViTForImageClassification(config))


def test_hugging_face_classifier_imports_with_the_same_logits(tmp_path):
    model = random_hf_classifier()
    model.save_pretrained(tmp_path / "hf")
    geometry, params = ct.load_torch_weights(str(tmp_path / "hf"))
    assert (geometry["pool"], geometry["pos_embed"], geometry["num_heads"]) == ("cls", "learned", HEADS)
    images = images_nchw()
    with torch.no_grad():
        theirs = model(images).logits.numpy()
    assert np.max(np.abs(our_logits(geometry, params, images) - theirs)) < ATOL


def test_exported_hugging_face_classifier_loads_with_the_same_logits(tmp_path):
    geometry = geometry_for()
    params = random_params(geometry, seed=3)
    ct.save_classifier_hf(params, geometry, str(tmp_path / "hf"))
    model, info = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "hf"),
                                                                         output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    images = images_nchw(seed=4)
    with torch.no_grad():
        theirs = model.eval()(images).logits.numpy()
    assert np.max(np.abs(our_logits(geometry, params, images) - theirs)) < ATOL
    assert ct.load_torch_weights(str(tmp_path / "hf"))[0]["num_classes"] == CLASSES


def assert_trees_equal(a, b):
    """Same structure, every leaf bit for bit."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("pool, pos_embed", [("cls", "learned"), ("gap", "sincos"), ("gap_norm", "learned"),
                                             ("gap_norm", "sincos")])
def test_fbmae_and_hf_round_trips_are_bit_exact(tmp_path, pool, pos_embed):
    geometry = geometry_for(pool=pool, pos_embed=pos_embed)
    params = random_params(geometry, seed=6)
    ct.save_classifier_fbmae(params, geometry, str(tmp_path / "ours.pth"))
    loaded_geometry, loaded = ct.load_torch_weights(str(tmp_path / "ours.pth"))
    assert_trees_equal(loaded, params)
    assert {k: loaded_geometry[k] for k in geometry} == geometry
    if pool == "cls":
        ct.save_classifier_hf(params, geometry, str(tmp_path / "hf"))
        assert_trees_equal(ct.load_torch_weights(str(tmp_path / "hf"))[1], params)


def test_unmappable_classifiers_are_one_line_errors(tmp_path):
    geometry = geometry_for(pool="gap_norm")
    with pytest.raises(UserError, match="pools the CLS token") as error:
        ct.save_classifier_hf(random_params(geometry), geometry, str(tmp_path / "hf"))
    state_dict = ct.to_classifier_state_dict(random_params(geometry), geometry)
    state_dict["dist_token"] = np.zeros((1, 1, WIDTH), np.float32)
    path = str(tmp_path / "deit.pth")
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state_dict.items()}}, path)
    with pytest.raises(UserError, match="unknown key 'dist_token'") as error:
        ct.load_torch_weights(path, num_heads=HEADS)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="is a ViT classifier"):
        load_pretrained(path)


def test_resize_positions_is_the_identity_at_the_same_grid_and_keeps_the_cls_row():
    table = np.concatenate([np.full((1, 8), 7.0, np.float32), sincos_2d(8, 4)])
    np.testing.assert_array_equal(resize_positions(table, 4), table)
    resized = resize_positions(table, 6)
    assert resized.shape == (37, 8)
    np.testing.assert_array_equal(resized[0], table[0])


def classifier_config(init_from, image_size=IMAGE, pool="gap_norm", pos_embed="learned"):
    """The config fields init_from reads."""
    return ml_collections.ConfigDict(dict(
        input=dict(image_size=image_size, channels=3),
        model=dict(name="vit", size="mini", patch_size=PATCH, pool=pool, pos_embed=pos_embed, init_from=init_from)))


def fresh_variables(config, num_classes=CLASSES):
    """A random mini ViT classifier for `config`."""
    model = ViTClassifier(num_classes, patch_size=PATCH, width=128, depth=4, num_heads=4, pool=config.model.pool,
                          pos_embed=config.model.pos_embed)
    side = config.input.image_size
    return jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, side, side, 3)))


def test_init_from_a_classifier_file_takes_every_weight_and_resizes_the_position_table(tmp_path):
    geometry = {**geometry_for(pool="gap_norm"), "width": 128, "depth": 4, "num_heads": 4}
    params = random_params(geometry, seed=7)
    path = str(tmp_path / "ft.pth")
    ct.save_classifier_fbmae(params, geometry, path)
    config = classifier_config(path)
    variables = fresh_variables(config)
    assert_trees_equal(jax.tree.map(np.asarray, pretrained.with_pretrained_weights(variables, config, path)["params"]),
                       params)
    bigger = classifier_config(path, image_size=2 * IMAGE)
    variables = fresh_variables(bigger, num_classes=3)
    started = pretrained.with_pretrained_weights(variables, bigger, path)["params"]
    assert started["pos_embed"]["table"].shape == (1 + 64, 128)
    np.testing.assert_array_equal(started["pos_embed"]["table"][0], params["pos_embed"]["table"][0])
    np.testing.assert_array_equal(started["head"]["kernel"], variables["params"]["head"]["kernel"])  # 3 != 5 classes
    with pytest.raises(UserError, match="config.model.pool='gap_norm'"):
        pretrained.with_pretrained_weights(variables, classifier_config(path, pool="cls"), path)
    with pytest.raises(UserError, match="config.model.pos_embed='learned'"):
        pretrained.with_pretrained_weights(variables, classifier_config(path, pos_embed="sincos"), path)
