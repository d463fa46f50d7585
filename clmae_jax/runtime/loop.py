"""Pieces every training loop shares: step budgets, gradient accumulation, the per-run context of writers,
progress and checkpoints, and the guard against non-finite losses."""
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from clmae_jax.runtime import checkpoint, data, mesh as mesh_lib, metrics, optim
from clmae_jax.runtime.errors import UserError


def step_budget(config, num_train_examples: int) -> tuple[int, int]:
    """(steps per epoch, total steps): config.total_steps when positive, else epochs x steps per epoch."""
    steps_per_epoch = num_train_examples // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"config.batch_size={config.batch_size} exceeds the {num_train_examples} training examples.")
    total = config.total_steps if config.get("total_steps", 0) > 0 else config.num_epochs * steps_per_epoch
    return steps_per_epoch, total


def accumulate_gradients(loss_and_grad, params, batch: dict, rng, accum_steps: int):
    """Averages (loss, aux), grads over `accum_steps` equal micro-batches, so a small machine keeps a large batch.

    `loss_and_grad(params, micro_batch, rng) -> ((loss, aux), grads)`; with accum_steps == 1 it is called once.
    """
    if accum_steps == 1:
        return loss_and_grad(params, batch, rng)
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    if batch_size % accum_steps:
        raise UserError(f"The batch of {batch_size} does not split into config.grad_accum_steps={accum_steps} "
                        "equal micro-batches; choose a divisor.")
    micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

    def body(carry, inputs):
        index, micro_batch = inputs
        out = loss_and_grad(params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, out), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(loss_and_grad, params, jax.tree.map(lambda x: x[0], micro), rng))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
    return jax.tree.map(lambda x: x / accum_steps, total)


def norms(grads, params, updates) -> dict:
    """Global L2 norms that tell a healthy run from a diverging one."""
    return {"grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates)}


def check_finite(measurements: dict, step: int):
    """Stops the run on a non-finite loss before anything is checkpointed."""
    bad = [k for k, v in measurements.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"Non-finite {', '.join(bad)} at step {step}; lower the learning rate or use "
                                 "float32 compute. The last checkpoint is untouched.")


class StepTimer:
    """Seconds per step since the previous call (the first interval includes compilation)."""

    def __init__(self, step: int):
        self.step, self.time = step, time.time()

    def seconds_per_step(self, step: int) -> float:
        """Average wall time of the steps since the last call."""
        now = time.time()
        seconds = (now - self.time) / max(step - self.step, 1)
        self.step, self.time = step, now
        return seconds


@dataclasses.dataclass
class Run:
    """What a training loop needs around its update step: mesh, input, writers, progress and checkpoints."""

    config: object
    workdir: str
    mesh: object
    source: data.Source
    steps_per_epoch: int
    total_steps: int
    writer: object
    checkpointer: checkpoint.Checkpointer

    @classmethod
    def create(cls, config, workdir: str):
        """Mesh, training source and step budget, writer and checkpointer for `config`."""
        mesh = mesh_lib.make_mesh()
        mesh_lib.local_batch_size(config.batch_size)
        source = data.load_source(config.input, config.input.train_split)
        steps_per_epoch, total_steps = step_budget(config, source.num_examples)
        logging.info("%d examples, %d steps/epoch, %d steps; batch %d global, %d per process, %d per device",
                     source.num_examples, steps_per_epoch, total_steps, config.batch_size,
                     config.batch_size // jax.process_count(), config.batch_size // jax.device_count())
        return cls(config, workdir, mesh, source, steps_per_epoch, total_steps, metrics.create_writer(workdir),
                   checkpoint.Checkpointer(workdir, config.keep_checkpoints))

    def learning_rate(self) -> tuple[float, object]:
        """(peak learning rate, per-step schedule) of config.optimizer for this run's batch and budget."""
        peak = optim.learning_rate(self.config.optimizer, self.config.batch_size)
        return peak, optim.schedule(self.config.optimizer, peak, self.steps_per_epoch, self.total_steps)

    def restore_or(self, state):
        """The latest checkpointed state in the workdir, or `state` when there is none."""
        return self.restore_with_metadata_or(state)[0]

    def restore_with_metadata_or(self, state) -> tuple[object, dict]:
        """(state, metadata) of the latest checkpoint in the workdir, or (`state`, {}) when there is none."""
        if self.checkpointer.latest_step() is None:
            return state, {}
        return self.checkpointer.restore(state)

    def batches(self, start_step: int):
        """Global training batches on the mesh, starting at `start_step` of the deterministic stream."""
        local = mesh_lib.local_batch_size(self.config.batch_size)
        iterator = data.train_iterator(self.config.input, self.source, local, self.config.seed, start_step)
        return mesh_lib.prefetch_to_mesh(iterator, self.mesh)

    def last_step(self) -> int:
        """Where this invocation stops: the end of training, or earlier when config.stop_after_steps asks."""
        stop = self.config.get("stop_after_steps", 0)
        return min(self.total_steps, stop) if stop > 0 else self.total_steps

    def progress(self):
        """A clu ReportProgress hook for this run."""
        return metrics.progress(self.total_steps, self.writer, self.config.log_every_steps)

    def log(self, step: int, measurements: dict, seconds_per_step: float | None = None):
        """Writes scalars (plus images/s) after checking they are finite."""
        scalars = metrics.to_host(measurements)
        check_finite(scalars, step)
        if seconds_per_step:
            scalars["images_per_sec"] = self.config.batch_size / seconds_per_step
            scalars["images_per_sec_per_device"] = scalars["images_per_sec"] / jax.device_count()
        self.writer.write_scalars(step, scalars)

    def save(self, step: int, state, **metadata):
        """Checkpoints `state` at `step` with JSON metadata (the step and epoch always included)."""
        self.checkpointer.save(step, state, {"step": step, "epoch": step // self.steps_per_epoch, **metadata})

    def epoch(self, step: int) -> int:
        """0-based epoch of a step."""
        return step // self.steps_per_epoch

    def close(self):
        """Flushes writers and waits for pending checkpoints."""
        self.writer.flush()
        self.checkpointer.close()


def fixed_batch(config, num: int, split: str | None = None) -> np.ndarray:
    """The first `num` images of `split` (default: the eval split), un-augmented: the same pictures every time."""
    source = data.load_source(config.input, split or config.input.eval_split)
    iterator, _ = data.eval_iterator(config.input, source, num)
    return next(iterator)["image"]
