"""FSDP and ZeRO-1 (sharded TrainState) against replicated data parallelism on 8 fake CPU devices: the same losses
and parameters for the MAE step and both CL-MAE steps, checkpoints that restore into any layout, and gradient
accumulation whose micro-batches stay spread over all devices.

The 8-device work runs once, in a subprocess (XLA's device count is fixed at start-up), and reports numbers; the
tests assert on them.
"""
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
LAYOUTS = {"replicated": {"data": -1, "fsdp": 1}, "fsdp8": {"data": 1, "fsdp": 8}, "data2_fsdp4": {"data": 2, "fsdp": 4},
           "zero1": {"data": -1, "fsdp": 1, "shard_optimizer": True}}
CHECKPOINT_LAYOUTS = ("replicated", "fsdp8", "zero1")
MIN_SHARD_SIZE = 1024  # Small enough that the test models' matrices are sharded.


def config_for(name: str, layout: str, accum: int = 1):
    """The Fashion-MNIST test config of `name` ('mae' or 'clmae') on mesh `layout`."""
    import ml_collections
    from configs import clmae_fashion_mnist, mae_fashion_mnist
    config = (mae_fashion_mnist if name == "mae" else clmae_fashion_mnist).get_config("smoke")
    config.mesh = ml_collections.ConfigDict({**LAYOUTS[layout], "min_shard_size": MIN_SHARD_SIZE})
    # Adam turns the rounding noise of gradients that are zero in exact arithmetic (the attention key bias) into
    # steps of about +-lr; a small lr keeps those within the 1e-5 bound, while the Adam moments and the losses
    # still compare every gradient at 1e-5.
    config.optimizer.lr, config.optimizer.schedule = 2e-6, "constant"
    config.grad_accum_steps = accum
    return config


@functools.cache
def experiment_for(name: str, layout: str, accum: int = 1):
    """The trainer's own Experiment class on this process's devices (one per case: its steps compile once)."""
    from clmae_jax import train_clmae, train_mae
    from clmae_jax.runtime import loop, mesh as mesh_lib
    config = config_for(name, layout, accum)
    cls = train_mae.MAE if name == "mae" else train_clmae.CLMAEExperiment
    return cls(config, mesh_lib.make_mesh(), loop.Budget(config, 100, 100))


def global_batch(batch_size: int):
    """Random uint8 Fashion-MNIST-shaped images, split over all devices as the loop's input pipeline splits them."""
    from clmae_jax.runtime import mesh as mesh_lib
    images = np.random.default_rng(0).integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8)
    return mesh_lib.to_global({"image": images}, mesh_lib.make_mesh())


def max_diff(a, b) -> float:
    """Largest absolute difference between two pytrees of arrays."""
    import jax
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def largest_shard_fraction(state) -> float:
    """Per-device share of the largest parameter: 1 when replicated, 1/8 when split 8 ways."""
    import jax
    leaf = max(jax.tree.leaves(state.params), key=lambda x: x.size)
    return leaf.addressable_shards[0].data.size / leaf.size


def run_steps(experiment, batch, iterations: int = 2):
    """Per-iteration measurements (CL-MAE: each step's separately) and the final state, fetched to the host."""
    import jax
    import jax.numpy as jnp
    state, history = experiment.create_train_state(), []
    for _ in range(iterations):
        if hasattr(experiment, "masker_step"):
            state, mae_measured = experiment.mae_step(state, batch)
            history.append({"mae_params": jax.device_get(state.params["mae"]), **mae_measured})
            state, measured = experiment.masker_step(state, batch, jnp.float32(0.5))
        else:
            state, measured = experiment.step_fn(state, batch)
        history.append(measured)
    return jax.device_get(history), jax.device_get(state), largest_shard_fraction(state)


def compare_layouts(name: str, layouts) -> dict:
    """Max differences of `layouts` against the replicated one, and how much of a parameter each device holds."""
    batch = global_batch(16)
    runs = {layout: run_steps(experiment_for(name, layout), batch) for layout in ("replicated", *layouts)}
    reference_history, reference_state, _ = runs["replicated"]
    return {layout: {"history": max_diff(history, reference_history), "state": max_diff(state, reference_state),
                     "shard_fraction": fraction} for layout, (history, state, fraction) in runs.items()}


def checkpoint_round_trips() -> dict:
    """Max difference of a CL-MAE state saved in one layout and restored into another, for every pair."""
    import jax
    from clmae_jax.runtime import checkpoint
    experiments = {layout: experiment_for("clmae", layout) for layout in CHECKPOINT_LAYOUTS}
    batch, result = global_batch(16), {}
    for saved_layout, saver in experiments.items():
        state, _ = saver.mae_step(saver.create_train_state(), batch)
        with tempfile.TemporaryDirectory() as workdir:
            checkpointer = checkpoint.Checkpointer(workdir)
            checkpointer.save(1, state, {"step": 1})
            checkpointer.close()
            for restored_layout, restorer in experiments.items():
                restored, _ = checkpoint.Checkpointer(workdir).restore(restorer.abstract_state())
                same_layout = jax.tree.leaves(restored)[-1].sharding == jax.tree.leaves(restorer.state_sharding)[-1]
                result[f"{saved_layout}->{restored_layout}"] = {
                    "diff": max_diff(jax.device_get(restored), jax.device_get(state)),
                    "sharding_as_template": bool(same_layout)}
    return result


def accumulation_batch_dims() -> list:
    """Per-device batch size of the forward patch embedding (a matmul over 7 x 7 = 49 patches per image) in the
    compiled MAE step with 4 micro-batches of 64 images: 64 / 4 / 8 = 2 when each micro-batch is spread over all 8
    devices."""
    experiment = experiment_for("mae", "fsdp8", accum=4)
    compiled = experiment.step_fn.lower(experiment.abstract_state(), global_batch(64)).compile()
    dims = []
    for line in compiled.as_text().splitlines():
        op = re.search(r'op_name="([^"]*patch_embed/proj/dot_general)"', line)
        result = re.search(r"= f32\[([\d,]+)\]\{[^}]*\} dot\(", line)
        if op and result and "transpose(" not in op.group(1):  # The backward pass's are weight / input gradients.
            dims.append(math.prod(map(int, result.group(1).split(",")[:-1])) // 49)  # [batch (* 49), (49,) width]
    return dims


def main():
    """Runs every 8-device measurement and prints them as one JSON line."""
    import jax
    assert jax.device_count() == DEVICES, jax.devices()
    # The 2-D (data, fsdp) mesh is checked on the MAE step only: CL-MAE's steps shard the same way.
    print(json.dumps({"mae": compare_layouts("mae", ("fsdp8", "data2_fsdp4", "zero1")),
                      "clmae": compare_layouts("clmae", ("fsdp8", "zero1")),
                      "checkpoints": checkpoint_round_trips(), "accumulation": accumulation_batch_dims()}))


@pytest.fixture(scope="module")
def measured():
    """The numbers of `main()` on 8 fake CPU devices."""
    from conftest import cpu_env  # Not at the top: this file also runs as the subprocess, without pytest.
    # -O0: these programs are tiny and run a step or two; compiling the many layouts is what takes the time.
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=cpu_env(DEVICES, optimization=0),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mae", "clmae"])
def test_fsdp_matches_replicated(measured, name):
    for layout, result in measured[name].items():
        assert result["history"] < 1e-5 and result["state"] < 1e-5, (layout, result)
    assert measured[name]["replicated"]["shard_fraction"] == 1.0
    assert measured[name]["fsdp8"]["shard_fraction"] == pytest.approx(1 / 8)
    assert measured[name]["zero1"]["shard_fraction"] == pytest.approx(1 / 8)  # Every device updates 1/8 of it.
    if name == "mae":
        assert measured[name]["data2_fsdp4"]["shard_fraction"] == pytest.approx(1 / 4)


@pytest.mark.slow
def test_checkpoints_restore_into_either_layout(measured):
    assert set(measured["checkpoints"]) == {f"{a}->{b}" for a in CHECKPOINT_LAYOUTS for b in CHECKPOINT_LAYOUTS}
    for pair, result in measured["checkpoints"].items():
        assert result["diff"] == 0.0 and result["sharding_as_template"], (pair, result)


@pytest.mark.slow
def test_accumulated_micro_batches_stay_spread_over_all_devices(measured):
    dims = measured["accumulation"]
    assert dims and set(dims) == {64 // 4 // DEVICES}, dims


if __name__ == "__main__":
    main()  # The subprocess: its environment (conftest.cpu_env) puts the repository root on PYTHONPATH.
