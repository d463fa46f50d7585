"""NVIDIA GPUs without a GPU: the CUDA plugin compiles for a GPU that is not attached ("deviceless AOT").

`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)` takes XLA's description of a
GPU (bench/targets/*.txtpb) and returns compile-only devices; nothing initialises a CUDA device. What a compiled
program tells about a GPU it never ran on:
- memory: `memory_analysis()` per GPU (arguments + outputs - donated + scratch), as for TPUs;
- FLOPs: `cost_analysis()` is None on this route, so they are counted in the optimised HLO: every dot and
  convolution (cuBLAS / Triton GEMM fusions, cuDNN convolutions) and cuDNN's fused attention, a while loop's body
  times its trip count;
- bytes: what every kernel at the top of the program reads and writes (its operands and results);
- time: a roofline bound, max(FLOPs / bf16 peak, bytes / memory bandwidth), never a measurement.
Needs the CUDA plugin (`pip install -r requirements-gpu.txt`); JAX_PLATFORMS=cpu keeps JAX itself on the CPU.
"""
import contextlib
import dataclasses
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # The target's devices are compile-only; nothing looks for a GPU.

import jax  # noqa: E402

from bench import hlo, tpu  # noqa: E402

TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU model: its XLA target description and the figures the roofline needs."""

    name: str
    target_file: str  # A GpuTargetConfigProto in text form, in bench/targets/.
    bf16_flops: float  # Dense bf16 peak (vendor data sheet; the target's matrix-unit rate for bf16 gives the same).
    compute_capability: str

    def target_config(self) -> str:
        """The target description as get_topology_desc takes it."""
        with open(os.path.join(TARGETS_DIR, self.target_file)) as f:
            return f.read()

    def field(self, name: str) -> float:
        """A number of the target description's gpu_device_info, e.g. memory_bandwidth (bytes/s)."""
        return float(re.search(rf"^\s*{name}: ([\d.]+)", self.target_config(), re.M).group(1))

    @property
    def memory_bytes(self) -> float:
        """Device memory (84.9e9 bytes = 79.1 GiB on an H100 80GB)."""
        return self.field("device_memory_size")

    @property
    def bandwidth(self) -> float:
        """Memory bandwidth in bytes/s (3.35e12 on an H100 SXM)."""
        return self.field("memory_bandwidth")


# 132 SMs x 4 tensor cores x 512 bf16 FMA per clock x 2 x 1.83 GHz = 989 TFLOP/s (the target's matrix_unit rate 16).
GPUS = {"h100": Gpu("h100", "h100_sxm.txtpb", 989e12, "9.0")}
# What `fits` compares with: JAX preallocates this fraction of the GPU's memory when started with
# XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 (its default, 0.75, leaves 59 GiB of an H100); the rest is left for cuDNN and
# cuBLAS workspaces, which memory_analysis() does not count.
MEMORY_FRACTION = 0.9


def gpu(name: str) -> Gpu:
    """The Gpu of a --target name."""
    if name not in GPUS:
        raise ValueError(f"Unknown GPU target {name!r}; use one of {', '.join(GPUS)}.")
    return GPUS[name]


def topology_devices(target: Gpu, gpus: int = 1) -> list:
    """Compile-only devices of `gpus` GPUs in one process (one host), as JAX on that host lists them."""
    from jax.experimental import topologies
    claim_compute_capability(target.compute_capability)
    desc = topologies.get_topology_desc(platform="cuda", target_config=target.target_config(),
                                        topology=f"1x1x{gpus}")
    return list(desc.devices)


def claim_compute_capability(capability: str):
    """jax's cuDNN attention checks ask the local backend which GPU it has (here a CPU, so Hopper's 256-wide heads
    would be refused): make them answer for the target instead. Only this compile-only process is affected."""
    from clmae_jax.runtime import jax_compat
    fused = jax_compat.cudnn_attention_checks()
    version = lambda text: tuple(int(x) for x in text.split("."))
    fused.check_compute_capability = lambda wanted: version(capability) >= version(wanted)
    fused.is_cuda_compute_capability_equal = lambda wanted: version(capability) == version(wanted)


def targeting(mesh):
    """Context in which a model traces for `mesh`'s GPUs (also outside a jit: the abstract evaluation of the
    initialisation), so `vit.compile_platform` sees a GPU and not this CPU."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext()


def attention_flops(line: str, table: dict) -> float:
    """cuDNN fused attention on [B, T, N, H] q / k: q k^T and p v (4 B N T S H) forward; the backward recomputes
    q k^T and adds three products (2.5x)."""
    q, k = (hlo.dims(table.get(name, "")) for name in hlo.operands(line)[:2])
    if len(q) != 4:
        return 0.0
    forward = 4.0 * q[0] * q[1] * q[2] * q[3] * k[1]
    return 2.5 * forward if "Backward" in line else forward


CUDNN_ATTENTION = "__cudnn$fmha"
NOT_KERNELS = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id")


def hlo_costs(text: str) -> dict:
    """{"flops", "bytes", "cudnn_attention_calls", "kernels"} of an optimised GPU program (see the module's
    docstring), while bodies counted trip-count times, a conditional at its costliest branch."""
    blocks, entry = hlo.computations(text)
    tables = {name: hlo.symbols(lines) for name, lines in blocks.items()}

    def flops(name: str) -> float:  # Everything computed inside a computation and the ones it calls.
        total = 0.0
        for line in blocks.get(name, ()):
            op, table = hlo.opcode(line), tables[name]
            target = re.search(r'custom_call_target="([^"]+)"', line)
            if op == "dot" or (target and "gemm" in target.group(1)) or (target and "matmul" in target.group(1)):
                total += hlo.dot_flops(line, table)
            elif op == "convolution" or (target and "$conv" in target.group(1)):
                total += hlo.conv_flops(line, table)
            elif target and target.group(1).startswith(CUDNN_ATTENTION):
                total += attention_flops(line, table)
            elif op == "while":
                total += hlo.trip_count(line, blocks) * flops(re.search(r"body=%?([\w.\-]+)", line).group(1))
            elif op == "conditional":
                branches = re.findall(r"%([\w.\-]+)", line.split("branch_computations=")[-1].split("}")[0])
                total += max((flops(b) for b in branches), default=0.0)
            elif op in ("fusion", "call"):
                total += flops(re.search(r"(?:calls|to_apply)=%?([\w.\-]+)", line).group(1))
        return total

    def traffic(name: str) -> tuple[float, int, int]:  # (bytes, kernels, cuDNN attention calls) of the top level.
        total, kernels, attention = 0.0, 0, 0
        for line in blocks.get(name, ()):
            op, table = hlo.opcode(line), tables[name]
            if op == "while":
                body = traffic(re.search(r"body=%?([\w.\-]+)", line).group(1))
                trips = hlo.trip_count(line, blocks)
                total, kernels, attention = total + trips * body[0], kernels + trips * body[1], attention + body[2]
            elif op == "call":
                called = traffic(re.search(r"to_apply=%?([\w.\-]+)", line).group(1))
                total, kernels, attention = total + called[0], kernels + called[1], attention + called[2]
            elif op not in NOT_KERNELS and not op.endswith("-done"):
                kernels += 1
                attention += CUDNN_ATTENTION in line
                total += hlo.shape_bytes(hlo.result_and_opcode(line)[0])
                total += sum(hlo.shape_bytes(table.get(o, "")) for o in hlo.operands(line))
        return total, kernels, attention

    moved, kernels, attention = traffic(entry)
    return {"flops": flops(entry), "bytes": moved, "kernels": kernels, "cudnn_attention_calls": attention}


# Deviceless compiles cannot autotune, and XLA's Triton GEMM emitter then finds no tiling for some float32 dots:
# jax.image.resize(f32[64, 32, 32, 3] -> 64 x 64, "bicubic") fails with "INTERNAL: Couldn't find output tile sizes
# that satisfy hlo: %dot = f32[12288,64] dot(...), operand_precision={highest,highest}" (CBM's salience on CIFAR).
# Such a program is compiled again with its GEMMs on cuBLAS, and the row says so.
TILING_FAILURE = "Couldn't find output tile sizes"
CUBLAS_ONLY = {"xla_gpu_enable_triton_gemm": False}


def compile_program(jitted, *args, target: Gpu) -> tuple[object, dict]:
    """Compiles `jitted` for the GPUs in `args`' shardings; (executable, per-GPU figures)."""
    from bench import harness
    options = {}
    # A deviceless executable cannot be read back from the persistent cache (it has no client): never write one.
    kept = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        compiled, stats = harness.compile_stats(jitted, *args)
    except jax.errors.JaxRuntimeError as error:
        if TILING_FAILURE not in str(error):
            raise
        options = CUBLAS_ONLY
        compiled, stats = harness.compile_stats(jitted, *args, compiler_options=options)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", kept)
    text = compiled.as_text()
    costs = hlo_costs(text)
    compute_s, memory_s = costs["flops"] / target.bf16_flops, costs["bytes"] / target.bandwidth
    peak = stats["peak_bytes_per_device"]
    return compiled, {
        "compile_seconds": stats["compile_seconds"], "compiler_options": options,
        "peak_gib_per_gpu": peak / 2**30,
        "argument_gib_per_gpu": stats["argument_bytes_per_device"] / 2**30,
        "temp_gib_per_gpu": stats["temp_bytes_per_device"] / 2**30,
        "fits": peak <= MEMORY_FRACTION * target.memory_bytes,
        "hlo_flops_per_gpu": costs["flops"], "hlo_bytes_per_gpu": costs["bytes"], "kernels": costs["kernels"],
        "roofline_compute_seconds": compute_s, "roofline_memory_seconds": memory_s,
        "roofline_seconds": max(compute_s, memory_s),
        "cudnn_attention_calls": costs["cudnn_attention_calls"],
        "collectives": tpu.by_kind(tpu.collectives(text)),
    }
