"""MAE pretraining (He et al., 2021): random masking, one jitted update step over the device mesh."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from clmae_jax.models.clmae import build_mae, init_params, random_masked_loss
from clmae_jax.models.mae import denormalize_prediction
from clmae_jax.runtime import data, loop, mesh as mesh_lib, metrics, optim
from clmae_jax.runtime.state import TrainState, create_state, tree_size


def make_train_step(model, tx, lr_schedule, config):
    """state, batch -> state, measurements; the whole update in one compiled program."""
    base_rng = jax.random.PRNGKey(config.seed)

    def loss_and_grad(params, batch, rng):
        images = data.normalize(batch["image"], config.input.mean, config.input.std)
        loss_fn = lambda p: (random_masked_loss(model, config, p, images, rng)[0], ())
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(base_rng, state.step)
        (loss, _), grads = loop.accumulate_gradients(loss_and_grad, state.params, batch, rng,
                                                     config.grad_accum_steps)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(jnp.add, state.params, updates)
        measurements = {"loss": loss, "learning_rate": lr_schedule(state.step), **loop.norms(grads, params, updates)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), measurements

    return train_step


def reconstruct(model, config, params, images, rng):
    """(predicted patches, mask) for uint8 `images` under random masking: what the summaries show."""
    normalized = data.normalize(images, config.input.mean, config.input.std)
    return random_masked_loss(model, config, params, normalized, rng)[1]


def masking_columns(config, images, pred, mask) -> np.ndarray:
    """Picture columns for a batch given predicted patches and the binary mask (1 = removed)."""
    p, mean, std = config.model.patch_size, jnp.asarray(config.input.mean), jnp.asarray(config.input.std)
    normalized = data.normalize(images, mean, std)
    recon = denormalize_prediction(normalized, pred, p, config.mae.norm_pix_loss) * std + mean
    pixel_mask = jnp.repeat(jnp.repeat(mask.reshape(mask.shape[0], *2 * (int(mask.shape[1] ** 0.5),), 1), p, 1), p, 2)
    original = images.astype(jnp.float32) / 255.0
    return metrics.image_grid([original, original * (1 - pixel_mask) + 0.5 * pixel_mask, recon,
                               original * (1 - pixel_mask) + recon * pixel_mask])


def train_and_evaluate(config, workdir: str):
    """Trains an MAE as config says, resuming from the latest checkpoint in `workdir`."""
    # Mesh, input, budget.
    run = loop.Run.create(config, workdir)
    replicated = mesh_lib.replicated(run.mesh)

    # Model and optimizer.
    model = build_mae(config)
    lr, lr_schedule = run.learning_rate()
    tx = optim.make_optimizer(config.optimizer, lr_schedule)

    def init():
        params = init_params(model, config, jax.random.PRNGKey(config.seed))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    state = run.restore_or(create_state(init, replicated))
    start_step = int(state.step)
    logging.info("MAE with %.1fM parameters, lr %.3g, starting at step %d", tree_size(state.params) / 1e6, lr,
                 start_step)

    # Compiled steps.
    train_step = jax.jit(make_train_step(model, tx, lr_schedule, config), donate_argnums=(0,),
                         out_shardings=(replicated, replicated))
    images_for_summary = loop.fixed_batch(config, config.num_summary_images)
    reconstruct_fn = jax.jit(functools.partial(reconstruct, model, config))

    # Loop.
    progress, last = run.progress(), run.last_step()
    timer = loop.StepTimer(start_step)
    for step, batch in zip(range(start_step + 1, last + 1), run.batches(start_step)):
        state, measurements = train_step(state, batch)
        progress(step)
        if step % config.log_every_steps == 0 or step == last:
            run.log(step, measurements, timer.seconds_per_step(step))
        if step % config.image_every_steps == 0 or step == last:
            pred, mask = reconstruct_fn(state.params, images_for_summary, jax.random.PRNGKey(step))
            grid = masking_columns(config, images_for_summary, pred, mask)
            metrics.write_images(run.writer, workdir, step, {"reconstruction": grid})
        if step % config.checkpoint_every_steps == 0 or step == last:
            run.save(step, state)
    run.close()
    return state
