"""What every benchmark shares: experiments built by the trainers' own classes, XLA's own cost and memory figures,
alternating timing rounds with medians, and a matmul peak measured in the same run."""
import multiprocessing
import os
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from clmae_jax.runtime import loop, mesh as mesh_lib


def build(experiment_cls, config, num_classes: int = 0):
    """`experiment_cls(config, mesh, budget)` on all devices, as `loop.train` builds it (one long epoch)."""
    budget = loop.Budget(config, 1000, 1000, num_classes)
    return experiment_cls(config, mesh_lib.make_mesh(config.get("mesh")), budget)


def step_config(module, batch: int, dtype: str, **model):
    """`module`'s config for timing one update: the given global batch and compute dtype, `model` fields set, a
    constant learning rate, CL-MAE's losses over the whole batch."""
    config = module.get_config()
    config.batch_size, config.model.dtype = batch, dtype
    config.model.update(model)
    config.optimizer.schedule, config.optimizer.lr = "constant", 1e-4
    if "clmae" in config:
        config.clmae.loss_group_size = batch
    return config


def random_batch(config, mesh, labels: int = 0) -> dict:
    """Random uint8 images (and labels) of the config's shape, split over the mesh as the input pipeline does."""
    size, channels = config.input.image_size, config.input.channels
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (config.batch_size, size, size, channels), dtype=np.uint8)}
    if labels:
        batch["label"] = (np.arange(config.batch_size) % labels).astype(np.int32)
    return mesh_lib.to_global(batch, mesh)


def batch_spec(config, mesh, labels: int = 0) -> dict:
    """Shapes, dtypes and shardings of `random_batch(config, mesh, labels)`, without allocating it."""
    size, channels, sharding = config.input.image_size, config.input.channels, mesh_lib.batch_sharding(mesh)
    spec = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, channels), jnp.uint8, sharding=sharding)}
    if labels:
        spec["label"] = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=sharding)
    return spec


def compile_stats(jitted, *args, compiler_options=None) -> tuple[object, dict]:
    """(compiled executable, its compile seconds, XLA FLOPs and per-device memory in bytes)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile(compiler_options=compiler_options)
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}  # None for GPUs compiled without one.
    memory = compiled.memory_analysis()
    # Live at once on a device: inputs and outputs (donated inputs counted once) plus XLA's scratch.
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    return compiled, {"compile_seconds": seconds, "xla_flops": float(cost.get("flops", 0.0)),
                      "peak_bytes_per_device": int(peak), "temp_bytes_per_device": int(memory.temp_size_in_bytes),
                      "argument_bytes_per_device": int(memory.argument_size_in_bytes)}


def alternate(runners: dict, rounds: int) -> dict:
    """Median seconds per step of every runner over `rounds` rounds that run them in turn (shared machines drift:
    alternating spreads the drift over all rows). Each round starts one row later, so no row is always the one that
    runs first after the others. A runner is `() -> seconds per step`."""
    times, names = {name: [] for name in runners}, list(runners)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(runners[name]())
    return {name: {"median_seconds": statistics.median(t), "all_seconds": t} for name, t in times.items()}


def timed(step, steps: int):
    """A runner: one untimed `step()` (which must wait for its results; it absorbs the switch from whatever ran
    before: caches, idle threads), then `steps` timed ones -> seconds per step."""
    def run():
        step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps
    return run


class RowWorker:
    """A process that builds timed rows with `build(settings) -> (runners, info)` and times one on request.

    XLA's thread pool and PyTorch's OpenMP threads spin for a while after each program: in one process, or in two
    that run at once, each framework's rows are slowed by the other's idle spinning. Each framework gets its own
    worker, and only one worker runs at a time, the others waiting on their pipe.
    """

    def __init__(self, build, settings: dict):
        context = multiprocessing.get_context("spawn")  # A clean interpreter: no framework inherited from here.
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve_rows, args=(build, settings, child), daemon=True,
                                       name=getattr(build, "__name__", "row"))
        self.process.start()
        child.close()  # Only the worker holds its end now: a worker that dies ends our receive instead of hanging it.
        self.info = self._receive()

    def _receive(self):
        try:
            reply = self.connection.recv()
        except EOFError:
            self.process.join(timeout=10)
            raise RuntimeError(f"the {self.process.name} worker died (exit code {self.process.exitcode})") from None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def runner(self, name: str, pause_seconds: float = 0.5):
        """A runner (see `alternate`) that times row `name` in the worker, after a pause that lets the threads of
        whatever ran before go idle."""
        def run():
            time.sleep(pause_seconds)
            self.connection.send(name)
            return self._receive()
        return run

    def close(self):
        """Ends the worker."""
        self.connection.send(None)
        self.process.join(timeout=60)


def _serve_rows(build, settings, connection):
    try:
        runners, info = build(settings)
        connection.send(info)
    except BaseException as e:  # The coordinator re-raises it.
        connection.send(RuntimeError(f"{type(e).__name__}: {e}"))
        return
    while (name := connection.recv()) is not None:
        connection.send(runners[name]())


def threaded(step_fn, state):
    """`step()` that advances a donated state held in a closure: `step_fn(state) -> state`, awaited."""
    holder = [state]

    def step():
        holder[0] = jax.block_until_ready(step_fn(holder[0]))
    return step


def matmul_peak(dtype=jnp.float32, n: int = 2048, trials: int = 5) -> float:
    """FLOP/s of the best of `trials` square matmuls: the practical dense peak of this device in this run."""
    a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def device_line() -> str:
    """Which devices this run measured on."""
    return f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), {os.cpu_count()} host cores"


def commit() -> str:
    """The code a result was measured with: the repository's commit, '-dirty' when a tracked file outside
    bench/results differs from it ('' outside git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                       check=True).stdout.strip()
    try:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
        return git("describe", "--always") + ("-dirty" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return ""
