"""MAE pretraining (He et al., 2021): random masking, one jitted update step over the device mesh."""
import jax
import jax.numpy as jnp
import optax

from clmae_jax import warm_start
from clmae_jax.models.clmae import build_mae, init_params, random_masked_loss
from clmae_jax.pictures import masking_columns
from clmae_jax.pretraining import Pretraining
from clmae_jax.runtime import data, loop, optim
from clmae_jax.runtime.state import TrainState, tree_size


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
                                                     config.grad_accum_steps, config.get("mesh"))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        measurements = {"loss": loss, "learning_rate": lr_schedule(state.step), **loop.norms(grads, params, updates)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), measurements

    return train_step


def reconstruct(model, config, params, images, rng):
    """(predicted patches, mask) for uint8 `images` under random masking: what the summaries show."""
    normalized = data.normalize(images, config.input.mean, config.input.std)
    return random_masked_loss(model, config, params, normalized, rng)[1]


class MAE(Pretraining):
    """MAE pretraining: AdamW on the MAE, random masking drawn from (seed, step)."""

    def __init__(self, config, mesh, budget):
        super().__init__(config, mesh, budget)
        self.model = build_mae(config)
        self.lr, lr_schedule = budget.learning_rate()
        self.tx = optim.make_optimizer(config.optimizer, lr_schedule)
        self.step_fn = self.compile_step(make_train_step(self.model, self.tx, lr_schedule, config))
        self.reconstruct = jax.jit(lambda params, images, rng: reconstruct(self.model, config, params, images, rng))

    def init_state(self, rng):
        """Random MAE parameters and fresh AdamW moments."""
        params = init_params(self.model, self.config, rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def create_train_state(self):
        """Random weights, or those config.model.init_from names (an MAE / CL-MAE run or PyTorch file)."""
        return warm_start.with_pretrained(super().create_train_state(), self.config)

    def describe(self, state) -> str:
        """Model size and learning rate."""
        return f"MAE with {tree_size(state.params) / 1e6:.1f}M parameters, lr {self.lr:.3g}"

    def train_step(self, state, batch, step: int):
        """One MAE update."""
        return self.step_fn(state, batch)

    def summaries(self, state, step: int) -> dict:
        """Inputs, random masks and reconstructions of the fixed summary images."""
        pred, mask = self.reconstruct(state.params, self.summary_images, jax.random.PRNGKey(step))
        return {"reconstruction": masking_columns(self.config, self.summary_images, pred, mask)}

    def encoder_params(self, state):
        """The MAE parameters the evaluators read the encoder from."""
        return state.params


def train_and_evaluate(config, workdir: str):
    """Trains an MAE as config says, resuming from the latest checkpoint in `workdir`."""
    return loop.train(config, workdir, MAE)[0]
