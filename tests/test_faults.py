"""Fault injection through main.py, as a user meets the faults: kill -9 at seeded moments, corrupt / partial /
foreign checkpoints, non-finite training, a full disk, a second run on the workdir, a lost peer, bad config values.

Every run is a subprocess of `python main.py`; "nothing lost" is checked by restoring final checkpoints into numpy
and comparing them bitwise with an uninterrupted run's.
"""
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, Main, load_state, run_main, shared_dir
from cbm_jax import train_supervised
from clmae_jax import train_clmae
from clmae_jax.runtime import checkpoint, lock, validate
from clmae_jax.runtime.errors import UserError
from configs import cbm_fashion_mnist, clmae_fashion_mnist, mae_fashion_mnist

TOTAL = 8  # Steps of every run here: room for three kill points of at most two steps each.
FAST = ("--config.input.shuffle_buffer=64", "--config.image_every_steps=0", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=1", f"--config.total_steps={TOTAL}")
MAE, CLMAE, CBM = "mae_fashion_mnist.py:test", "clmae_fashion_mnist.py:test", "cbm_fashion_mnist.py:test"


def fault_run(workdir, config, *overrides, **kwargs) -> Main:
    """main.py started on a TOTAL-step run that logs and saves every step (FAST), then `overrides`."""
    return Main(workdir, config, *FAST, *overrides, **kwargs)


def run_ok(workdir, config, *overrides, **kwargs) -> Main:
    """A fault_run that must succeed."""
    return run_main(workdir, config, *FAST, *overrides, **kwargs)


def run_failing(workdir, config, *overrides, **kwargs) -> Main:
    """A fault_run that must fail; its last line is the user's error."""
    run = run_main(workdir, config, *FAST, *overrides, check=False, **kwargs)
    assert run.returncode != 0, run.stderr[-4000:]
    return run


def assert_same_state(workdir_a, workdir_b, step=TOTAL):
    """The two runs saved bitwise the same train state at `step`."""
    a, b = (jax.tree.leaves(load_state(w, step)) for w in (workdir_a, workdir_b))
    assert len(a) == len(b)
    assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


def steps_on_disk(workdir) -> list:
    """Committed-looking step folders in the workdir, sorted."""
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


@pytest.fixture(scope="session")
def mae_reference(tmp_path_factory):
    """An uninterrupted MAE run keeping a checkpoint of every step (one for the whole session)."""
    return shared_dir(tmp_path_factory, "mae_reference",
                      lambda workdir: run_ok(workdir, MAE, f"--config.keep_checkpoints={TOTAL}"))


def copy_of(reference, tmp_path, keep=None) -> str:
    """A copy of a reference workdir, with only the step folders in `keep` (default: all)."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(reference, workdir)
    for step in steps_on_disk(workdir):
        if keep is not None and step not in keep:
            shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    return workdir


# ---------------------------------------------------------------- kill -9 at seeded moments, then rerun --------


def kill_point_reached(kind: str, step: int, workdir: str, lines: list) -> bool:
    """mid-step: step logged; mid-save: its temporary folder exists; after commit: its final folder exists."""
    if kind == "step":
        return any(re.search(rf"\] \[{step}\] ", line) for line in lines[-40:])
    names = os.listdir(os.path.join(workdir, "checkpoints")) if os.path.isdir(os.path.join(workdir, "checkpoints")) \
        else []
    if kind == "save":
        return any(n.startswith(f"{step}.orbax-checkpoint-tmp") for n in names)
    return str(step) in names


def run_and_kill(workdir, config, kind, step, rng) -> None:
    """Starts main.py and kills it with SIGKILL at the kill point (fails if the run ends first)."""
    run = fault_run(workdir, config)
    while run.proc.poll() is None:
        if kill_point_reached(kind, step, workdir, run.lines):
            time.sleep(rng.uniform(0, 0.2) if kind == "step" else 0)  # Somewhere inside the next step.
            run.proc.send_signal(signal.SIGKILL)
            assert run.wait() == -signal.SIGKILL
            return
        time.sleep(0.002)
    pytest.fail(f"kill point {kind} {step} never reached; the run ended with {run.proc.returncode}:\n"
                f"{run.stderr[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("config,seed", [(MAE, 0), (CLMAE, 1), (CBM, 2)])
def test_kill_9_anywhere_then_rerun_equals_uninterrupted(tmp_path, mae_reference, config, seed):
    # Each experiment is killed once mid-step, once mid-save and once just after a commit, in a seeded order.
    points = ("step", "save", "commit")
    reference, workdir = mae_reference if config == MAE else str(tmp_path / "reference"), str(tmp_path / "killed")
    if config != MAE:
        run_ok(reference, config)
    rng = np.random.default_rng(seed)
    kills = []
    for kind in rng.permutation(points):
        resume = max(steps_on_disk(workdir), default=0)
        step = min(resume + 1 + int(rng.integers(0, 2)), TOTAL - 1)
        run_and_kill(workdir, config, kind, step, rng)
        kills.append((kind, step))
    final = run_ok(workdir, config)
    assert len(kills) == len(points) and "starting at step 0" not in final.stderr, kills
    assert_same_state(reference, workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints_corrupt")), kills  # Nothing set aside or lost.


# ---------------------------------------------------------------- preemption: SIGTERM / SIGINT ------------------


def wait_for_step(run: Main, step: int):
    """Returns once `run` logged `step` (fails if it ended before)."""
    while not any(re.search(rf"\] \[{step}\] ", line) for line in run.lines):
        assert run.proc.poll() is None, run.stderr[-3000:]
        time.sleep(0.02)


def stopped_line(number, step: int, workdir: str) -> str:
    return (f"stopped on {signal.Signals(number).name}: saved step {step} in {workdir}/checkpoints; rerun the same "
            "command to resume.")


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_saves_the_current_step_and_the_rerun_equals_uninterrupted(tmp_path, mae_reference,
                                                                         number):
    workdir = str(tmp_path / "signalled")
    run = fault_run(workdir, MAE, "--config.checkpoint_every_steps=0")  # Saves only at the end.
    wait_for_step(run, 4)
    run.proc.send_signal(number)
    time.sleep(0.3)
    run.proc.send_signal(number)  # A second notice, while the first one's save is under way.
    assert run.wait() == 75, run.stderr[-3000:]
    saved = steps_on_disk(workdir)
    assert len(saved) == 1 and 4 <= saved[0] < TOTAL, saved
    assert run.last_line() == stopped_line(number, saved[0], workdir)
    assert "Traceback" not in run.stderr
    rerun = run_ok(workdir, MAE, "--config.checkpoint_every_steps=0")
    assert f"starting at step {saved[0]} of {TOTAL}" in rerun.stderr
    assert_same_state(mae_reference, workdir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pair(workdir, *overrides, peer_timeout_s=10) -> list:
    """Processes 0 and 1 of a 2-process MAE run (one CPU device each)."""
    port = free_port()
    return [fault_run(workdir, MAE, *overrides, extra_flags=(
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
        f"--peer_timeout_s={peer_timeout_s}")) for i in range(2)]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_step_both_agree_on(tmp_path):
    workdir = str(tmp_path / "pair")
    # The processes agree on a step some way past the notice: a run of TOTAL steps can end there before stopping.
    total = 10 * TOTAL
    overrides = ("--config.checkpoint_every_steps=0", f"--config.total_steps={total}")
    runs = pair(workdir, *overrides)
    wait_for_step(runs[1], 4)
    runs[1].proc.send_signal(signal.SIGTERM)  # The notice reaches one host only.
    assert [r.wait() for r in runs] == [75, 75], runs[0].stderr[-3000:]
    saved = steps_on_disk(workdir)
    assert len(saved) == 1 and 4 <= saved[0] < total, saved
    assert [r.last_line() for r in runs] == [stopped_line(signal.SIGTERM, saved[0], workdir)] * 2
    rerun = pair(workdir, *overrides)
    assert [r.wait() for r in rerun] == [0, 0], rerun[0].stderr[-3000:]
    assert f"starting at step {saved[0]} of {total}" in rerun[0].stderr


# ---------------------------------------------------------------- corrupt, partial and foreign checkpoints ----


def largest_data_file(step_dir) -> str:
    """The biggest array data file of a step (where most parameters are)."""
    files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(step_dir, "state")) for n in names]
    return max(files, key=os.path.getsize)


def write_random_bytes(step_dir):
    path = largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(np.random.default_rng(0).bytes(256))


def truncate(step_dir):
    path = largest_data_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def remove_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def remove_commit_marker(step_dir):
    os.remove(os.path.join(step_dir, "commit_success.txt"))


def garble_manifest(step_dir):
    with open(os.path.join(step_dir, "checksums.json"), "w") as f:
        f.write('{"state/_METADATA": [12')


@pytest.mark.parametrize("newest,second,reasons", [
    (write_random_bytes, remove_commit_marker, ("checksum mismatch in state/", "uncommitted")),
    (truncate, remove_metadata, ("truncated state/", "missing state/_METADATA")),
    (garble_manifest, remove_commit_marker, ("garbled checksums.json", "uncommitted")),
])
@pytest.mark.slow
def test_corrupt_newest_checkpoints_are_set_aside_and_the_run_resumes(tmp_path, mae_reference,
                                                                      newest, second, reasons):
    workdir = copy_of(mae_reference, tmp_path)
    newest(os.path.join(workdir, "checkpoints", str(TOTAL)))
    second(os.path.join(workdir, "checkpoints", str(TOTAL - 1)))
    run = run_ok(workdir, MAE)
    warnings = [line for line in run.lines if "cannot be restored" in line]
    assert len(warnings) == 2, run.stderr[-3000:]
    for step, reason, warning in zip((TOTAL, TOTAL - 1), reasons, warnings):
        assert f"Checkpoint step {step} cannot be restored: {reason}" in warning
        assert f"moved it to {workdir}/checkpoints_corrupt/{step}-{reason.split()[0]}" in warning
    assert f"Restored checkpoint {workdir}/checkpoints/{TOTAL - 2}, the newest that reads back" in run.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints_corrupt"))) == sorted(
        f"{s}-{r.split()[0]}" for s, r in zip((TOTAL, TOTAL - 1), reasons))
    assert_same_state(mae_reference, workdir)  # Retrained the two lost steps exactly.


@pytest.mark.slow
def test_committed_step_without_manifest_restores_and_gets_one(tmp_path, mae_reference):
    workdir = copy_of(mae_reference, tmp_path, keep=(TOTAL - 1,))
    step_dir = os.path.join(workdir, "checkpoints", str(TOTAL - 1))
    os.remove(os.path.join(step_dir, "checksums.json"))  # Killed between orbax's commit and the manifest.
    run = run_ok(workdir, MAE, f"--config.keep_checkpoints={TOTAL}")
    assert f"Restored checkpoint {step_dir}" in run.stderr
    with open(os.path.join(step_dir, "checksums.json")) as f:
        assert json.load(f) == json.loads(json.dumps(checkpoint.file_digests(step_dir)))
    assert_same_state(mae_reference, workdir)


@pytest.mark.slow
def test_when_no_checkpoint_restores_the_error_lists_what_was_tried(tmp_path, mae_reference):
    workdir = copy_of(mae_reference, tmp_path, keep=(TOTAL - 1, TOTAL))
    write_random_bytes(os.path.join(workdir, "checkpoints", str(TOTAL)))
    remove_commit_marker(os.path.join(workdir, "checkpoints", str(TOTAL - 1)))
    run = run_failing(workdir, MAE)
    assert re.fullmatch(rf"error: No checkpoint in {workdir}/checkpoints can be restored: step {TOTAL} \(checksum "
                        rf"mismatch in state/\S+\), step {TOTAL - 1} \(uncommitted \(no commit_success.txt\)\)\. "
                        r"Move those step folders elsewhere to start over, or use a new --workdir\.",
                        run.last_line()), run.last_line()
    assert steps_on_disk(workdir) == [TOTAL - 1, TOTAL]  # Left in place: nothing to resume from instead.


@pytest.mark.parametrize("config,override,field", [
    (CLMAE, (), "params/mae/cls_token/cls (shape (1, 1, 128)) is in this config's train state but not in the "
                "checkpoint"),
    (MAE, ("--config.model.size=tiny",), "params/cls_token/cls has shape (1, 1, 128) in the checkpoint and "
                                         "(1, 1, 192) in this config"),
])
@pytest.mark.slow
def test_checkpoint_of_another_config_is_one_line_naming_the_field(tmp_path, mae_reference, config,
                                                                   override, field):
    workdir = copy_of(mae_reference, tmp_path, keep=(TOTAL,))
    for name in ("config.json", "config_history.json"):  # A workdir without its run's config: the checkpoint tells.
        os.remove(os.path.join(workdir, name))
    run = run_failing(workdir, config, *override)
    assert run.last_line() == (f"error: Checkpoint {workdir}/checkpoints/{TOTAL} was written by another config: "
                               f"{field}; use a new --workdir, or the config (experiment, model size) that wrote it.")
    assert not re.search(r"\] \[1\] ", run.stderr)  # Stopped before training (and compiling) anything.
    assert steps_on_disk(workdir) == [TOTAL]  # A foreign checkpoint is not corrupt: left alone.


def snapshot(workdir) -> dict:
    """{relative path: bytes} of every file in the workdir."""
    files = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), workdir)] = f.read()
    return files


@pytest.mark.slow
def test_resume_that_changes_the_model_is_refused_and_leaves_the_workdir_as_it_was(tmp_path, mae_reference,
                                                                                    ):
    workdir = copy_of(mae_reference, tmp_path, keep=(TOTAL,))
    before = snapshot(workdir)
    run = run_failing(workdir, MAE, f"--config.keep_checkpoints={TOTAL}", "--config.model.size=tiny",
                      "--config.model.decoder_heads=2", "--config.seed=5")
    assert run.last_line() == (
        f"error: --workdir={workdir} holds a run of another model; this config changes model.decoder_heads 4 -> 2, "
        "model.size 'mini' -> 'tiny', seed 0 -> 5. Drop the changes to model.decoder_heads, model.size to resume, "
        "or use a new --workdir."), run.last_line()
    assert snapshot(workdir) == before


@pytest.mark.slow
def test_resume_with_other_settings_goes_on_and_keeps_a_config_history(tmp_path, mae_reference):
    workdir = copy_of(mae_reference, tmp_path, keep=(TOTAL - 2,))
    run = run_ok(workdir, MAE, f"--config.keep_checkpoints={TOTAL}", "--config.seed=5", "--config.batch_size=8")
    warnings = [line for line in run.lines if "changed config" in line]
    assert len(warnings) == 1 and warnings[0].rstrip().endswith(
        "Resuming with a changed config: batch_size 16 -> 8, seed 0 -> 5 (kept in config_history.json)"), warnings
    with open(os.path.join(workdir, "config_history.json")) as f:
        history = json.load(f)
    assert [(e["start_step"], e["config"]["seed"], e["config"]["batch_size"]) for e in history] == [
        (0, 0, 16), (TOTAL - 2, 5, 8)]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["seed"] == 5


@pytest.mark.slow
def test_export_and_evaluation_read_the_geometry_saved_in_the_checkpoint(tmp_path, mae_reference):
    from clmae_jax.evaluate import load
    from clmae_jax.weights import read_weights
    workdir = copy_of(mae_reference, tmp_path, keep=(TOTAL,))
    with open(os.path.join(workdir, "config.json"), "w") as f:  # As a later command might have rewritten it.
        json.dump({"model": {"size": "tiny"}}, f)
    assert load.pretrained_encoder(read_weights(workdir, encoder_only=True)).num_heads == 4
    assert read_weights(workdir).geometry["num_heads"] == 4


# ---------------------------------------------------------------- non-finite training ---------------------------


@pytest.mark.slow
def test_huge_learning_rate_stops_with_one_line_and_no_nan_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    run = run_failing(workdir, MAE, "--config.optimizer.base_lr=1e6")
    assert re.fullmatch(r"error: Non-finite .*(loss|grad_norm|params).* at step \d+.*", run.last_line()), \
        run.last_line()
    for step in steps_on_disk(workdir):
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(load_state(workdir, step))), step


# ---------------------------------------------------------------- full disk -------------------------------------


@pytest.mark.slow
def test_full_disk_while_saving_is_one_line_and_the_rerun_loses_nothing(tmp_path, mae_reference):
    workdir = copy_of(mae_reference, tmp_path, keep=(3, 4))
    # Files may not grow past 2 MB: logs and the XLA cache fit, a checkpoint's data files do not (EFBIG, the same
    # failed write as ENOSPC to the code that saves).
    run = run_failing(workdir, MAE, file_limit=2 << 20)
    assert re.fullmatch(rf"error: Saving checkpoint step 5 in {workdir}/checkpoints failed \(File too large\); the "
                        r"checkpoint of step 4 is intact\. Free disk space \(or fix the folder's permissions\) and "
                        r"rerun to resume\.", run.last_line()), run.last_line()
    assert steps_on_disk(workdir) == [3, 4]
    rerun = run_ok(workdir, MAE)
    assert f"Restored checkpoint {workdir}/checkpoints/4" in rerun.stderr
    assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
    assert_same_state(mae_reference, workdir)


# ---------------------------------------------------------------- one run per workdir ---------------------------


@pytest.mark.slow
def test_second_run_on_a_workdir_is_refused_and_a_crashed_holder_is_taken_over(tmp_path):
    workdir = str(tmp_path / "locked")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from clmae_jax.runtime import lock; "
                               "lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)", workdir],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    run = run_failing(workdir, MAE)
    assert run.last_line() == (f"error: --workdir={workdir} is in use by another run (pid {holder.pid} on "
                               f"{socket.gethostname()}); wait for it to finish, stop it, or use another --workdir.")
    holder.kill()
    holder.wait()
    run = run_ok(workdir, MAE, "--config.total_steps=1")
    assert "ended without releasing it" in run.stderr


@pytest.mark.slow
def test_lock_refuses_a_live_holder_and_takes_over_from_a_dead_one(tmp_path):
    workdir = str(tmp_path)
    held = lock.acquire(workdir)
    with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on "):
        lock.acquire(workdir)
    held.release()
    with lock.acquire(workdir):  # Released cleanly: free again.
        pass
    crashed = subprocess.run([sys.executable, "-c", "import os, sys; from clmae_jax.runtime import lock; "
                              "lock.acquire(sys.argv[1]); os.kill(os.getpid(), 9)", workdir], cwd=ROOT)
    assert crashed.returncode == -signal.SIGKILL
    with lock.acquire(workdir) as taken:
        assert taken.fd is not None


# ---------------------------------------------------------------- a lost peer -----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["peer", "coordinator"])
def test_lost_process_ends_the_survivor_with_one_line_and_both_resume(tmp_path, victim):
    workdir = str(tmp_path / "multi")
    runs = pair(workdir)
    wait_for_step(runs[victim], 3)
    runs[victim].proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    survivor = runs[1 - victim]
    assert survivor.wait(timeout=120) == 69, survivor.stderr[-3000:]
    assert time.time() - killed_at < 10 + 5, "the survivor did not end within --peer_timeout_s"
    runs[victim].wait()
    saved = max(steps_on_disk(workdir))
    lost = "process 1" if victim else "process 0 (the coordinator)"
    assert survivor.last_line() == (
        f"error: lost {lost} of this 2-process run (killed, preempted or its host gone; silent for up to 10 s). "
        f"Last committed checkpoint: step {saved} in {workdir}/checkpoints; rerun every process to resume from it.")
    assert [line for line in survivor.lines if line.startswith("error:")] == [survivor.lines[-1]]
    assert not re.search(r"Traceback|Check failure|Fatal Python error", survivor.stderr)
    rerun = pair(workdir, "--config.checkpoint_every_steps=0")  # Saves only at the end.
    assert [r.wait() for r in rerun] == [0, 0], rerun[0].stderr[-3000:]
    assert f"starting at step {saved} of {TOTAL}" in rerun[0].stderr
    assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]  # Half-written: cleaned.


# ---------------------------------------------------------------- bad config values -----------------------------


def mae_config(**changes):
    config = mae_fashion_mnist.get_config("test")
    for field, value in changes.items():
        node = config
        *parents, leaf = field.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


@pytest.mark.parametrize("field,value,message", [
    ("mae__mask_ratio", 1.0, "config.mae.mask_ratio=1.0 must be strictly between 0 and 1; the MAE paper uses 0.75."),
    ("mae__mask_ratio", 0.0, "config.mae.mask_ratio=0.0 must be strictly between 0 and 1"),
    ("mae__mask_ratio", 0.999, "config.mae.mask_ratio=0.999 leaves no visible token of 49; lower it."),
    ("batch_size", 0, "config.batch_size=0 must be an integer >= 1"),
    ("grad_accum_steps", 3, "config.batch_size=16 does not split into config.grad_accum_steps=3 micro-batches"),
    ("grad_accum_steps", 0, "config.grad_accum_steps=0 must be an integer >= 1; use 1 for no accumulation."),
    ("total_steps", -3, "config.total_steps=-3 must be an integer >= 0"),
    ("num_epochs", -1, "config.num_epochs=-1 must be an integer >= 0"),
    ("stop_after_steps", -1, "config.stop_after_steps=-1 must be an integer >= 0"),
    ("log_every_steps", -1, "config.log_every_steps=-1 must be an integer >= 0"),
    ("keep_checkpoints", 0, "config.keep_checkpoints=0 must be an integer >= 1"),
    ("nonfinite", "ignore", "config.nonfinite='ignore' is not a known value; use one of 'stop', 'skip'."),
    ("input__source", "csv", "config.input.source='csv' is not a known value"),
    ("input__augment", "autoaugment", "config.input.augment='autoaugment' is not a known value"),
    ("input__channels", 4, "config.input.channels=4 must be 1 (grey) or 3 (RGB)"),
    ("input__std", (0.0,), "config.input.std=(0.0,) must be positive"),
    ("input__mean", (0.5, 0.5, 0.5), "config.input.mean=(0.5, 0.5, 0.5) needs one value per channel (1)"),
    ("input__crop_scale", (0.0, 1.0), "config.input.crop_scale=(0.0, 1.0) must satisfy 0 < low <= high <= 1"),
    ("input__image_size", 30, "Image size 30x30 is not divisible by config.model.patch_size=4 (config.input."
                              "image_size=30); change one of them."),
    ("input__shuffle_buffer", 0, "config.input.shuffle_buffer=0 must be an integer >= 1"),
    ("optimizer__name", "lamb", "config.optimizer.name='lamb' is not a known value"),
    ("optimizer__schedule", "linear", "config.optimizer.schedule='linear' is not a known value"),
    ("optimizer__base_lr", -1.0, "config.optimizer.base_lr=-1.0 must be a number >= 0"),
    ("optimizer__b2", 1.0, "config.optimizer.b2=1.0 must be in [0, 1)"),
    ("optimizer__weight_decay", -0.1, "config.optimizer.weight_decay=-0.1 must be a number >= 0"),
    ("model__dtype", "float8", "config.model.dtype='float8' is not a known value"),
    ("model__decoder_heads", 3, "config.model.decoder_heads=3 does not divide the width 64 into equal heads; use one "
                                "of 1, 2, 4, 8, 16 (or change the width)."),
    ("model__decoder_width", 0, "config.model.decoder_width=0 must be an integer >= 1"),
])
def test_bad_config_values_are_one_line_naming_field_and_fix(field, value, message):
    config = mae_config(**{field: value})
    with pytest.raises(UserError) as error:
        validate.check_config(config)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_bad_clmae_cbm_and_batch_split_values():
    config = clmae_fashion_mnist.get_config("test")
    config.clmae.loss_group_size = 6
    with pytest.raises(UserError, match=r"^config.clmae.loss_group_size=6 does not divide config.batch_size=16"):
        validate.check_config(config)
    config.clmae.loss_group_size, config.clmae.curriculum = 8, "reverse"
    with pytest.raises(UserError, match=r"^config.clmae.curriculum='reverse' is not a known value; use one of "
                                        r"'linear', 'partner', 'adversary', 'neutral'\.$"):
        validate.check_config(config, options=train_clmae.OPTIONS)
    config = cbm_fashion_mnist.get_config("test")
    config.cbm.salience = "saliency"
    with pytest.raises(UserError, match=r"^config.cbm.salience='saliency' is not a known value"):
        validate.check_config(config, options=train_supervised.OPTIONS)
    config = cbm_fashion_mnist.get_config("test")
    config.input.source, config.input.data_dir = "image_folder", ""
    with pytest.raises(UserError, match=r"^config.input.data_dir='' is empty but .*; set it to the folder"):
        validate.check_config(config)


def test_batch_not_divisible_by_devices_is_named(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    config = mae_config(batch_size=20)
    with pytest.raises(UserError, match=r"^config.batch_size=20 gives a batch not divisible by the 8 devices; "
                                        r"choose a multiple of 8\.$"):
        validate.check_config(config)
    config = mae_config(batch_size=16, grad_accum_steps=4)
    with pytest.raises(UserError, match=r"gives a micro-batch of 4 not divisible by the 8 devices; choose a "
                                        r"multiple of 32\.$"):
        validate.check_config(config)


def test_unwritable_workdir_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=rf"^--workdir={tmp_path}/file/run is not writable \(Not a directory\)"):
        validate.check_config(mae_config(), str(tmp_path / "file" / "run"))


@pytest.mark.slow
def test_bad_config_value_through_main_is_one_line(tmp_path):
    run = run_failing(str(tmp_path / "bad"), MAE, "--config.mae.mask_ratio=1.5")
    assert run.last_line() == ("error: config.mae.mask_ratio=1.5 must be strictly between 0 and 1; the MAE paper "
                               "uses 0.75.")


class RunsCode:
    """Unpickling this runs a shell command: what a malicious .pth does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_cvt_weights_are_one_line_and_run_nothing(tmp_path):
    pytest.importorskip("torch")
    from cbm_jax.interop import cvt_torch
    path, marker = tmp_path / "cvt.pth", tmp_path / "ran"
    path.write_bytes(pickle.dumps({"stage0.patch_embed.proj.weight": RunsCode(marker)}))
    with pytest.raises(UserError, match=rf"^{path} is not a PyTorch weights file holding only tensors "
                                        r"\(UnpicklingError\); give the CvT-13 \.pth of the model zoo\.$"):
        cvt_torch.read_pth(str(path))
    assert not marker.exists()
