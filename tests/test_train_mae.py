"""MAE training end to end through main.py on real Fashion-MNIST: device-count invariance, exact resume,
learning, multi-process (MAE and CBM), and the errors a user sees."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, assert_trees_close, cpu_env, load_params, run_main, train

CONFIG = "mae_fashion_mnist.py:test"


@pytest.mark.slow
def test_same_loss_and_params_on_1_and_8_devices(tmp_path, scalars):
    runs = {devices: str(tmp_path / f"d{devices}") for devices in (1, 8)}
    train(runs[1], CONFIG, total_steps=2, log_every_steps=1)  # This process has one device.
    run_main(runs[8], CONFIG, "--config.total_steps=2", "--config.log_every_steps=1", devices=8)
    loss1, loss8 = scalars(runs[1], "loss"), scalars(runs[8], "loss")
    assert sorted(loss1) == [1, 2]
    np.testing.assert_allclose([loss1[s] for s in (1, 2)], [loss8[s] for s in (1, 2)], atol=1e-5)
    before = load_params(runs[1], 2)
    assert_trees_close(before, load_params(runs[8], 2), atol=1e-5)


def test_stop_resume_equals_uninterrupted(tmp_path, scalars):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(straight, CONFIG, total_steps=4)
    train(resumed, CONFIG, total_steps=4, stop_after_steps=2)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2"]
    train(resumed, CONFIG, total_steps=4)
    assert_trees_close(load_params(straight, 4), load_params(resumed, 4), atol=1e-6)
    assert scalars(resumed, "loss")[4] == pytest.approx(scalars(straight, "loss")[4], abs=1e-6)


@pytest.mark.slow
def test_real_training_lowers_the_loss(tmp_path, scalars):
    workdir = str(tmp_path / "learn")
    run_main(workdir, "mae_fashion_mnist.py", "--config.total_steps=60", "--config.batch_size=64",
             "--config.log_every_steps=10", "--config.image_every_steps=60", "--config.checkpoint_every_steps=60")
    loss = scalars(workdir, "loss")
    early, late = np.mean([loss[10], loss[20]]), np.mean([loss[50], loss[60]])
    assert late < 0.8 * early, loss
    assert os.path.exists(os.path.join(workdir, "images", "reconstruction_0000060.png"))
    assert scalars(workdir, "steps_per_sec")


@pytest.mark.slow
@pytest.mark.parametrize("config", [CONFIG, "cbm_fashion_mnist.py:test"])
def test_two_processes_on_localhost(tmp_path, config, scalars):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = str(tmp_path / "multi")
    env = cpu_env(2)
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py"), f"--config={ROOT}/configs/{config}", f"--workdir={workdir}",
         "--config.total_steps=2", "--config.log_every_steps=1", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for i, log in enumerate(logs):
        assert f"process {i}/2, 2 local / 4 global devices" in log
        assert "batch 16 global, 8 per process, 4 per device" in log
    params = load_params(workdir, 2)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    if config.startswith("cbm"):  # Each process evaluated its half of the test split, padding excluded.
        assert scalars(workdir, "test_examples") == {2: 10_000.0}


@pytest.mark.slow
def test_unknown_config_key_is_one_clear_line(tmp_path):
    proc = run_main(str(tmp_path), CONFIG, "--config.batch_sizee=8", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: unknown config field --config.batch_sizee; did you mean --config.batch_size or "
        "--config.model.patch_size?")


@pytest.mark.slow
def test_patch_size_mismatch_and_missing_data_are_clear(tmp_path):
    proc = run_main(str(tmp_path / "a"), CONFIG, "--config.input.image_size=30", check=False)
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: Image size 30x30 is not divisible by config.model.patch_size=4 (config.input.image_size=30); change "
        "one of them.")
    proc = run_main(str(tmp_path / "b"), CONFIG, f"--config.input.data_dir={tmp_path}", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "apt-get install dataset-fashion-mnist" in last
