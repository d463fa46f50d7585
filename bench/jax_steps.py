"""The project's MAE step and CL-MAE iteration, built by the trainers' Experiment classes and compiled ahead of
time, so one compilation gives both XLA's cost / memory figures and the executable that is timed."""
import jax.numpy as jnp

from bench import harness
from clmae_jax import train_clmae, train_mae


def merge(stats: list) -> dict:
    """Figures of programs run one after the other: compile time and FLOPs add up, memory peaks do not."""
    return {"compile_seconds": sum(s["compile_seconds"] for s in stats),
            "xla_flops": sum(s["xla_flops"] for s in stats),
            **{k: max(s[k] for s in stats) for k in stats[0] if k.endswith("bytes_per_device")}}


def compile_mae(config, batch_spec=None, compiler_options=None):
    """(experiment, compiled step, stats) of the MAE update for a batch shaped as `batch_spec` (default: the
    config's random batch), compiled with XLA's `compiler_options`."""
    experiment = harness.build(train_mae.MAE, config)
    spec = batch_spec or harness.batch_spec(config, experiment.mesh)
    compiled, stats = harness.compile_stats(experiment.step_fn, experiment.abstract_state(), spec,
                                            compiler_options=compiler_options)
    return experiment, compiled, stats


def compile_clmae(config, batch_spec=None, compiler_options=None):
    """(experiment, (compiled MAE step, compiled module step, lambda_CL), stats) of the CL-MAE iteration, as
    `CLMAEExperiment.train_step` runs it (here at the first iteration's lambda_CL)."""
    experiment = harness.build(train_clmae.CLMAEExperiment, config)
    spec = batch_spec or harness.batch_spec(config, experiment.mesh)
    lambda_now = jnp.float32(train_clmae.curriculum_weight_at(config, experiment.budget, 0))
    state = experiment.abstract_state()
    first, first_stats = harness.compile_stats(experiment.mae_step, state, spec, compiler_options=compiler_options)
    second, second_stats = harness.compile_stats(experiment.masker_step, state, spec, lambda_now,
                                                 compiler_options=compiler_options)
    return experiment, (first, second, lambda_now), merge([first_stats, second_stats])


def mae_update(compiled, batch):
    """state -> state: the compiled MAE step on a fixed batch."""
    return lambda state: compiled(state, batch)[0]


def clmae_iteration(programs, batch):
    """state -> state: the compiled CL-MAE iteration (MAE step, then module step) on a fixed batch."""
    first, second, lambda_now = programs
    return lambda state: second(first(state, batch)[0], batch, lambda_now)[0]


def mae(config):
    """(experiment, step: state -> state, stats) of the MAE update on a random batch."""
    experiment, compiled, stats = compile_mae(config)
    return experiment, mae_update(compiled, harness.random_batch(config, experiment.mesh)), stats


def clmae(config):
    """(experiment, iteration: state -> state, stats) of CL-MAE: the MAE step then the masking-module step."""
    experiment, programs, stats = compile_clmae(config)
    return experiment, clmae_iteration(programs, harness.random_batch(config, experiment.mesh)), stats


def runner(built, steps: int):
    """A timing runner (see harness.alternate) over a fresh train state of `built = (experiment, step, stats)`."""
    experiment, step, _ = built
    return harness.timed(harness.threaded(step, experiment.create_train_state()), steps)
