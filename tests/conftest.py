"""Shared test set-up: the repo on sys.path, quiet TensorFlow, a persistent XLA cache, torchvision before
TensorFlow, and a runner for main.py in a subprocess."""
import os
import subprocess
import sys
import tempfile

# One compilation cache for this pytest run, its xdist workers and every main.py they start (set before jax is
# imported; subprocesses inherit it): the many short main.py runs of the same test configs compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"clmae_jax_tests_xla_cache_{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The CPU backend for every test and subprocess: with libtpu installed (the TPU compile tests), JAX would otherwise
# spend seconds looking for a TPU at every start and print errors; deviceless TPU compiles do not need it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:  # torchvision (which timm imports) segfaults on import once TensorFlow is loaded; the other order is safe.
    import torchvision  # noqa: F401, E402
except ImportError:  # The torch-side packages are optional: their tests skip.
    pass
import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    """Registers the markers the suite uses."""
    config.addinivalue_line("markers", "slow: the longest tests (CI runs them; `-m 'not slow'` for a quick pass)")


def _run_main(workdir, config, *overrides, devices=1, extra_flags=(), timeout=600, check=True):
    """Runs `python main.py` with `devices` fake CPU devices; returns the CompletedProcess."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={os.path.join(ROOT, 'configs', config)}",
           f"--workdir={workdir}", *overrides, *extra_flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode:
        raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def run_main():
    """`run_main(workdir, config, *overrides, devices=1)` -> CompletedProcess of main.py."""
    return _run_main


@pytest.fixture
def scalars():
    """`scalars(workdir, tag)` -> {step: value} from the run's TensorBoard events."""
    from clmae_jax.runtime.metrics import read_scalars
    return read_scalars


def load_params(workdir, step):
    """Parameters of the checkpoint at `step`, as numpy, read without a template."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return jax.device_get(checkpointer.restore(path, target)["params"])


def assert_trees_close(a, b, atol):
    """Every leaf of `a` within `atol` of the same leaf of `b`."""
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), a, b)
