"""Supervised training with Curriculum by Masking (Jarca et al., 2024), one jitted update step over the mesh.

Every training image loses k of its n x n grid cells, sampled without replacement in proportion to their Sobel
salience and set to 0 in normalised space (MaskIn, the official model's first layer); k follows a per-epoch
schedule; evaluation never masks. Salience is computed per batch on device from the un-normalised pixels, so it
always matches the augmented image (the official code precomputes it once per image, without augmentation,
which is the same thing when `config.input.augment="none"`, the paper configs' setting).
"""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from cbm_jax.masking import mask_images, num_masked_patches, sample_patches, uniform_probs
from cbm_jax.models.cvt import CVT_13, CvT
from cbm_jax.models.resnet import ResNet
from cbm_jax.models.wide_resnet import WRN_52_2, WideResNet
from cbm_jax.salience import patch_salience
from cbm_jax.schedules import masking_schedule
from clmae_jax.models.vit import ViTClassifier, vit_size
from clmae_jax.runtime import data, loop, mesh as mesh_lib, metrics, optim
from clmae_jax.runtime.state import TrainState, create_state, tree_size
from clmae_jax.runtime.errors import MissingInputError, UserError

MODELS = ("resnet18", "wrn_52_2", "cvt13", "vit")


def build_classifier(config, num_classes: int) -> flax.linen.Module:
    """The classifier named by config.model.name."""
    m, dtype = config.model, jnp.dtype(config.model.dtype)
    if m.name == "resnet18":
        return ResNet(num_classes, width=m.get("width", 64), dtype=dtype)
    if m.name == "wrn_52_2":
        return WideResNet(num_classes, **WRN_52_2, dtype=dtype)
    if m.name == "cvt13":
        return CvT(num_classes, **CVT_13, dtype=dtype)
    if m.name == "vit":
        return ViTClassifier(num_classes, patch_size=m.patch_size, **vit_size(m.size), pool=m.pool, dtype=dtype)
    raise UserError(f"Unknown config.model.name {m.name!r}; use one of {', '.join(MODELS)}.")


def init_variables(model, config, num_classes: int) -> dict:
    """{'params', 'batch_stats'?}: random, or the PyTorch CvT weights named by config.model.init_from."""
    path = config.model.get("init_from")
    if path:
        if config.model.name != "cvt13":
            raise UserError(f"config.model.init_from loads PyTorch CvT-13 weights only, not {config.model.name!r}; "
                            "clear it or use model.name='cvt13'.")
        if not os.path.exists(path):
            raise MissingInputError(f"CvT weights {path} not found; download CvT-13-224x224-IN-1k.pth (microsoft/CvT "
                                    "model zoo) and set config.model.init_from to it, or '' to train from scratch.")
        from cbm_jax.interop.cvt_torch import load_cvt_torch_checkpoint
        return load_cvt_torch_checkpoint(path, num_classes, seed=config.seed)
    shape = (1, config.input.image_size, config.input.image_size, config.input.channels)
    rng = jax.random.PRNGKey(config.seed)
    return jax.jit(model.init, static_argnames="train")({"params": rng, "dropout": rng}, jnp.zeros(shape),
                                                         train=False)


def masking_ratios(config, num_epochs: int) -> np.ndarray:
    """Masking ratio of every 0-based epoch, from config.cbm's schedule (preset '' to use r_min / r_max)."""
    c = config.cbm
    return masking_schedule(c.schedule, num_epochs, c.get("r_min"), c.get("r_max"), c.get("preset") or None)


def cell_probabilities(config, images):
    """Per-image cell distribution [B, grid^2]: Sobel salience of the uint8 images, or uniform (random masking)."""
    c = config.cbm
    if c.salience == "uniform":
        return uniform_probs(images.shape[0], c.grid**2)
    if c.salience != "sobel":
        raise UserError(f"Unknown config.cbm.salience {c.salience!r}; use 'sobel' or 'uniform'.")
    pixels = images.astype(jnp.float32)
    if c.salience_size and c.salience_size != images.shape[1]:
        # The official code measures CIFAR salience on a 64 px resize (PIL bicubic) of the 32 px image.
        pixels = jax.image.resize(pixels, (pixels.shape[0], c.salience_size, c.salience_size, pixels.shape[3]),
                                  "bicubic")
    return patch_salience(pixels, c.grid)


def masked_inputs(config, images, rng, num_masked: int):
    """Normalised uint8 `images` with `num_masked` cells of each set to 0, drawn in proportion to salience."""
    normalized = data.normalize(images, config.input.mean, config.input.std)
    if num_masked == 0:  # The official MaskIn is the identity at ratio 0: no salience is computed.
        return normalized
    cells = sample_patches(rng, cell_probabilities(config, images), num_masked)
    return mask_images(normalized, cells, config.cbm.grid)


def make_train_step(model, tx, lr_schedule, config):
    """state, batch, num_masked -> state, measurements; num_masked is static (one compilation per mask count)."""
    base_rng = jax.random.PRNGKey(config.seed)

    def train_step(state: TrainState, batch, num_masked: int):
        step_rng = jax.random.fold_in(base_rng, state.step)

        def loss_and_grad(params, micro, rng):
            mask_rng, dropout_rng = jax.random.split(rng)
            images = masked_inputs(config, micro["image"], mask_rng, num_masked)

            def loss_fn(p):
                logits, new_model_state = model.apply({"params": p, **state.model_state}, images, train=True,
                                                      rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, micro["label"]).mean()
                return loss, (new_model_state, jnp.mean(logits.argmax(-1) == micro["label"]))

            return jax.value_and_grad(loss_fn, has_aux=True)(params)

        # Micro-batches average their BatchNorm running statistics; BN statistics are always over the global
        # (micro-)batch: jit with a sharded batch reduces them across devices, i.e. synchronised BatchNorm.
        (loss, (model_state, accuracy)), grads = loop.accumulate_gradients(
            loss_and_grad, state.params, batch, step_rng, config.grad_accum_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        measurements = {"loss": loss, "train_accuracy": accuracy, "learning_rate": lr_schedule(state.step),
                        **loop.norms(grads, params, updates)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
        return new_state, measurements

    return train_step


def make_eval_step(model, config):
    """state, batch -> summed correct predictions, loss and real examples (padding excluded); never masks."""

    def eval_step(state: TrainState, batch):
        images = data.normalize(batch["image"], config.input.mean, config.input.std)
        logits = model.apply({"params": state.params, **state.model_state}, images, train=False)
        real = batch["mask"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {"correct": jnp.sum((logits.argmax(-1) == batch["label"]) * real), "loss": jnp.sum(loss * real),
                "count": jnp.sum(real)}

    return eval_step


def evaluate(eval_step, state, config, source, mesh) -> dict:
    """Test accuracy and loss over the whole split (every process runs the same number of batches)."""
    local = mesh_lib.local_batch_size(config.eval_batch_size)
    iterator, _ = data.eval_iterator(config.input, source, local)
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for batch in mesh_lib.prefetch_to_mesh(iterator, mesh):
        totals = {k: totals[k] + float(v) for k, v in jax.device_get(eval_step(state, batch)).items()}
    return {"test_accuracy": totals["correct"] / totals["count"], "test_loss": totals["loss"] / totals["count"],
            "test_examples": totals["count"]}


def masking_grids(config, images, rng, num_masked: int) -> dict:
    """Pictures of uint8 `images`: original | salience of each cell (white = most likely masked) | masked input."""
    probs, masked = cell_probabilities(config, images), masked_inputs(config, images, rng, num_masked)
    b, h, w, c = images.shape
    grid = config.cbm.grid
    heat = (probs / probs.max(axis=1, keepdims=True)).reshape(b, grid, 1, grid, 1, 1)
    heat = jnp.broadcast_to(heat, (b, grid, h // grid, grid, w // grid, c)).reshape(b, h, w, c)
    std, mean = jnp.asarray(config.input.std), jnp.asarray(config.input.mean)
    columns = [images.astype(jnp.float32) / 255.0, heat, masked * std + mean]
    return {"cbm_masks": metrics.image_grid([np.asarray(x) for x in columns])}


def write_results(workdir: str, results: dict, name: str = "results.json"):
    """Writes workdir/name as JSON (process 0)."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, name), "w") as f:
            json.dump(results, f, indent=2)


def fresh_state(variables: dict, tx) -> TrainState:
    """Step 0 of model `variables`: params are trained, every other collection (batch_stats) is model state."""
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=model_state)


def initial_state(config, run, model, tx):
    """The train state of a fresh run (random or imported weights), on the mesh, replicated."""
    variables = init_variables(model, config, run.source.num_classes)
    return create_state(lambda v: fresh_state(v, tx), mesh_lib.replicated(run.mesh), variables)


def evaluate_checkpoint(config, workdir: str) -> dict:
    """Test accuracy and loss of the latest checkpoint in `workdir`, unmasked; also written to eval_results.json."""
    run = loop.Run.create(config, workdir)
    if run.checkpointer.latest_step() is None:
        raise MissingInputError(f"No checkpoint in {run.checkpointer.directory}; point --workdir at a CBM training "
                                "run of this config.")
    model = build_classifier(config, run.source.num_classes)
    tx = optim.make_optimizer(config.optimizer, run.learning_rate()[1])
    template_config = config.copy_and_resolve_references()
    template_config.model.init_from = ""  # The checkpoint replaces any imported weights: don't read them.
    state = run.restore_or(initial_state(template_config, run, model, tx))
    test_source = data.load_source(config.input, config.input.eval_split)
    test = evaluate(jax.jit(make_eval_step(model, config)), state, config, test_source, run.mesh)
    test["step"] = int(state.step)
    logging.info("checkpoint at step %d: test accuracy %.4f, loss %.4f on %d images", test["step"],
                 test["test_accuracy"], test["test_loss"], test["test_examples"])
    write_results(workdir, test, "eval_results.json")
    run.close()
    return test


def train_and_evaluate(config, workdir: str):
    """Trains a classifier with CBM as config says, evaluating every epoch; resumes from `workdir`."""
    # Mesh, input, budget, masking curriculum.
    run = loop.Run.create(config, workdir)
    replicated = mesh_lib.replicated(run.mesh)
    test_source = data.load_source(config.input, config.input.eval_split)
    num_epochs = -(-run.total_steps // run.steps_per_epoch)
    ratios = masking_ratios(config, num_epochs)
    num_cells = config.cbm.grid**2
    patches = [num_masked_patches(r, num_cells) for r in ratios]
    logging.info("CBM %s/%s masking, cells masked per epoch: %s", config.cbm.schedule, config.cbm.salience, patches)

    # Model, optimizer, state.
    model = build_classifier(config, run.source.num_classes)
    lr, lr_schedule = run.learning_rate()
    tx = optim.make_optimizer(config.optimizer, lr_schedule)
    state, metadata = run.restore_with_metadata_or(initial_state(config, run, model, tx))
    start_step = int(state.step)
    results = metadata.get("results", {})
    logging.info("%s with %.2fM parameters, lr %.3g, starting at step %d", config.model.name,
                 tree_size(state.params) / 1e6, lr, start_step)

    # Compiled steps.
    train_step = jax.jit(make_train_step(model, tx, lr_schedule, config), static_argnums=2, donate_argnums=0,
                         out_shardings=(replicated, replicated))
    eval_step = jax.jit(make_eval_step(model, config))
    images_for_summary = loop.fixed_batch(config, config.num_summary_images, config.input.train_split)

    # Loop.
    progress, last = run.progress(), run.last_step()
    timer = loop.StepTimer(start_step)
    for step, batch in zip(range(start_step + 1, last + 1), run.batches(start_step)):
        epoch = run.epoch(step - 1)
        state, measurements = train_step(state, batch, patches[epoch])
        progress(step)
        if step % config.log_every_steps == 0 or step == last:
            run.log(step, measurements, timer.seconds_per_step(step))
        if step % config.image_every_steps == 0 or step == last:
            grids = masking_grids(config, images_for_summary, jax.random.PRNGKey(step), patches[epoch])
            metrics.write_images(run.writer, workdir, step, grids)
        if step % run.steps_per_epoch == 0 or step == run.total_steps:  # Not at a preemption stop: same results.
            test = evaluate(eval_step, state, config, test_source, run.mesh)
            if test["test_accuracy"] > results.get("best_test_accuracy", -1.0):
                results.update(best_test_accuracy=test["test_accuracy"], best_epoch=epoch + 1)
            results.update(final_test_accuracy=test["test_accuracy"], final_epoch=epoch + 1, step=step)
            run.writer.write_scalars(step, {**test, "best_test_accuracy": results["best_test_accuracy"],
                                            "epoch": epoch + 1, "masking_ratio": ratios[epoch],
                                            "masked_patches": patches[epoch],
                                            "masked_fraction": patches[epoch] / num_cells})
            logging.info("epoch %d: test accuracy %.4f (best %.4f at epoch %d), %d/%d cells masked", epoch + 1,
                         test["test_accuracy"], results["best_test_accuracy"], results["best_epoch"],
                         patches[epoch], num_cells)
            write_results(workdir, results)
        if step % config.checkpoint_every_steps == 0 or step == last:
            run.save(step, state, results=results)
    run.close()
    return state, results
