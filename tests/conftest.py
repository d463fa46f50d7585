"""Shared test set-up (pyproject.toml puts the repository on the path): quiet TensorFlow, a persistent XLA cache, LLVM -O1, torchvision before
TensorFlow; the one way to run main.py in a subprocess (Main, run_main, in cpu_env), to share a reference run across
xdist workers (shared_dir), to read a checkpoint (load_state) and to reach a GCS emulator (gcs)."""
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

# One compilation cache for this pytest run, its xdist workers and every main.py they start (set before jax is
# imported; subprocesses inherit it): the many short main.py runs of the same test configs compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"clmae_jax_tests_xla_cache_{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The CPU backend for every test and subprocess: with libtpu installed (the TPU compile tests), JAX would otherwise
# spend seconds looking for a TPU at every start and print errors; deviceless TPU compiles do not need it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM at -O1 instead of -O2 for the CPU code: the test programs are small, so compiling them is much of their time.
# Measured on 2 cores, uncached: a 6-step MAE run 34 s instead of 40 s; a 60-step one 49 s instead of 54 s (-O0
# compiles faster still, 29 s, but runs 60 steps in 97 s).
LLVM_OPTIMIZATION = 1
os.environ.setdefault("XLA_FLAGS", f"--xla_backend_optimization_level={LLVM_OPTIMIZATION}")

try:  # torchvision (which timm imports) segfaults on import once TensorFlow is loaded; the other order is safe.
    import torchvision  # noqa: F401, E402
except ImportError:  # The torch-side packages are optional: their tests skip.
    pass
import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs `python main.py ...` (argv[2:]) with every file it writes limited to argv[1] bytes.
LIMITED = ("import os, resource, sys; limit = int(sys.argv[1]); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); os.execv(sys.argv[2], sys.argv[2:])")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    """Registers the markers the suite uses."""
    config.addinivalue_line("markers", "slow: starts main.py or another process, compiles for a TPU, or trains for "
                            "over ~30 s on 2 cores (CI runs every test; `-m 'not slow'` is the quick tier)")


def cpu_env(devices: int = 1, optimization: int = LLVM_OPTIMIZATION) -> dict:
    """The environment of a test subprocess: the CPU backend as `devices` fake devices, LLVM at -O`optimization`."""
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level={optimization}"))


class Main:
    """`python main.py` in a subprocess on `devices` fake CPU devices; its stderr (the log) collected as it comes."""

    def __init__(self, workdir, config, *overrides, devices=1, file_limit=0, extra_flags=(), env=None, cwd=ROOT):
        env = {k: v for k, v in {**cpu_env(devices), **(env or {})}.items() if v is not None}  # None: unset.
        cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={os.path.join(ROOT, 'configs', config)}",
               f"--workdir={workdir}", *overrides, *extra_flags]
        if file_limit:  # No file may grow past file_limit bytes: writes beyond fail (EFBIG), as on a full disk.
            cmd = [sys.executable, "-c", LIMITED, str(file_limit), *cmd]
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines, self.printed = [], []
        self.readers = [threading.Thread(target=into.extend, args=(pipe,), daemon=True)
                        for into, pipe in ((self.lines, self.proc.stderr), (self.printed, self.proc.stdout))]
        for reader in self.readers:
            reader.start()

    def wait(self, timeout=600) -> int:
        """Exit status, once the process and its output have ended."""
        self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(timeout)
        return self.proc.returncode

    @property
    def returncode(self):
        """The exit status (None while running)."""
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        """Everything the run logged so far."""
        return "".join(self.lines)

    @property
    def stdout(self) -> str:
        """What the run printed (tables)."""
        return "".join(self.printed)

    def last_line(self) -> str:
        """The last log line: the one-line error of a failed run."""
        return self.stderr.strip().splitlines()[-1]


def run_main(workdir, config, *overrides, check=True, timeout=600, **kwargs) -> Main:
    """Runs main.py to its end (see Main); with `check`, a failed run fails the test with the log's tail."""
    run = Main(workdir, config, *overrides, **kwargs)
    if run.wait(timeout) and check:
        raise AssertionError(f"main.py failed ({run.returncode}):\n{run.stderr[-4000:]}")
    return run


def train(workdir, config, **fields):
    """Trains configs/<file>[:variant] in this process through the function main.py would call, `fields` set first
    ({"clmae.curriculum_stages": 4}): for tests of the loop and resume, not of the command line."""
    import importlib
    import main
    name, _, variant = config.partition(":")
    config = importlib.import_module(f"configs.{name.removesuffix('.py')}").get_config(variant)
    config.update_from_flattened_dict(fields)
    module, function = main.EXPERIMENTS[config.experiment]
    return getattr(importlib.import_module(module), function)(config, workdir)


def shared_dir(tmp_path_factory, name: str, make) -> str:
    """A folder that `make(folder)` fills once per pytest session and every xdist worker then reads (the first to
    ask makes it, the others wait): reference runs that many tests compare against are trained once, not per worker."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # The parent is this session's, shared.
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(str(folder))
            done.touch()
    return str(folder)


@pytest.fixture
def scalars():
    """`scalars(workdir, tag)` -> {step: value} from the run's TensorBoard events."""
    from clmae_jax.runtime.metrics import read_scalars
    return read_scalars


def load_state(workdir, step) -> dict:
    """The whole train state of the checkpoint at `step` (params, optimizer state, step), as numpy, read without a
    template."""
    from clmae_jax.runtime import paths
    path = paths.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return jax.tree.map(np.asarray, jax.device_get(checkpointer.restore(path, target)))


def load_params(workdir, step) -> dict:
    """Parameters of the checkpoint at `step`, as numpy."""
    return load_state(workdir, step)["params"]


@contextlib.contextmanager
def traces():
    """The list of functions JAX traces inside the block (a jit cache miss traces, a hit does not), through JAX's
    public monitoring events rather than the private `_cache_size()`."""
    traced = []

    def listener(event: str, duration_secs: float, **kwargs):
        del duration_secs
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traced.append(kwargs.get("fun_name", event))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield traced
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def assert_trees_close(a, b, atol):
    """Every leaf of `a` within `atol` of the same leaf of `b`."""
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), a, b)


BUCKET = "clmae-test"


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """The client environment of a GCS emulator on localhost (tests/gcs_emulator.py), one per test process."""
    folder = tmp_path_factory.mktemp("gcs_emulator")
    ready, log = folder / "environment.json", folder / "emulator.log"
    with open(log, "w") as output:
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "gcs_emulator.py"),
                                   f"--bucket={BUCKET}", f"--ready_file={ready}"], stdout=output, stderr=output)
    deadline = time.time() + 60
    while not ready.exists():
        assert server.poll() is None and time.time() < deadline, f"no GCS emulator: {log.read_text()[-2000:]}"
        time.sleep(0.1)
    yield json.loads(ready.read_text())
    server.kill()
    server.wait()


@pytest.fixture
def gcs(gcs_emulator, monkeypatch, request) -> str:
    """A new gs:// folder on the emulator for this test; this process (and every process it starts) reaches it."""
    for name, value in gcs_emulator.items():
        monkeypatch.setenv(name, value)
    name = re.sub(r"[^\w-]", "_", request.node.name)
    return f"gs://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
