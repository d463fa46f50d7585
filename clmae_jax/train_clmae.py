"""CL-MAE pretraining (Madan et al., 2023): a learned masking module and the MAE, two alternating update steps.

Each iteration, on the same batch (official `engine_pretrain.py`):
  1. MAE step: the masking module scores the tokens, the MAE keeps the top-k and is trained with the MAE loss.
  2. Masking-module step: every token is scaled by its keep-probability, the frozen MAE reconstructs, and the module
     minimises lambda_CL(t) * L_rec + lambda_G * L_G + lambda_KL * L_KL + lambda_div * L_div.
lambda_CL goes from +1 (partner: easy masks) to -1 (adversary: hard masks) over training.
"""
import bisect
import functools
import math

import jax
import jax.numpy as jnp
import optax

from clmae_jax import curriculum, losses, warm_start
from clmae_jax.models.clmae import CLMAE, random_masked_loss
from clmae_jax.pictures import masking_columns
from clmae_jax.pretraining import Pretraining
from clmae_jax.runtime import data, loop, metrics, optim
from clmae_jax.runtime.errors import check_choice
from clmae_jax.runtime.state import TrainState, tree_size

FREEZE_MODES = ("exact", "official")
MASKER_LR_SCHEDULES = ("follow", "constant", "rewarm")
OPTIONS = {"clmae.freeze": FREEZE_MODES, "clmae.curriculum": tuple(curriculum.SCHEDULES),  # For validate.check_config.
           "clmae.masker_lr_schedule": MASKER_LR_SCHEDULES}


def half_optimizer(config) -> optax.GradientTransformation:
    """The optimizer of each half, its learning rate set per iteration (see `apply_update`)."""
    return optax.inject_hyperparams(lambda learning_rate: optim.make_optimizer(config.optimizer, learning_rate))(
        learning_rate=0.0)


def curriculum_position(config, budget, step: int) -> tuple[int, int]:
    """(epoch, epochs) of the lambda_CL schedule: real epochs, or config.clmae.curriculum_stages equal stages."""
    stages = config.clmae.curriculum_stages
    if stages > 0:
        return min(step * stages // budget.total_steps, stages - 1), stages
    epochs = math.ceil(budget.total_steps / budget.steps_per_epoch)
    return min(budget.epoch(step), epochs - 1), epochs


def curriculum_weight_at(config, budget, step: int) -> float:
    """lambda_CL for the iteration that starts at `step`."""
    return curriculum.curriculum_weight(config.clmae.curriculum, *curriculum_position(config, budget, step))


def switch_step(config, budget) -> int:
    """The first step whose lambda_CL is negative (partner -> adversary), or total_steps if none is."""
    # lambda_CL never rises, so a bisection finds the switch without walking a million ImageNet steps.
    return bisect.bisect_left(range(budget.total_steps), True,
                              key=lambda step: curriculum_weight_at(config, budget, step) < 0)


def masker_lr_schedule(config, budget, mae_schedule) -> optax.Schedule:
    """The module's learning rate: the MAE's ('follow'), its peak after the same warm-up ('constant'), or the MAE's
    until the switch to lambda_CL < 0, then the MAE's schedule afresh (warm-up, cosine) over the rest ('rewarm')."""
    name = check_choice("clmae.masker_lr_schedule", config.clmae.masker_lr_schedule, MASKER_LR_SCHEDULES)
    if name == "follow":
        return mae_schedule
    peak = budget.learning_rate()[0]
    if name == "constant":
        warmup = int(config.optimizer.warmup_epochs * budget.steps_per_epoch)
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                    [warmup])
    switch = switch_step(config, budget)
    rewarmed = optim.schedule(config.optimizer, peak, budget.steps_per_epoch, budget.total_steps - switch)
    return optax.join_schedules([mae_schedule, rewarmed], [switch])


def masker_objective(config, per_patch_errors, keep_prob, lambda_curriculum):
    """lambda_CL * L_rec + lambda_G * L_G + lambda_KL * L_KL + lambda_div * L_div, each over fixed image groups.

    Returns (total, the four unweighted terms). Groups of config.clmae.loss_group_size images reproduce the
    official per-GPU computation (256 images each, KL summed over them) on any number of devices.
    """
    c = config.clmae
    grouped = functools.partial(losses.grouped, group_size=c.loss_group_size)
    terms = {
        "loss_curriculum": grouped(losses.curriculum_loss)(per_patch_errors, keep_prob),
        "loss_gaussian": grouped(losses.gaussian_loss)(keep_prob, sigma=c.gaussian_sigma),
        "loss_kl": grouped(losses.kl_loss)(keep_prob, target_keep_ratio=c.target_keep_ratio),
        "loss_diversity": grouped(losses.diversity_loss)(keep_prob, scale=c.diversity_scale),
    }
    total = (lambda_curriculum * terms["loss_curriculum"] + c.lambda_gaussian * terms["loss_gaussian"]
             + c.lambda_kl * terms["loss_kl"] + c.lambda_diversity * terms["loss_diversity"])
    return total, terms


def mask_statistics(keep_prob, group_size: int) -> dict:
    """How decided and how varied the learned masks are."""
    distance = lambda m: jnp.mean(losses.pairwise_distances(m))
    return {"keep_prob_mean": jnp.mean(keep_prob),
            "decisive_fraction": jnp.mean((keep_prob < 0.1) | (keep_prob > 0.9)),
            # Saturated: the sigmoid's slope there is < 0.01, so the curriculum term barely moves these patches.
            "saturated_keep_fraction": jnp.mean(keep_prob > 0.99),
            "saturated_mask_fraction": jnp.mean(keep_prob < 0.01),
            "mask_distance": losses.grouped(distance, group_size)(keep_prob)}


def apply_update(tx, state, half: str, grads, lr, freeze: str, skip_frozen=None):
    """AdamW on `half`; the other half stays bit-identical ('exact') or takes a zero-gradient step ('official').

    'official' reproduces the PyTorch code under torch < 2: `zero_grad()` leaves zero tensors, so AdamW's momentum
    and weight decay keep moving the frozen half. `skip_frozen` covers the one exception: before its first
    backward pass the masking module has no .grad at all and PyTorch skips it.
    """
    params, opt_state = dict(state.params), dict(state.opt_state)
    halves = {half: grads}
    if freeze == "official":
        other = "masker" if half == "mae" else "mae"
        halves[other] = jax.tree.map(jnp.zeros_like, params[other])
    for name, g in halves.items():
        opt = opt_state[name]._replace(hyperparams={**opt_state[name].hyperparams, "learning_rate": lr})
        updates, new_opt = tx.update(g, opt, params[name])
        new_params = optax.apply_updates(params[name], updates)
        if name != half and skip_frozen is not None:
            new_params, new_opt = jax.tree.map(lambda new, old: jnp.where(skip_frozen, old, new),
                                               (new_params, new_opt), (params[name], opt))
        params[name], opt_state[name] = new_params, new_opt
    return state.replace(params=params, opt_state=opt_state)


def make_steps(model: CLMAE, tx, lr_schedule, config, masker_schedule=None):
    """(mae_step, masker_step): state, batch[, lambda_cl] -> state, measurements; the module's learning rate is
    `masker_schedule` (default: the MAE's `lr_schedule`) times config.clmae.masker_lr_scale."""
    masker_schedule = masker_schedule or lr_schedule
    check_choice("clmae.freeze", config.clmae.freeze, FREEZE_MODES)
    normalize = lambda batch: data.normalize(batch["image"], config.input.mean, config.input.std)
    rng = jax.random.PRNGKey(config.seed)  # Neither step samples; accumulation only needs a key to thread.

    def mae_step(state, batch):
        def loss_and_grad(mae_params, micro, _):
            images = normalize(micro)
            _, keep_prob = model.keep_probabilities({**state.params, "mae": mae_params}, images)
            loss_fn = lambda p: (model.learned_mask_loss(p, images, keep_prob)[0], ())
            return jax.value_and_grad(loss_fn, has_aux=True)(mae_params)

        (loss, _), grads = loop.accumulate_gradients(loss_and_grad, state.params["mae"], batch, rng,
                                                     config.grad_accum_steps, config.get("mesh"))
        state = apply_update(tx, state, "mae", grads, lr_schedule(state.step), config.clmae.freeze,
                             skip_frozen=state.step == 0)
        return state, {"mae_loss": loss, "mae_grad_norm": optax.tree.norm(grads)}

    def masker_step(state, batch, lambda_curriculum):
        def loss_and_grad(masker_params, micro, _):
            images = normalize(micro)

            def loss_fn(p):
                tokens, keep_prob = model.keep_probabilities({**state.params, "masker": p}, images)
                errors = model.soft_errors(state.params["mae"], tokens, keep_prob, images)
                total, terms = masker_objective(config, errors, keep_prob, lambda_curriculum)
                return total, {**terms, **mask_statistics(keep_prob, config.clmae.loss_group_size)}

            return jax.value_and_grad(loss_fn, has_aux=True)(masker_params)

        (loss, aux), grads = loop.accumulate_gradients(loss_and_grad, state.params["masker"], batch, rng,
                                                       config.grad_accum_steps, config.get("mesh"))
        lr = lr_schedule(state.step)
        # masker_lr_scale (not in the official recipe, default 1) lets the module's step move faster than the MAE's.
        masker_lr = masker_schedule(state.step) * config.clmae.masker_lr_scale
        state = apply_update(tx, state, "masker", grads, masker_lr, config.clmae.freeze)
        measurements = {"masker_loss": loss, "masker_grad_norm": optax.tree.norm(grads),
                        "lambda_cl": lambda_curriculum, "learning_rate": lr, "masker_learning_rate": masker_lr,
                        **aux}
        return state.replace(step=state.step + 1), measurements

    return mae_step, masker_step


def difficulty(model: CLMAE, config, params, batch, rng) -> dict:
    """MAE loss on one batch under the learned mask and under a random mask of the same ratio.

    The ratio learned/random is the curriculum made visible: below 1 the module is a partner, above 1 an adversary.
    """
    images = data.normalize(batch["image"], config.input.mean, config.input.std)
    _, keep_prob = model.keep_probabilities(params, images)
    learned = model.learned_mask_loss(params["mae"], images, keep_prob)[0]
    random = random_masked_loss(model.mae, config, params["mae"], images, rng)[0]
    return {"mae_loss_learned_mask": learned, "mae_loss_random_mask": random, "difficulty": learned / random}


def summary(model: CLMAE, config, params, images):
    """(keep-probabilities, predicted patches, binary mask) for the summary pictures."""
    normalized = data.normalize(images, config.input.mean, config.input.std)
    _, keep_prob = model.keep_probabilities(params, normalized)
    _, (pred, mask) = model.learned_mask_loss(params["mae"], normalized, keep_prob)
    return keep_prob, pred, mask


def summary_grids(config, images, keep_prob, pred, mask) -> dict:
    """Pictures: inputs, keep-probability heat maps, learned masks and reconstructions, side by side."""
    heat = metrics.heat_map(keep_prob, images.shape[1], images.shape[-1])
    return {"keep_probability": metrics.image_grid([images / 255.0, heat], ("original", "keep probability")),
            "learned_mask_reconstruction": masking_columns(config, images, pred, mask)}


class CLMAEExperiment(Pretraining):
    """CL-MAE pretraining: per iteration an MAE step then a masking-module step on the same batch."""

    def __init__(self, config, mesh, budget):
        super().__init__(config, mesh, budget)
        self.model = CLMAE(config)
        self.lr, lr_schedule = budget.learning_rate()
        self.tx = half_optimizer(config)  # One per half, each with the same recipe and learning rate.
        mae_step, masker_step = make_steps(self.model, self.tx, lr_schedule, config,
                                           masker_lr_schedule(config, budget, lr_schedule))
        self.mae_step, self.masker_step = self.compile_step(mae_step), self.compile_step(masker_step)
        self.difficulty = jax.jit(functools.partial(difficulty, self.model, config))
        self.summary = jax.jit(functools.partial(summary, self.model, config))

    def init_state(self, rng):
        """Random parameters of both halves and fresh AdamW moments for each."""
        params = self.model.init(rng)
        opt_state = {name: self.tx.init(p) for name, p in params.items()}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

    def create_train_state(self):
        """Random weights, or those config.model.init_from names (official CL-MAE files give both halves)."""
        return warm_start.with_pretrained(super().create_train_state(), self.config)

    def describe(self, state) -> str:
        """Sizes of both halves, learning rate and freezing mode."""
        return (f"CL-MAE: MAE {tree_size(state.params['mae']) / 1e6:.1f}M + masking module "
                f"{tree_size(state.params['masker']) / 1e6:.1f}M parameters, lr {self.lr:.3g}, "
                f"freeze={self.config.clmae.freeze}")

    def train_step(self, state, batch, step: int):
        """The MAE step, then the masking-module step at this iteration's lambda_CL."""
        lambda_now = jnp.float32(curriculum_weight_at(self.config, self.budget, step - 1))
        state, mae_measured = self.mae_step(state, batch)
        state, masker_measured = self.masker_step(state, batch, lambda_now)
        return state, {**mae_measured, **masker_measured}

    def probe(self, state, batch, step: int) -> dict:
        """Learned- vs random-mask loss, before the update (the learned one equals the MAE step's loss)."""
        return self.difficulty(state.params, batch, jax.random.PRNGKey(step))

    def summaries(self, state, step: int) -> dict:
        """Keep-probability maps, learned masks and reconstructions of the fixed summary images."""
        keep_prob, pred, mask = self.summary(state.params, self.summary_images)
        return summary_grids(self.config, self.summary_images, keep_prob, pred, mask)

    def checkpoint_metadata(self, step: int) -> dict:
        """Where the curriculum stands, so a reader of the checkpoint knows the phase."""
        epoch, epochs = curriculum_position(self.config, self.budget, step)
        return {"curriculum_epoch": epoch, "curriculum_epochs": epochs,
                "lambda_cl": curriculum_weight_at(self.config, self.budget, min(step, self.budget.total_steps - 1))}

    def encoder_params(self, state):
        """The MAE half, which the evaluators read the encoder from."""
        return state.params["mae"]


def train_and_evaluate(config, workdir: str):
    """Trains CL-MAE as config says, resuming (mid-curriculum included) from the latest checkpoint in `workdir`."""
    return loop.train(config, workdir, CLMAEExperiment)[0]
