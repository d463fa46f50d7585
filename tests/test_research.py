"""The finished studies of research/ (docs/results/): their tables and their runs. Out of the quick tier: they
guard published numbers, not the library."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cpu_env

pytestmark = pytest.mark.slow


def test_clmae_sweep_table_gives_mean_and_sample_std_over_seeds_and_the_equal_compute_epochs():
    from research import clmae_sweep
    run = lambda knn, cpu: {"results": {"knn_acc1": knn, "best_test_accuracy": 0.5}, "pretrain_seconds": 1.0,
                            "pretrain_cpu_seconds": cpu, "epochs": 5, "protocols_done": ["knn"]}
    sweep = {"runs": {"mae_s0": run(80.0, 60.0), "mae_s1": run(82.0, 0.0), "clmae_s0": run(81.0, 276.0)}}
    summary = clmae_sweep.summary(sweep)
    assert summary["mae"]["kNN acc@1"] == (81.0, pytest.approx(2 ** 0.5), 2)
    assert summary["mae"]["fine-tune best"][0] == 50.0  # Fine-tuning accuracies are fractions: shown in percent.
    assert clmae_sweep.equal_compute_epochs(sweep) == 23  # 5 epochs x 276 / 60 CPU seconds = 23.
    assert summary["mae"]["pretrain CPU min"][::2] == (1.0, 1)  # mae_s1 recorded no CPU seconds.
    table = clmae_sweep.table(sweep)
    assert "| mae | 81.00 ± 1.41 (2) |" in table and "| clmae | 81.00 (1) |" in table
    sweep["runs"]["mae_s1"]["pretrain_cpu_seconds"], sweep["runs"]["clmae_s1"] = 30.0, run(80.0, 300.0)
    assert clmae_sweep.equal_compute_epochs(sweep) == 37  # 5 x mean(276 / 60, 300 / 30) = 36.5, rounded up.
    del sweep["runs"]["clmae_s0"], sweep["runs"]["clmae_s1"]
    sweep["runs"]["clmae_adversarial_s0"] = run(79.0, 300.0)  # The same program: its cost counts as CL-MAE's.
    assert clmae_sweep.equal_compute_epochs(sweep) == 25
    sweep["runs"]["mae_equal_compute_s0"] = {**run(84.0, 400.0), "epochs": 23}
    assert clmae_sweep.equal_compute_epochs(sweep) == 23  # The arm's budget is set: seeds 1-2 get seed 0's epochs.
    del sweep["runs"]["clmae_adversarial_s0"], sweep["runs"]["mae_equal_compute_s0"]
    with pytest.raises(SystemExit, match="needs mae and a CL-MAE arm of one seed"):
        clmae_sweep.equal_compute_epochs(sweep)


def test_clmae_sweep_differences_give_the_standard_error_and_bold_only_what_exceeds_two_of_them():
    from research import clmae_sweep
    run = lambda knn, linear: {"results": {"knn_acc1": knn, "linear_acc1": linear}, "epochs": 5}
    sweep = {"runs": {"mae_s0": run(80.0, 70.0), "mae_s1": run(82.0, 72.0),
                      "clmae_s0": run(84.0, 70.0), "clmae_s1": run(86.0, 74.0), "clmae_adversarial_s0": run(79.0, 71.0)}}
    table = clmae_sweep.differences(sweep)
    # kNN: +4 against sqrt(2/2 + 2/2) = 1.41 (over two errors); linear: +1 against sqrt(8/2 + 2/2) = 2.24 (under).
    assert "| clmae | **+4.00 ± 1.41** | +1.00 ± 2.24 |" in table
    assert "| clmae_adversarial | -2.00 | +0.00 |" in table  # One seed: no error, never bold.
    assert "| mae |" not in table and "kNN acc@NN" not in table  # Only columns some arm has.
    assert "no mae runs" in clmae_sweep.differences({"runs": {"clmae_s0": run(84.0, 70.0)}})


def test_cbm_sweep_table_gives_accuracy_in_percent_and_the_gap_to_the_baseline_mean():
    from research import cbm_sweep
    run = lambda final, best: {"final_test_accuracy": final, "best_test_accuracy": best, "final_epoch": 10,
                               "test_accuracy_by_epoch": [best, final]}
    sweep = {"runs": {"baseline_s0": run(0.93, 0.94), "baseline_s1": run(0.92, 0.94), "cbm_s0": run(0.915, 0.93)}}
    summary = cbm_sweep.summary(sweep)
    assert summary["baseline"]["final acc"] == (pytest.approx(92.5), pytest.approx(0.5 ** 0.5), 2)
    assert summary["cbm"]["final - baseline"][:1] == (pytest.approx(-1.0),)
    assert "random" not in summary
    table = cbm_sweep.table(sweep)
    assert "| cbm | 91.50 (1) | 93.00 (1) | 10.00 (1) | -1.00 (1) |" in table
    assert "| baseline | 94.00 | 92.50 |" in cbm_sweep.curves(sweep)  # Per epoch, mean over seeds.
    chosen = cbm_sweep.curves(sweep, [2, 3])  # Only the epochs asked for; '-' past an arm's last epoch.
    assert "| arm | epoch 2 | epoch 3 |" in chosen and "| baseline | 92.50 | - |" in chosen
    for r in sweep["runs"].values():
        r["loss_by_epoch"] = [0.5, 0.0125]
    assert "| cbm | 0.500 | 0.013 |" in cbm_sweep.curves(sweep, key="loss_by_epoch", scale=1, digits=3)
    del sweep["runs"]["baseline_s0"], sweep["runs"]["baseline_s1"]
    assert "final - baseline" not in cbm_sweep.summary(sweep)["cbm"]  # No baseline yet: no gap.


def test_cbm_sweep_runs_two_arms_at_once_records_both_and_skips_them_on_a_rerun(tmp_path):
    cmd = [sys.executable, "-m", "research.cbm_sweep", "--arms=baseline,cbm", "--seeds=0",
           f"--lanes={min(2, len(os.sched_getaffinity(0)))}", f"--out={tmp_path}", f"--json={tmp_path}/sweep.json",
           "--override=--config.total_steps=3", "--override=--config.batch_size=16"]
    first = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert sorted(runs) == ["baseline_s0", "cbm_s0"] and {r["step"] for r in runs.values()} == {3}
    assert [len(r["test_accuracy_by_epoch"]) for r in runs.values()] == [1, 1]
    assert all(0 <= r["train_accuracy_by_epoch"][0] <= 1 and r["loss_by_epoch"][0] > 0 for r in runs.values())
    assert "| cbm |" in first.stdout and "final - baseline" in first.stdout and "Training accuracy" in first.stdout
    recorded = json.loads((tmp_path / "sweep.json").read_text())
    del recorded["runs"]["cbm_s0"]["loss_by_epoch"]  # As in a JSON from before the training columns.
    (tmp_path / "sweep.json").write_text(json.dumps(recorded))
    again = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and "done" not in again.stdout, again.stderr[-3000:]
    assert json.loads((tmp_path / "sweep.json").read_text())["runs"]["cbm_s0"]["loss_by_epoch"] == runs["cbm_s0"][
        "loss_by_epoch"]  # Read back from the run's folder.
    bad = subprocess.run(cmd + ["--arms=cbm,mixup"], env=cpu_env(), capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "unknown arm(s) mixup" in bad.stderr
    bad_epochs = subprocess.run(cmd + ["--table", "--epochs=5,x"], env=cpu_env(), capture_output=True, text=True,
                                cwd=ROOT)
    assert bad_epochs.returncode == 1 and "--epochs takes epoch numbers from 1" in bad_epochs.stderr


def test_cbm_hidden_measures_the_share_of_ink_under_the_masked_cells():
    from research import cbm_hidden
    from configs import cbm_fashion_mnist
    import jax
    import jax.numpy as jnp
    config = cbm_fashion_mnist.get_config()
    flat = jnp.full((8, 28, 28, 1), 100, jnp.uint8)  # Ink spread evenly: any 4 of 16 cells hold a quarter of it.
    assert cbm_hidden.ink_hidden(config, flat, 4, jax.random.PRNGKey(0)) == pytest.approx(0.25)
    one_cell = jnp.zeros((64, 28, 28, 1), jnp.uint8).at[:, 7:14, 7:14].set(200)  # All ink in cell 5.
    uniform = config.copy_and_resolve_references()
    uniform.cbm.salience = "uniform"
    assert cbm_hidden.ink_hidden(uniform, one_cell, 1, jax.random.PRNGKey(0)) < 0.25  # About 1 in 16.
    assert cbm_hidden.ink_hidden(config, one_cell, 4, jax.random.PRNGKey(0)) > 0.5  # Salience aims at its edges.


def test_cbm_hidden_runs_on_real_images_and_writes_its_json(tmp_path):
    cmd = [sys.executable, "-m", "research.cbm_hidden", "--images=200", f"--out={tmp_path}/h.json"]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "h.json").read_text())
    assert result["curricula"] == {"cbm": [1, 2, 3, 4, 6], "light": [1, 1, 2, 3, 4]}
    hidden = result["hidden"]
    assert sorted(hidden, key=int) == ["1", "2", "3", "4", "6"]
    assert all(0 < h["uniform"] < h["salience"] < 100 for h in hidden.values())
    assert "| 6 |" in proc.stdout


def test_cbm_bn_shift_reestimates_the_batchnorm_statistics_and_nothing_else():
    from research import cbm_bn_shift
    import jax
    import numpy as np
    from cbm_jax import train_supervised as cbm
    from clmae_jax.runtime import loop, mesh as mesh_lib
    from configs import cbm_fashion_mnist
    config = cbm_fashion_mnist.get_config("test")
    experiment = cbm.Supervised(config, mesh_lib.make_mesh(), loop.Budget(config, 1, 1, 10))
    state = experiment.create_train_state()
    white = [{"image": np.full((16, 28, 28, 1), 255, np.uint8)}]
    once = cbm_bn_shift.reestimated(experiment.model, config, state, white * 40)
    twice = cbm_bn_shift.reestimated(experiment.model, config, once, white * 40)
    jax.tree.map(np.testing.assert_array_equal, once.params, state.params)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), once.model_state,
                                         state.model_state))
    assert max(moved) > 0.1  # The statistics now describe the white images...
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.02 * (1 + np.abs(b).max())),
                 twice.model_state, once.model_state)  # ...and 40 more batches of them barely move them.
