"""The one training loop of the library, and the pieces every experiment's update step shares.

`train(config, workdir, Experiment)` runs MAE, CL-MAE and CBM alike (as big_vision's train loop): one scheduler
for logging, pictures, evaluators and checkpoints; a non-finite guard on every step that is checked before every
log and every save; progress with steps/s and ETA; resume from the latest checkpoint.
"""
import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from clmae_jax.runtime import checkpoint, data, mesh as mesh_lib, metrics, optim, preemption, run_config
from clmae_jax.runtime import state as state_lib
from clmae_jax.runtime.errors import UserError, check_choice

NONFINITE_MODES = ("stop", "skip")


def step_budget(config, num_train_examples: int) -> tuple[int, int]:
    """(steps per epoch, total steps): config.total_steps when positive, else epochs x steps per epoch."""
    steps_per_epoch = num_train_examples // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"config.batch_size={config.batch_size} exceeds the {num_train_examples} training examples.")
    total = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
    return steps_per_epoch, total


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long a run is and what it learns from: all an experiment needs to know besides its config and mesh."""

    config: object
    steps_per_epoch: int
    total_steps: int
    num_classes: int = 0

    def epoch(self, step: int) -> int:
        """0-based epoch of a step."""
        return step // self.steps_per_epoch

    @property
    def num_epochs(self) -> int:
        """Epochs started by the run, the last one possibly partial."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def learning_rate(self) -> tuple[float, object]:
        """(peak learning rate, per-step schedule) of config.optimizer for this batch and budget."""
        peak = optim.learning_rate(self.config.optimizer, self.config.batch_size)
        return peak, optim.schedule(self.config.optimizer, peak, self.steps_per_epoch, self.total_steps)


def accumulate_gradients(loss_and_grad, params, batch: dict, rng, accum_steps: int, mesh_config=None):
    """Averages (loss, aux), grads over `accum_steps` equal micro-batches, so a small machine keeps a large batch.

    `loss_and_grad(params, micro_batch, rng) -> ((loss, aux), grads)`; with accum_steps == 1 it is called once.
    When config.mesh (`mesh_config`) splits the train state, it runs on the gathered parameters (mesh.gathered) and
    the gradients come back split as the state's parameters (state.like_state): reduce-scattered, not all-reduced.
    """
    (loss, aux), grads = _accumulate(loss_and_grad, mesh_lib.gathered(params), batch, rng, accum_steps)
    return (loss, aux), state_lib.like_state(grads, mesh_config)


def _accumulate(loss_and_grad, params, batch: dict, rng, accum_steps: int):
    if accum_steps == 1:
        return loss_and_grad(params, batch, rng)
    mesh_lib.check_batch_split(jax.tree.leaves(batch)[0].shape[0], accum_steps)
    # Strided micro-batches (rows i, i + steps, ...): each device holds a contiguous block of the sharded batch, so
    # every micro-batch keeps a share of every device's rows and all devices work in every accumulation step.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1),
                         batch)

    def body(carry, inputs):
        index, micro_batch = inputs
        out = loss_and_grad(params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, out), None

    shapes = jax.eval_shape(loss_and_grad, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(jnp.zeros_like, shapes)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
    return jax.tree.map(lambda x: x / accum_steps, total)


def norms(grads, params, updates) -> dict:
    """Global L2 norms that tell a healthy run from a diverging one."""
    return {"grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates)}


def all_finite(tree):
    """True (a device scalar) when every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def skip_nonfinite(step_fn):
    """Wraps `step_fn(state, ...) -> (state, measurements)` to drop an update whose measurements or parameters are
    not finite: the step counter moves on, parameters and optimizer state stay; `skipped_update` is 1 then."""
    # Not optax.apply_if_finite: that guards one optimizer's updates and adds counters to its state (another
    # checkpoint layout); this guards a whole step (both CL-MAE halves, the loss, the new parameters).

    def guarded(state, *args):
        new_state, measurements = step_fn(state, *args)
        ok = all_finite(measurements) & all_finite(new_state.params)
        kept = state.replace(step=new_state.step)
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, kept)
        return new_state, {**measurements, "skipped_update": 1.0 - ok.astype(jnp.float32)}

    return guarded


@jax.jit
def _update_health(health, step, measurements, params):
    # A finite global norm means finite parameters: where the step measured it, the parameters are not read again.
    params_finite = jnp.isfinite(measurements["param_norm"]) if "param_norm" in measurements else all_finite(params)
    finite = {**{k: jnp.all(jnp.isfinite(v)) for k, v in measurements.items()}, "params": params_finite}
    first = {k: jnp.where((health["first"][k] < 0) & ~ok, step, health["first"][k]) for k, ok in finite.items()}
    return {"first": first, "skipped": health["skipped"] + measurements.get("skipped_update", 0.0)}


class Health:
    """On-device record of the first step at which each measurement (and the parameters) went non-finite.

    Updated after every step without a host sync; `check` reads it back, and runs before every log and save, so
    a non-finite state is never logged as healthy or checkpointed. In "skip" mode only the parameters count:
    non-finite updates were already dropped (see `skip_nonfinite`) and are counted.
    """

    def __init__(self, mode: str):
        self.mode, self.state = check_choice("nonfinite", mode, NONFINITE_MODES), None

    def update(self, step: int, measurements: dict, params):
        """Folds one step's measurements and parameters into the record (asynchronous)."""
        if self.state is None:
            keys = [*measurements, "params"]
            self.state = {"first": {k: jnp.int32(-1) for k in keys}, "skipped": jnp.float32(0)}
        self.state = _update_health(self.state, jnp.int32(step), measurements, params)

    def check(self, saved_step: int | None):
        """Raises FloatingPointError naming the first non-finite step and what went non-finite (and `saved_step`,
        the newest checkpoint, which holds none of it)."""
        if self.state is None:
            return
        first = {k: int(v) for k, v in jax.device_get(self.state["first"]).items()
                 if self.mode == "stop" or k == "params"}
        bad = {k: s for k, s in first.items() if s >= 0}
        if bad:
            step = min(bad.values())
            names = ", ".join(sorted(k for k, s in bad.items() if s == step))
            kept = "No checkpoint was saved" if saved_step is None else f"Checkpoint step {saved_step} is untouched"
            raise FloatingPointError(
                f"Non-finite {names} at step {step}; lower the learning rate, use float32 compute, or set "
                f"config.nonfinite='skip'. {kept}.")

    def skipped(self) -> float:
        """Number of updates dropped so far by the 'skip' mode."""
        return float(self.state["skipped"]) if self.state is not None else 0.0


def itstime(step: int, every: int, last: int) -> bool:
    """True every `every` steps (0 = never) and at the last step."""
    return (every > 0 and step % every == 0) or step == last


class StepTimer:
    """Seconds per step since the previous call (the first interval includes compilation)."""

    # clu's ReportProgress (metrics.progress) writes steps/s; images/s per device, which throughput tables compare
    # across batch sizes and meshes, needs the loop's own interval next to the batch size.

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
    """What the loop needs around the update step: mesh, input, budget, writer and checkpoints."""

    config: object
    workdir: str
    mesh: object
    source: data.Source
    budget: Budget
    checkpointer: checkpoint.Checkpointer

    @classmethod
    def create(cls, config, workdir: str):
        """Mesh, training source and step budget, writer and checkpointer for `config`."""
        mesh = mesh_lib.make_mesh(config.get("mesh"))
        mesh_lib.local_batch_size(config.batch_size)
        source = data.load_source(config.input, config.input.train_split)
        budget = Budget(config, *step_budget(config, source.num_examples), source.num_classes)
        logging.info("%d examples, %d steps/epoch, %d steps; batch %d global, %d per process, %d per device",
                     source.num_examples, budget.steps_per_epoch, budget.total_steps, config.batch_size,
                     config.batch_size // jax.process_count(), config.batch_size // jax.device_count())
        return cls(config, workdir, mesh, source, budget, checkpoint.Checkpointer(workdir, config.keep_checkpoints))

    @functools.cached_property
    def writer(self):
        """The metrics writer, created at its first use: after the restore, so a refused resume writes nothing."""
        return metrics.create_writer(self.workdir)

    def restore_or(self, experiment) -> tuple[object, dict]:
        """(state, metadata) of the latest checkpoint in the workdir, or a fresh state and {}."""
        if self.checkpointer.latest_step() is None:
            return experiment.create_train_state(), {}
        return self.checkpointer.restore(experiment.abstract_state())

    def batches(self, start_step: int):
        """Global training batches on the mesh, starting at `start_step` of the deterministic stream."""
        local = mesh_lib.local_batch_size(self.config.batch_size)
        iterator = data.train_iterator(self.config.input, self.source, local, self.config.seed, start_step)
        return mesh_lib.prefetch_to_mesh(iterator, self.mesh)

    def last_step(self) -> int:
        """Where this invocation stops: the end of training, or earlier when config.stop_after_steps asks."""
        stop = self.config.stop_after_steps
        total = self.budget.total_steps
        return min(total, stop) if stop > 0 else total

    def log(self, step: int, measurements: dict, seconds_per_step: float | None = None):
        """Writes scalars, plus images/s."""
        scalars = metrics.to_host(measurements)
        if seconds_per_step:
            scalars["images_per_sec"] = self.config.batch_size / seconds_per_step
            scalars["images_per_sec_per_device"] = scalars["images_per_sec"] / jax.device_count()
        self.writer.write_scalars(step, scalars)

    def close(self):
        """Flushes writers and waits for pending checkpoints."""
        if "writer" in self.__dict__:
            self.writer.flush()
        self.checkpointer.close()

    def save(self, experiment, health, step: int, state, results: dict):
        """Checks the run is finite, then checkpoints `step` (in the background) with its metadata and config."""
        health.check(self.checkpointer.latest_step())
        metadata = {"step": step, "epoch": self.budget.epoch(step), "results": results,
                    "config": run_config.as_dict(self.config), **experiment.checkpoint_metadata(step)}
        self.checkpointer.save(step, state, metadata)

    def stop_if_preempted(self, watch, experiment, health, step: int, state, results: dict, saved: bool):
        """After a signal: saves `step` unless just saved, waits for it to be committed, raises Preempted."""
        if not watch.reached(step):
            return
        watch.hold()  # A second signal must not cut the save short.
        if not saved:
            self.save(experiment, health, step, state, results)
        self.checkpointer.finish()
        raise preemption.Preempted(step, self.checkpointer.directory, watch.signal_name)


def record(results: dict, scalars: dict, best_key: str, step: int, epoch: int) -> dict:
    """results.json after an evaluation: final value of every scalar, best value (and its epoch) of `best_key`."""
    results = {**results, **{f"final_{k}": v for k, v in scalars.items()}, "final_epoch": epoch, "step": step}
    if best_key in scalars and scalars[best_key] > results.get(f"best_{best_key}", -math.inf):
        results.update({f"best_{best_key}": scalars[best_key], "best_epoch": epoch})
    return results


def run_evaluators(run, experiment, state, step: int, results: dict) -> dict:
    """Runs the evaluators due at `step`; writes their scalars to TensorBoard and results.json."""
    total, epoch = run.budget.total_steps, run.budget.epoch(step - 1) + 1
    for evaluator in experiment.evaluators:
        every = evaluator.every_steps or run.budget.steps_per_epoch  # 0: once per epoch.
        if not itstime(step, every, total):  # `total`, not a preemption stop: a resumed run evaluates the same.
            continue
        scalars = evaluator.run(state)
        results = record(results, scalars, evaluator.best_key, step, epoch)
        best = {f"best_{evaluator.best_key}": results[f"best_{evaluator.best_key}"]}
        run.writer.write_scalars(step, {**scalars, **best, "epoch": epoch, **experiment.eval_scalars(step)})
        logging.info("step %d (epoch %d): %s", step, epoch, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        metrics.write_json(run.workdir, "results.json", results)
    return results


def train(config, workdir: str, experiment_cls):
    """Trains `experiment_cls(config, mesh, budget)` as config says, resuming from the latest checkpoint."""
    run = Run.create(config, workdir)
    experiment = experiment_cls(config, run.mesh, run.budget)
    state, metadata = run.restore_or(experiment)
    results, start = metadata.get("results", {}), int(state.step)
    if start >= run.budget.total_steps:
        logging.warning("%s holds step %d of a run of %d steps: nothing to train%s", run.checkpointer.directory,
                        start, run.budget.total_steps, "" if start == run.budget.total_steps else
                        "; raise config.total_steps (or config.num_epochs) to train on")
        run.close()
        return state, results
    run_config.record(config, workdir, start)  # Only now: the checkpoint was found to be this config's.
    logging.info("%s; starting at step %d of %d", experiment.describe(state), start, run.budget.total_steps)

    health, last = Health(config.nonfinite), run.last_step()
    progress, timer = metrics.progress(run.budget.total_steps, run.writer, config.log_every_steps), StepTimer(start)
    # Held by name: the unwinding of a preemption must not destroy the tf.data iterator (tens of seconds at times,
    # past a preemption's grace period); main.py exits without tearing it down.
    batches = run.batches(start)
    with preemption.Watch() as watch:
        try:
            for step, batch in zip(range(start + 1, last + 1), batches):
                logging_step = itstime(step, config.log_every_steps, last)
                probed = experiment.probe(state, batch, step) if logging_step else {}
                state, measurements = experiment.train_step(state, batch, step)
                health.update(step, measurements, state.params)
                progress(step)
                if logging_step:
                    health.check(run.checkpointer.latest_step())
                    skipped = {"skipped_updates": health.skipped()} if health.mode == "skip" else {}
                    run.log(step, {**probed, **measurements, **skipped}, timer.seconds_per_step(step))
                if itstime(step, config.image_every_steps, last):
                    metrics.write_images(run.writer, workdir, step, experiment.summaries(state, step))
                results = run_evaluators(run, experiment, state, step, results)
                saved = itstime(step, config.checkpoint_every_steps, last)
                if saved:
                    run.save(experiment, health, step, state, results)
                run.stop_if_preempted(watch, experiment, health, step, state, results, saved)
        finally:  # Also on an error or a signal: a checkpoint still being written is finished, never left half done.
            run.close()
    return state, results


def fixed_batch(config, num: int, split: str | None = None) -> np.ndarray:
    """The first `num` images of `split` (default: the eval split), un-augmented: the same pictures every time."""
    source = data.load_source(config.input, split or config.input.eval_split)
    iterator, _ = data.eval_iterator(config.input, source, num)
    return next(iterator)["image"]
