"""What reaches the console around the edges of a run, probed through the real main.py as a user meets it: every
failure a user can cause before step 1 is one `error:` line (or one `stopped on` line) with its documented exit
status and no traceback; no TensorFlow / absl start-up noise on any run; a preemption exits within its grace
period. TF_CPP_MIN_LOG_LEVEL is unset here, as on a user's machine."""
import os
import pickle
import re
import signal
import time

import numpy as np
import pytest

from conftest import Main, run_main
from test_faults import FAST, MAE, TOTAL, free_port, wait_for_step

PROBE = {"TF_CPP_MIN_LOG_LEVEL": None}  # Unset: TensorFlow prints what it prints for a user.
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+:\d+\] ")


def probe(tmp_path, *overrides, config=MAE, extra_flags=(), **kwargs) -> Main:
    """main.py run to its end with the user's environment; its console lines are `run.lines`."""
    return run_main(str(tmp_path / "run"), config, *overrides, check=False, env=PROBE, extra_flags=extra_flags,
                    **kwargs)


def assert_one_line(run: Main, status: int, line: str):
    """Exit `status` and exactly the console line `line` (a prefix), nothing else."""
    assert run.returncode == status and len(run.lines) == 1, run.stderr[-3000:]
    assert run.lines[0].startswith(line) and "Traceback" not in run.stderr, run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("overrides,extra_flags,line", [
    ((), ("--num_processes=2", "--process_id=0"), "error: --num_processes and --process_id need "
                                                 "--coordinator_address=HOST:PORT"),
    ((), ("--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=5"),
     "error: --process_id=5 must be this process's index, 0 to 1 with --num_processes=2."),
    (("--config.mask_ratio=1.5",), (), "error: unknown config field --config.mask_ratio; did you mean "
                                       "--config.mae.mask_ratio?"),
    (("--config.optimizer.base_lr=-1",), (), "error: config.optimizer.base_lr=-1.0 must be a number >= 0; give the "
                                             "learning rate per 256 images"),
    (("--config.input.name=nonexistent",), (), "error: config.input.name='nonexistent' is not read by "
                                               "config.input.source='fashion_mnist_idx'"),
    (("--config.model.init_from=/no/such/weights.pth",), (), "error: config.model.init_from=/no/such/weights.pth "
                                                             "does not exist; point it at"),
], ids=["flags-without-coordinator", "bad-process-id", "unknown-key", "negative-lr", "unread-name",
        "missing-init-from"])
def test_a_mistake_before_step_1_is_one_line(tmp_path, overrides, extra_flags, line):
    run = probe(tmp_path, *overrides, extra_flags=extra_flags)
    assert_one_line(run, 1, line)
    assert not (tmp_path / "run").exists() or os.listdir(tmp_path / "run") == []  # Nothing to block a rerun.


@pytest.mark.slow
def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("")
    assert_one_line(probe(tmp_path), 1, f"error: --workdir={tmp_path / 'run'} is a file, not a folder")


class RunsCode:
    """Unpickling this runs a shell command: what a malicious .pth does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_malicious_init_from_weights_are_one_line_that_never_advises_loading_them(tmp_path):
    weights, marker = tmp_path / "mae.pth", tmp_path / "ran"
    weights.write_bytes(pickle.dumps({"model": RunsCode(marker)}))
    run = probe(tmp_path, f"--config.model.init_from={weights}", config="finetune_fashion_mnist.py:test")
    assert run.returncode == 1 and run.lines[-1].startswith(
        f"error: {weights} holds pickled objects other than tensors, which are never loaded"), run.stderr[-3000:]
    assert all(ABSL_LINE.match(line) for line in run.lines[:-1]), run.stderr  # torch's warning went to the log.
    assert "weights_only" not in run.stderr and not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "127.0.0.1:99999"], ids=["peer-never-starts", "bad-port"])
def test_a_peer_that_never_joins_is_one_line_within_the_peer_timeout(tmp_path, address):
    address = address.format(port=free_port())
    started = time.time()
    run = probe(tmp_path, extra_flags=(f"--coordinator_address={address}", "--num_processes=2", "--process_id=0",
                                       "--peer_timeout_s=5"))
    assert_one_line(run, 69, f"error: process 0 of 2 could not reach the others through the coordinator at "
                             f"{address} within --peer_timeout_s=5 s")
    assert time.time() - started < 5 + 40  # The timeout, plus start-up on a busy 2-core machine.


@pytest.mark.slow
@pytest.mark.parametrize("number,delay", [(signal.SIGINT, 0.3), (signal.SIGINT, 3.0), (signal.SIGTERM, 0.3),
                                          (signal.SIGTERM, 3.0)], ids=["int-importing", "int-starting",
                                                                       "term-importing", "term-starting"])
def test_a_signal_before_training_is_one_line_and_exit_75(tmp_path, number, delay):
    run = Main(str(tmp_path / "run"), MAE, env=PROBE)
    time.sleep(delay)
    assert run.proc.poll() is None
    run.proc.send_signal(number)
    assert run.wait() == 75, run.stderr[-3000:]
    assert run.lines[-1] == (f"stopped on {signal.Signals(number).name} outside training (nothing was being saved); "
                             "rerun the same command to resume.\n"), run.stderr[-3000:]
    assert "Traceback" not in run.stderr and all(ABSL_LINE.match(line) for line in run.lines[:-1]), run.stderr


@pytest.mark.slow
def test_a_log_on_a_full_disk_prints_no_logging_errors(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "main.log").symlink_to("/dev/full")  # Every write to the log fails with ENOSPC.
    run = probe(tmp_path, *FAST)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Logging error" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]


@pytest.mark.slow
def test_a_normal_run_prints_only_our_lines_and_a_resume_past_the_end_says_so(tmp_path):
    run = probe(tmp_path, *FAST)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line for line in run.lines if not ABSL_LINE.match(line)] == []  # No TensorFlow / absl start-up noise.
    assert "oneDNN" in open(tmp_path / "run" / "main.log").read()  # It went to the log.
    again = probe(tmp_path, *FAST, f"--config.total_steps={TOTAL - 2}")
    assert again.returncode == 0 and again.lines[-1].endswith(
        f"holds step {TOTAL} of a run of {TOTAL - 2} steps: nothing to train; raise config.total_steps (or "
        "config.num_epochs) to train on\n"), again.stderr[-3000:]


@pytest.mark.slow
def test_sigterm_mid_run_exits_within_the_grace_period(tmp_path):
    # The quickstart's full shuffle buffer: the tf.data iterator whose teardown took 38-40 s after the line.
    steps = np.random.default_rng(7).integers(5, 30, 2)
    for i, step in enumerate(steps):
        run = Main(str(tmp_path / f"run{i}"), "mae_fashion_mnist.py", "--config.log_every_steps=1",
                   "--config.image_every_steps=0", env=PROBE)
        wait_for_step(run, int(step))
        signalled = time.time()
        run.proc.send_signal(signal.SIGTERM)
        while not any(printed.startswith("stopped on") for printed in run.lines) and run.proc.poll() is None:
            time.sleep(0.01)
        line = time.time()
        assert run.wait() == 75 and run.lines[-1].startswith("stopped on"), run.stderr[-3000:]
        assert time.time() - line < 5 and line - signalled < 30, (step, line - signalled, time.time() - line)
