"""What the training loop asks of an experiment (MAE, CL-MAE, CBM supervised, fine-tuning).

An experiment builds its model, optimizer and compiled update step(s) from the config; the loop in
`runtime/loop.py` owns everything around them. Benchmarks and tests build states and steps through the same
class, so the numbers they measure are the numbers a run trains with.
"""
import functools

import jax

from clmae_jax.runtime import loop, mesh as mesh_lib
from clmae_jax.runtime.errors import UserError
from clmae_jax.runtime.state import state_sharding


class Experiment:
    """Base class: subclasses define `init_state` and `train_step`; the other hooks are optional."""

    summary_split = None  # Which split the summary pictures come from (None: the eval split).

    def __init__(self, config, mesh, budget: "loop.Budget"):
        # The same devices laid out as config.mesh asks ((data, fsdp) axes): the loop's batches, split over all
        # devices in jax.devices() order, need no move, and a checkpoint restores into whichever layout this is.
        self.mesh = mesh_lib.make_mesh(config.get("mesh"), mesh.devices)
        self.config, self.budget = config, budget
        self.replicated = mesh_lib.replicated(self.mesh)

    def init_state(self, rng):
        """The step-0 TrainState from a PRNG key (pure, traced under jit)."""
        raise NotImplementedError

    def train_step(self, state, batch, step: int):
        """One training iteration ending at `step` (1-based): -> (state, measurements)."""
        raise NotImplementedError

    def describe(self, state) -> str:
        """One log line about the model (sizes, learning rate)."""
        return type(self).__name__

    @functools.cached_property
    def state_sharding(self):
        """Where each leaf of the train state lives on the mesh."""
        abstract = jax.eval_shape(self.init_state, jax.random.PRNGKey(0))
        return state_sharding(self.mesh, abstract, self.config.get("mesh"))

    def abstract_state(self):
        """Shapes, dtypes and shardings of the train state: the template a checkpoint restores into."""
        abstract = jax.eval_shape(self.init_state, jax.random.PRNGKey(0))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self.state_sharding)

    def create_train_state(self):
        """The step-0 state of a fresh run, born on the devices in its sharding."""
        return jax.jit(self.init_state, out_shardings=self.state_sharding)(jax.random.PRNGKey(self.config.seed))

    def compile_step(self, step_fn, static_argnums=()):
        """jit of an update step `(state, batch, ...) -> (state, measurements)`: state donated and kept in its
        sharding; with config.nonfinite='skip' a non-finite update is dropped (see loop.skip_nonfinite)."""
        if self.config.nonfinite == "skip":
            step_fn = loop.skip_nonfinite(step_fn)
        return jax.jit(mesh_lib.traced_under(self.mesh, step_fn), donate_argnums=0, static_argnums=static_argnums,
                       out_shardings=(self.state_sharding, self.replicated))

    @functools.cached_property
    def summary_images(self):
        """The fixed uint8 images the summary pictures show."""
        return loop.fixed_batch(self.config, self.config.num_summary_images, self.summary_split)

    def probe(self, state, batch, step: int) -> dict:
        """Extra measurements taken before the update on logging steps."""
        return {}

    def summaries(self, state, step: int) -> dict:
        """Named image grids to write at `step`."""
        return {}

    @functools.cached_property
    def evaluators(self) -> list:
        """Evaluators of config.evals: objects with `every_steps`, `best_key` and `run(state) -> scalars`."""
        return [self.make_evaluator(name, c) for name, c in sorted(self.config.evals.items())]

    def make_evaluator(self, name: str, eval_config):
        """The evaluator config.evals.<name> asks for; subclasses that evaluate define it."""
        raise UserError(f"{type(self).__name__} runs no evaluators; remove config.evals.{name}.")

    def eval_scalars(self, step: int) -> dict:
        """Scalars written next to evaluation results (e.g. the masking ratio of the epoch)."""
        return {}

    def checkpoint_metadata(self, step: int) -> dict:
        """JSON-able facts saved with the checkpoint at `step`."""
        return {}

