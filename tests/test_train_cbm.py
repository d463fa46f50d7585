"""CBM supervised training: what the step masks and what evaluation does not, every model taking a step, and
end-to-end runs of main.py on real Fashion-MNIST (1 vs 8 devices, resume, errors)."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbm_jax import train_supervised as cbm
from cbm_jax.masking import num_masked_patches
from clmae_jax.runtime import data, loop, mesh as mesh_lib, validate
from configs import cbm_fashion_mnist, cbm_paper, common
from conftest import assert_trees_close, load_params, run_main, train

CONFIG = "cbm_fashion_mnist.py:test"


def tiny_config(**cbm_overrides):
    """The Fashion-MNIST test config, with config.cbm fields replaced."""
    config = cbm_fashion_mnist.get_config("test")
    config.cbm.update(cbm_overrides)
    return config


def textured_batch(size=28, seed=0):
    """uint8 grey images, flat except for noise in one cell of the 4x4 grid (cell 9 = row 2, column 1)."""
    rng = np.random.default_rng(seed)
    images = np.full((4, size, size, 1), 100, np.uint8)
    cell = size // 4
    images[:, 2 * cell:3 * cell, cell:2 * cell] = rng.integers(0, 256, (4, cell, cell, 1))
    return jnp.asarray(images)


def test_masked_inputs_zero_exactly_k_cells_and_nothing_at_k0():
    config, images = tiny_config(), textured_batch()
    normalized = data.normalize(images, config.input.mean, config.input.std)
    np.testing.assert_array_equal(cbm.masked_inputs(config, images, jax.random.PRNGKey(0), 0), normalized)
    masked = np.asarray(cbm.masked_inputs(config, images, jax.random.PRNGKey(0), 3))
    cells = masked.reshape(4, 4, 7, 4, 7).transpose(0, 1, 3, 2, 4).reshape(4, 16, 49)
    zero_cells = np.all(cells == 0, axis=2)
    assert zero_cells.sum(axis=1).tolist() == [3] * 4
    reference = np.asarray(normalized).reshape(4, 4, 7, 4, 7).transpose(0, 1, 3, 2, 4).reshape(4, 16, 49)
    np.testing.assert_array_equal(cells[~zero_cells], reference[~zero_cells])


def test_salience_masks_the_textured_cell_and_uniform_does_not_prefer_it():
    images = textured_batch()
    hits = {}
    for salience in ("sobel", "uniform"):
        config = tiny_config(salience=salience)
        masked = jnp.stack([cbm.masked_inputs(config, images, jax.random.PRNGKey(s), 1) for s in range(25)])
        hits[salience] = float(jnp.mean(jnp.all(masked[:, :, 14:21, 7:14] == 0, axis=(2, 3, 4))))
    # Cell 9 holds most of the gradient energy (its edges leak into the neighbours' borders), so Sobel picks it
    # about 2 times in 3; uniform picks it 1 time in 16 (100 draws each).
    assert hits["sobel"] > 0.5 and hits["uniform"] < 0.2


def test_salience_at_another_resolution_still_finds_the_textured_cell():
    config = tiny_config(salience_size=56)
    probs = cbm.cell_probabilities(config, textured_batch())
    assert probs.shape == (4, 16) and np.all(np.argmax(probs, axis=1) == 9)


def test_unknown_salience_is_a_clear_error():
    with pytest.raises(ValueError, match="sobel"):
        cbm.cell_probabilities(tiny_config(salience="edges"), textured_batch())


def setup(config):
    """(model, state, train_step, eval_step) of a tiny ResNet for `config`."""
    model = cbm.build_classifier(config, 10)
    variables = cbm.init_variables(model, config, 10)
    tx = optax.sgd(0.1)
    state = cbm.fresh_state(variables, tx)
    train_step = jax.jit(cbm.make_train_step(model, tx, optax.constant_schedule(0.1), config), static_argnums=2)
    return model, state, train_step, jax.jit(cbm.make_eval_step(model, config))


def labelled_batch(images):
    """A training/eval batch of `images` with labels 0..B-1 and no padding."""
    b = images.shape[0]
    return {"image": images, "label": jnp.arange(b) % 10, "mask": jnp.ones(b, jnp.int32)}


@pytest.mark.slow
def test_training_masks_and_evaluation_does_not():
    config = tiny_config()
    model, state, train_step, eval_step = setup(config)
    batch = labelled_batch(textured_batch())
    variables = {"params": state.params, **state.model_state}

    # Evaluation sees the unmasked images, whatever the masking schedule.
    logits = model.apply(variables, data.normalize(batch["image"], config.input.mean, config.input.std), train=False)
    expected_correct = float(jnp.sum(logits.argmax(-1) == batch["label"]))
    assert float(eval_step(state, batch)["correct"]) == expected_correct
    np.testing.assert_allclose(float(eval_step(state, batch)["loss"]), float(jnp.sum(
        optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))), rtol=1e-6)

    # Training with all 16 cells masked sees only zeros: its loss is the loss of blank images.
    _, measurements = train_step(state, batch, 16)
    blank_logits, _ = model.apply(variables, jnp.zeros_like(batch["image"], jnp.float32), train=True,
                                  mutable=["batch_stats"])
    blank_loss = optax.softmax_cross_entropy_with_integer_labels(blank_logits, batch["label"]).mean()
    np.testing.assert_allclose(float(measurements["loss"]), float(blank_loss), rtol=1e-5)
    _, unmasked = train_step(state, batch, 0)
    assert abs(float(unmasked["loss"]) - float(blank_loss)) > 1e-3


def test_train_step_updates_batch_stats_and_learns_a_batch():
    config = tiny_config()
    _, state, train_step, _ = setup(config)
    batch = labelled_batch(textured_batch())
    first = None
    for _ in range(15):
        old_stats = state.model_state
        state, measurements = train_step(state, batch, 1)
        first = first if first is not None else float(measurements["loss"])
    assert not np.allclose(jax.tree.leaves(old_stats)[0], jax.tree.leaves(state.model_state)[0])
    assert float(measurements["loss"]) < first


@pytest.mark.parametrize("name", [pytest.param("wrn_52_2", marks=pytest.mark.slow),
                                  pytest.param("cvt13", marks=pytest.mark.slow), "vit"])
def test_every_model_takes_a_cbm_step(name):
    config = tiny_config()
    if name == "vit":
        config.model = common.vit_classifier(size="mini", patch_size=4)
    else:
        config.model.update(name=name, init_from="")
    config.input.update(image_size=16, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = cbm.build_classifier(config, 10)
    variables = cbm.init_variables(model, config, 10)
    tx = optax.sgd(0.01)
    state = cbm.fresh_state(variables, tx)
    step = jax.jit(cbm.make_train_step(model, tx, optax.constant_schedule(0.01), config), static_argnums=2)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)), jnp.uint8)
    new_state, measurements = step(state, labelled_batch(images), 3)
    assert np.isfinite(float(measurements["loss"])) and float(measurements["grad_norm"]) > 0
    assert int(new_state.step) == 1


def test_unknown_model_and_misplaced_weights_are_clear_errors():
    config = tiny_config()
    config.model.name = "resnet50"
    with pytest.raises(ValueError, match="^config.model.name='resnet50' is not a known value; use one of 'resnet18', 'wrn_52_2', 'cvt13', 'vit'"):
        cbm.build_classifier(config, 10)
    config.model.update(name="resnet18", init_from="weights.pth")
    with pytest.raises(ValueError, match="loads PyTorch CvT-13 weights.*not 'resnet18'"):
        cbm.init_variables(cbm.build_classifier(config, 10), config, 10)
    config.model.name = "cvt13"
    with pytest.raises(FileNotFoundError, match="CvT-13-224x224-IN-1k.pth"):
        validate.check_weights(config)


def test_paper_recipes():
    r18 = cbm_paper.paper_config("resnet18", "cifar100")
    assert (r18.batch_size, r18.num_epochs, r18.input.image_size, r18.input.augment) == (64, 200, 32, "none")
    assert (r18.optimizer.name, r18.optimizer.lr, r18.optimizer.momentum, r18.optimizer.weight_decay) == \
        ("sgd", 0.1, 0.9, 5e-4)
    assert tuple(r18.optimizer.decay_epochs) == (32, 62, 92) and r18.cbm.preset == "40"
    assert (r18.input.mean, r18.input.std, r18.cbm.grid, r18.cbm.salience_size) == ((0.5,) * 3, (0.5,) * 3, 4, 64)
    wrn = cbm_paper.paper_config("wrn_52_2", "tiny_imagenet")
    assert (wrn.num_epochs, wrn.optimizer.weight_decay, wrn.cbm.preset, wrn.input.image_size) == (100, 1e-4, "40", 64)
    cvt = cbm_paper.paper_config("cvt13", "cifar100")
    assert (cvt.optimizer.name, cvt.optimizer.lr, cvt.optimizer.schedule, cvt.num_epochs) == \
        ("adamax", 5e-4, "constant", 40)
    assert (cvt.input.image_size, cvt.cbm.preset, cvt.model.init_from) == (64, "60", "CvT-13-224x224-IN-1k.pth")
    assert cbm_paper.paper_config("cvt13", "food101").input.image_size == 224
    assert cbm_paper.paper_config("resnet18", "cifar10", "baseline").cbm.schedule == "none"
    assert cbm_paper.paper_config("resnet18", "cifar10", "random").cbm.salience == "uniform"
    with pytest.raises(ValueError, match="resnet18,cifar10"):
        cbm_paper.paper_config("wrn_52_2", "sport_balls")


def test_schedule_of_a_run_follows_the_preset():
    config = cbm_paper.paper_config("resnet18", "tiny_imagenet")
    counts = [num_masked_patches(r, 16) for r in cbm.masking_ratios(config, 100)]
    assert counts[:10] == [1, 3, 5, 7, 9] * 2 and len(counts) == 100


def test_fashion_mnist_variants_mask_their_cell_counts():
    configs = {variant: cbm_fashion_mnist.get_config(variant) for variant in ("", "light", "random", "baseline")}
    counts = {v: [num_masked_patches(r, 16) for r in cbm.masking_ratios(c, 10)] for v, c in configs.items()}
    assert counts[""] == counts["random"] == [1, 2, 3, 4, 6] * 2
    assert counts["light"] == [1, 1, 2, 3, 4] * 2  # The same sawtooth, ending at 4 cells.
    assert counts["baseline"] == [0] * 10


@pytest.mark.slow
def test_same_numbers_on_1_and_8_devices(tmp_path, scalars):
    runs = {devices: str(tmp_path / f"d{devices}") for devices in (1, 8)}
    train(runs[1], CONFIG, log_every_steps=1)  # This process has one device.
    run_main(runs[8], CONFIG, "--config.log_every_steps=1", devices=8)
    for tag in ("loss", "train_accuracy", "test_accuracy"):
        first, second = scalars(runs[1], tag), scalars(runs[8], tag)
        assert sorted(first) == sorted(second) and first
        np.testing.assert_allclose([first[s] for s in first], [second[s] for s in first], atol=1e-5)
    assert_trees_close(load_params(runs[1], 4), load_params(runs[8], 4), atol=1e-5)


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_keeps_results(tmp_path, scalars):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(straight, CONFIG)
    train(resumed, CONFIG, stop_after_steps=2)
    assert not os.path.exists(os.path.join(resumed, "results.json"))  # Only whole epochs and the end evaluate.
    train(resumed, CONFIG)
    assert_trees_close(load_params(straight, 4), load_params(resumed, 4), atol=1e-6)
    with open(os.path.join(straight, "results.json")) as f, open(os.path.join(resumed, "results.json")) as g:
        results, resumed_results = json.load(f), json.load(g)
    assert results == resumed_results and set(results) >= {"best_test_accuracy", "final_test_accuracy"}
    run_main(straight, CONFIG, "--config.experiment=cbm_eval")
    with open(os.path.join(straight, "eval_results.json")) as f:
        evaluated = json.load(f)
    assert (evaluated["step"], evaluated["test_examples"]) == (4, 10_000)
    assert evaluated["test_accuracy"] == results["final_test_accuracy"]
    assert scalars(straight, "masked_patches") == {4: 1.0}
    assert any(name.startswith("cbm_masks_") for name in os.listdir(os.path.join(straight, "images")))


@pytest.mark.slow
def test_evaluating_without_a_checkpoint_is_one_clear_line(tmp_path):
    proc = run_main(str(tmp_path), CONFIG, "--config.experiment=cbm_eval", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("error: No checkpoint in ") and "--workdir" in last


@pytest.mark.slow
def test_missing_cvt_weights_is_one_clear_line(tmp_path):
    proc = run_main(str(tmp_path), CONFIG, "--config.model.name=cvt13", "--config.input.channels=3",
                    "--config.input.mean=(0.5,0.5,0.5)", "--config.input.std=(0.5,0.5,0.5)",
                    "--config.model.init_from=/nowhere/cvt.pth", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("error: config.model.init_from=/nowhere/cvt.pth does not exist; "
                                                    "download CvT-13-224x224-IN-1k.pth (microsoft/CvT model zoo)")


@pytest.mark.slow
def test_one_compilation_per_distinct_masked_cell_count(monkeypatch):
    config = tiny_config()
    config.num_epochs, config.total_steps = 10, 0
    budget = loop.Budget(config, steps_per_epoch=1, total_steps=10, num_classes=10)
    counts = [num_masked_patches(r, 16) for r in cbm.masking_ratios(config, 10)]
    assert counts == [1, 2, 3, 4, 6] * 2  # Preset "40" repeats every 5 epochs.
    original = cbm.make_train_step
    monkeypatch.setattr(cbm, "make_train_step", lambda *args: chex.assert_max_traces(original(*args), n=5))
    experiment = cbm.Supervised(config, mesh_lib.make_mesh(), budget)
    state = experiment.create_train_state()
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1)), jnp.uint8)
    for step in range(1, 11):
        state, _ = experiment.train_step(state, labelled_batch(images), step)
    assert int(state.step) == 10


def test_vit_classifier_configs_reach_attention_and_remat_from_the_command_line():
    from configs import cbm_vit_cifar100, finetune_fashion_mnist
    for module in (cbm_vit_cifar100, finetune_fashion_mnist):
        config = module.get_config()
        config.update_from_flattened_dict({"model.attention": "xla", "model.remat": True})
        model = cbm.build_classifier(config, 10)
        assert (model.attention, model.remat) == ("xla", True), module.__name__
