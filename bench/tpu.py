"""TPU pod slices without a TPU: libtpu compiles for a topology that is not attached ("deviceless AOT").

What a compiled program tells about a chip it never ran on, read from the compiler's own output:
- memory: `memory_analysis()` per chip (arguments + outputs - donated + scratch);
- time: the TPU compiler writes an `estimated_cycles` into the backend config of every instruction it costs
  (fusions, copies, converts, ...). Their sum over the program (a while loop's body times its known trip count)
  divided by the chip's clock is the estimate the tables use. It runs every instruction one after the other, so it
  counts neither the overlap of asynchronous copies and collectives with compute nor the collectives themselves
  (they carry no cycles): their bytes are reported beside it. `cost_analysis()["optimal_seconds"]` is reported
  too, but it is not usable as is: it comes back negative for whole training steps (e.g. -393 s for a ViT-B MAE
  step) while it agrees with the cycle sum on single kernels, and like the cost analysis's "flops" it counts a
  while loop's body once.
Every time here is the compiler's estimate, never a measurement.
"""
import dataclasses
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu stays quiet; the topology's devices are compile-only.
# Compiling touches no TPU, so several processes (test workers, a bench) may load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of one TPU generation (vendor numbers) and how JAX exposes it."""

    kind: str
    bf16_tflops: float  # Dense bf16 peak of one chip.
    hbm_gib: float  # HBM of one chip.
    clock_ghz: float  # TensorCore clock: the unit of the compiler's `estimated_cycles`.
    devices_per_chip: int  # v3 shows each of its two TensorCores as a device; v4 / v5p fuse them (megacore).


CHIPS = {
    "v3": Chip("v3", 123.0, 32.0, 0.94, 2),
    "v4": Chip("v4", 275.0, 32.0, 1.05, 1),
    "v5e": Chip("v5e", 197.0, 16.0, 1.5, 1),
    "v5p": Chip("v5p", 459.0, 95.0, 1.75, 1),
    "v6e": Chip("v6e", 918.0, 32.0, 1.75, 1),
}

# Cloud TPU names (cores for v3 / v4 / v5p, chips for v5e / v6e) -> topology.
SLICES = {"v3-128": "v3:8x8", "v4-128": "v4:4x4x4", "v5e-256": "v5e:16x16", "v5p-128": "v5p:4x4x4",
          "v4-8": "v4:2x2x1", "v5e-4": "v5e:2x2"}

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8}


def chip(topology: str) -> Chip:
    """The chip of a topology name such as 'v5e:16x16' or a slice name such as 'v5e-256'."""
    kind = SLICES.get(topology, topology).split(":")[0]
    if kind not in CHIPS:
        raise ValueError(f"Unknown TPU generation in {topology!r}; use one of {', '.join(CHIPS)} "
                         f"(e.g. v5e:16x16, v4:4x4x4) or a slice name ({', '.join(SLICES)}).")
    return CHIPS[kind]


def topology_devices(topology: str) -> list:
    """Compile-only devices of a TPU topology ('v5e:16x16' or 'v5e-256'), as JAX on that slice would list them."""
    from jax.experimental import topologies
    name = SLICES.get(topology, topology)
    # v4 and v5p run as megacore (one device per chip, both TensorCores) on Cloud TPU; deviceless compiles default
    # to one device per core, so ask for the layout a real slice has.
    options = {"chip_config_name": "megacore"} if chip(name).kind in ("v4", "v5p") else {}
    return list(topologies.get_topology_desc(name, "tpu", **options).devices)


def enable_compilation_cache(directory: str):
    """Persistent XLA cache: a program compiled once for a topology is read back on the next run."""
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in an HLO type, e.g. '(f32[768]{0}, bf16[4,128]{1,0})'."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def computations(hlo: str) -> tuple[dict, str]:
    """({computation name: its instruction lines}, entry name) of an HLO module's text."""
    blocks, entry, current = {}, "", None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(2)
            blocks[current] = []
            entry = current if header.group(1) else entry
        elif current and line.startswith("  ") and " = " in line:
            blocks[current].append(line)
    return blocks, entry


def result_and_opcode(line: str) -> tuple[str, str]:
    """(result type, opcode) of one HLO instruction line."""
    rest = re.sub(r"/\*.*?\*/", "", line.split(" = ", 1)[1])  # Drop /*index=5*/ comments inside tuple types.
    depth = 0
    for i, char in enumerate(rest):  # The result type ends at the first space outside brackets.
        depth += char in "([{" and 1 or char in ")]}" and -1 or 0
        if char == " " and depth == 0:
            return rest[:i], re.match(r"([\w\-]+)", rest[i + 1:]).group(1)
    return rest, ""


def opcode(line: str) -> str:
    """The opcode of one HLO instruction line."""
    return result_and_opcode(line)[1]


def trip_count(while_line: str, blocks: dict) -> int:
    """Iterations of a while loop: the compiler's known trip count, else the bound N of a `counter < N` condition
    (JAX's scans and fori loops count from 0), else 1."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
    if known:
        return int(known.group(1))
    condition = "\n".join(blocks.get(re.search(r"condition=%?([\w.\-]+)", while_line).group(1), ()))
    bound = re.findall(r"s32\[\][^ ]* constant\((\d+)\)", condition)
    return int(bound[0]) if len(bound) == 1 and "direction=LT" in condition else 1


def estimated_cycles(hlo: str) -> int:
    """Sum of the compiler's per-instruction `estimated_cycles` over the program, each while body times its trip
    count, each conditional at its costliest branch."""
    blocks, entry = computations(hlo)

    def cost(name: str) -> int:
        total = 0
        for line in blocks.get(name, ()):
            cycles = re.search(r'"estimated_cycles":"(-?\d+)"', line)
            op = opcode(line)
            if cycles and op != "while":
                total += int(cycles.group(1))
            elif op == "while":
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                total += trip_count(line, blocks) * cost(body)
            elif op == "conditional":
                branches = re.findall(r"%([\w.\-]+)", line.split("branch_computations=")[-1].split("}")[0])
                total += max((cost(b) for b in branches), default=0)
            elif op == "call":
                total += cost(re.search(r"to_apply=%?([\w.\-]+)", line).group(1))
        return total

    return cost(entry)


def cycle_breakdown(hlo: str) -> dict:
    """{"matmul" / "other" x "forward" / "backward" / "rest": share of the top-level estimated cycles}: an op is a
    matmul when its fused computation holds a convolution or dot; the pass comes from JAX's op_name (transpose(...)
    is the backward pass, jvp(...) the forward; the rest is mostly the optimizer update)."""
    blocks, entry = computations(hlo)
    fused_matmul = {name for name, lines in blocks.items() if any(opcode(l) in ("convolution", "dot") for l in lines)}
    shares = {}
    for line in blocks[entry]:
        cycles = re.search(r'"estimated_cycles":"(-?\d+)"', line)
        if not cycles:
            continue
        called = re.search(r"calls=%?([\w.\-]+)", line)
        kind = "matmul" if (called and called.group(1) in fused_matmul) or opcode(line) in ("convolution", "dot") \
            else "other"
        name = (re.search(r'op_name="([^"]*)"', line) or re.match("()", "")).group(1)
        phase = "backward" if "transpose(" in name else "forward" if "jvp(" in name else "rest"
        shares[f"{kind}/{phase}"] = shares.get(f"{kind}/{phase}", 0) + int(cycles.group(1))
    total = sum(shares.values()) or 1
    return {k: v / total for k, v in sorted(shares.items())}


def collectives(hlo: str) -> dict:
    """{kind: {"count", "bytes"}} of the cross-device collectives in the optimised HLO: asynchronous ones counted at
    their start, bytes of the values they produce. The TPU compiler emits a reduce-scatter as a fusion that calls an
    `all-reduce-scatter` computation: that fusion counts as one reduce-scatter, its body not again."""
    found = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    blocks, _ = computations(hlo)
    for name, lines in blocks.items():
        if name.startswith("all-reduce-scatter"):
            continue
        for line in lines:
            result, op = result_and_opcode(line)
            kind = "reduce-scatter" if re.search(r"calls=%all-reduce-scatter", line) else op.removesuffix("-start")
            if kind not in found or op.endswith("-done"):
                continue
            if op.endswith("-start") and result.startswith("(("):  # ((operands), (outputs)[, context]).
                result = result.split("), (", 1)[-1]
            found[kind]["count"] += 1
            found[kind]["bytes"] += shape_bytes(result)
    return found


def compile_program(jitted, *args, chip_: Chip) -> tuple[object, dict]:
    """Compiles `jitted` for the devices in `args`' shardings; (executable, per-chip figures)."""
    from bench import harness
    compiled, stats = harness.compile_stats(jitted, *args)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo, per_chip = compiled.as_text(), chip_.devices_per_chip
    cycles = estimated_cycles(hlo)
    return compiled, {
        "compile_seconds": stats["compile_seconds"],
        "peak_gib_per_chip": per_chip * stats["peak_bytes_per_device"] / 2**30,
        "argument_gib_per_chip": per_chip * stats["argument_bytes_per_device"] / 2**30,
        "temp_gib_per_chip": per_chip * stats["temp_bytes_per_device"] / 2**30,
        "xla_flops_per_chip": per_chip * stats["xla_flops"],
        "xla_bytes_accessed_per_chip": per_chip * float(cost.get("bytes accessed", 0.0)),
        "optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
        "estimated_cycles": cycles,
        "estimated_seconds": cycles / (chip_.clock_ghz * 1e9),
        "collectives": collectives(hlo),
        "cycle_breakdown": cycle_breakdown(hlo),
    }


def process_rows(sharding, batch_size: int) -> dict:
    """{process index: sorted global batch rows its devices hold} under `sharding` of a [batch_size, ...] array."""
    rows = {}
    for device, index in sharding.devices_indices_map((batch_size,)).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(batch_size)))
    return {p: sorted(r) for p, r in sorted(rows.items())}


def input_layout_problems(sharding, batch_size: int) -> list:
    """What is wrong with feeding `sharding` from per-process data: each process must hold one contiguous block of
    batch_size / processes rows, every row exactly once (what `mesh.to_global` and each process's data shard
    assume). Empty when all is well."""
    rows = process_rows(sharding, batch_size)
    per_process = batch_size // len(rows)
    problems = []
    seen = sorted(r for process_rows_ in rows.values() for r in process_rows_)
    if seen != list(range(batch_size)):
        problems.append(f"rows held {len(seen)} times for {batch_size} rows (missing or duplicated)")
    for process, held in rows.items():
        if held != list(range(held[0], held[0] + per_process)):
            problems.append(f"process {process} holds {len(held)} rows, not one block of {per_process}")
    return problems


def fsdp_groups_across_hosts(mesh, axis: str = "fsdp") -> int:
    """How many groups along `axis` (devices that hold the shards of one parameter) span more than one host."""
    devices = np.moveaxis(mesh.devices, mesh.axis_names.index(axis), -1).reshape(-1, mesh.shape[axis])
    return sum(len({d.process_index for d in group}) > 1 for group in devices)
