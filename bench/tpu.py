"""TPU pod slices without a TPU: libtpu compiles for a topology that is not attached ("deviceless AOT").

What a compiled program tells about a chip it never ran on, read from the compiler's own output:
- memory: `memory_analysis()` per chip (arguments + outputs - donated + scratch);
- time (`accounting`): the TPU compiler writes an `estimated_cycles` into the backend config of every instruction
  it costs (fusions, copies, converts, ...). Their sum over the program (a while loop's body times its trip count)
  divided by the chip's clock is the estimate the tables use. Every other instruction is priced by a stated model
  or flagged: standard ops the compiler leaves uncosted (sorts, scalar arithmetic, gathers) by the roofline
  max(FLOPs / peak, bytes / HBM bandwidth); collectives by the ring model over the chip's ICI bandwidth
  (RING_FACTOR), reported beside the compute estimate, since the compiler may overlap them; asynchronous copies
  (DMAs the compiler schedules beside compute) are counted, not priced; custom calls (Mosaic / Pallas kernels)
  are listed as unpriced work, and a program with any has no MFU (it is reported as incomplete).
  `cost_analysis()["optimal_seconds"]` is reported too, but it is not usable as is: it comes back negative for
  whole training steps (e.g. -393 s for a ViT-B MAE step) while it agrees with the cycle sum on single kernels,
  and like the cost analysis's "flops" it counts a while loop's body once.
Every time here is the compiler's estimate (or the stated model's), never a measurement.
"""
import dataclasses
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu stays quiet; the topology's devices are compile-only.
# Compiling touches no TPU, so several processes (test workers, a bench) may load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import hlo  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of one TPU generation (vendor numbers) and how JAX exposes it."""

    kind: str
    bf16_tflops: float  # Dense bf16 peak of one chip.
    hbm_gib: float  # HBM of one chip.
    clock_ghz: float  # TensorCore clock: the unit of the compiler's `estimated_cycles`.
    devices_per_chip: int  # v3 shows each of its two TensorCores as a device; v4 / v5p fuse them (megacore).
    hbm_bandwidth: float  # Bytes/s of one chip's HBM.
    ici_bandwidth: float  # Bytes/s a chip moves over its ICI links in an all-reduce (see CHIPS).

    def per_device(self, figure: float) -> float:
        """A per-chip figure (peak FLOP/s, HBM bandwidth) for one device: v3's two cores share it."""
        return figure / self.devices_per_chip


# Cloud TPU's system-architecture pages. ICI: the all-reduce bandwidth per pod over the pod's chips (v3 340 TB/s /
# 1024, v4 1.1 PB/s / 4096, v5e 51.2 TB/s / 256, v6e 102.4 TB/s / 256); v5p's page gives none, so its 4,800 Gbps
# of interchip bandwidth (the same reading of v5e's 1,600 Gbps gives its 200 GB/s).
CHIPS = {
    "v3": Chip("v3", 123.0, 32.0, 0.94, 2, 900e9, 340e12 / 1024),
    "v4": Chip("v4", 275.0, 32.0, 1.05, 1, 1200e9, 1.1e15 / 4096),
    "v5e": Chip("v5e", 197.0, 16.0, 1.5, 1, 819e9, 51.2e12 / 256),
    "v5p": Chip("v5p", 459.0, 95.0, 1.75, 1, 2765e9, 4800e9 / 8),
    "v6e": Chip("v6e", 918.0, 32.0, 1.75, 1, 1640e9, 102.4e12 / 256),
}

# Cloud TPU names (cores for v3 / v4 / v5p, chips for v5e / v6e) -> topology.
SLICES = {"v3-128": "v3:8x8", "v4-128": "v4:4x4x4", "v5e-256": "v5e:16x16", "v5p-128": "v5p:4x4x4",
          "v6e-256": "v6e:16x16", "v5e-64": "v5e:8x8", "v4-8": "v4:2x2x1", "v5e-4": "v5e:2x2"}


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


# What an instruction of the optimised program is, for pricing (see `instructions`).
NO_WORK = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id", "replica-id",
           "after-all", "opt-barrier", "add-dependency")
# DMAs between HBM and on-chip memory that the compiler schedules beside compute: counted, not priced.
ASYNC_COPIES = ("copy-start", "slice-start")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Custom calls the TPU compiler itself emits: naming slices it placed side by side as one array (no data moves),
# starting and ending a collective it fused with compute, packing a gather's indices, marking them in bounds. A
# fusion holding only these is a standard op (priced by the fallback if it has no cycles). Any other target (a
# Mosaic / Pallas kernel, anything new) does work the compiler states no cost for: unpriced.
COMPILER_CUSTOM_CALLS = ("ConcatBitcast", "AsyncCollectiveStart", "AsyncCollectiveDone",
                         "GatherScatterIndicesBitpacked", "AssumeGatherIndicesInBound")
# Bytes a chip sends in a bandwidth-optimal (ring) collective over a group of n devices, as a multiple of the whole
# array's bytes: an all-reduce is a reduce-scatter followed by an all-gather, hence twice the others.
RING_FACTOR = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
               "reduce-scatter": lambda n: (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
               "collective-permute": lambda n: 1.0}


def tuple_elements(text: str) -> list:
    """The top-level elements of an HLO tuple type ('(a, (b, c), d)' -> ['a', '(b, c)', 'd']); [text] otherwise."""
    text = re.sub(r"/\*.*?\*/", "", text).strip()
    if not text.startswith("("):
        return [text]
    elements, depth, start = [], 0, 1
    for i, char in enumerate(text):
        depth += char in "([{" and 1 or char in ")]}" and -1 or 0
        if (char == "," and depth == 1) or (char == ")" and depth == 0):
            elements.append(text[start:i].strip())
            start = i + 1
    return elements


def group_size(line: str) -> int:
    """Devices in each replica group of a collective: 'replica_groups={{0,1},{2,3}}', '[2,4]<=[8]' (iota: groups,
    size) or "mesh['axis_0'=4,'axis_1'=2][, device_ids=([2,4]T(1,0))] {'axis_0'}" (the product of the named
    axes)."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\S*\))?(?: \{([^}]*)\})?", line)
    if mesh:
        sizes = {a: int(n) for a, n in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        return int(np.prod([sizes[a] for a in re.findall(r"'([^']+)'", mesh.group(2) or "")] or [1]))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if listed:
        return len(listed.group(1).split(","))
    return 2 if "source_target_pairs=" in line else 1


WRAPPER = re.compile(r"\b(?:transpose|jvp|checkpoint|remat)\(")


def unwrap(path: str) -> str:
    """`path` without JAX's differentiation and remat wrappers, however deeply nested: 'transpose(jvp(vmap(jit(
    cumsum))))/x' -> 'vmap(jit(cumsum))/x' (each wrapper's own parentheses go, all others stay)."""
    kept, wrappers, i = [], [], 0
    while i < len(path):
        wrapper = WRAPPER.match(path, i)
        if wrapper:
            wrappers.append(True)
            i = wrapper.end()
            continue
        if path[i] == "(":
            wrappers.append(False)
        elif path[i] == ")" and wrappers and wrappers.pop():
            i += 1
            continue
        kept.append(path[i])
        i += 1
    return "".join(kept)


def percent(value) -> str:
    """An MFU for a table: a percentage, or 'incomplete' where unpriced work left it undefined."""
    return "incomplete" if value is None else f"{100 * value:.1f}%"


def op_path(op_name: str) -> str:
    """A JAX op_name shortened to where it comes from, the same for every block: 'jit(train_step)/transpose(jvp(
    MaskedAutoencoder))/.../block3/attn/qkv/dot_general' -> '.../block*/attn/qkv/dot_general'."""
    path = unwrap(re.sub(r"^jit\([^)]*\)/", "", op_name))
    parts = [p for p in re.sub(r"\bblock\d+\b", "block*", path).split("/") if p]
    return "/".join(parts[-4:]) or "(no op_name)"


def phase(op_name: str) -> str:
    """'backward' (JAX's transpose), 'forward' (its jvp) or 'update' (the rest: optimizer, norms, loss scalars)."""
    return "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "update"


def collective_kind(line: str) -> str:
    """The collective an instruction performs ('' for none); the TPU compiler emits a reduce-scatter as a fusion
    that calls an `all-reduce-scatter` computation."""
    if hlo.called(line).startswith("all-reduce-scatter"):
        return "reduce-scatter"
    kind = hlo.opcode(line).removesuffix("-start")
    return kind if kind in COLLECTIVES and not hlo.opcode(line).endswith("-done") else ""


def inside(computation: str, blocks: dict) -> list:
    """Every instruction line of a fused computation and the computations it calls."""
    lines = []
    for line in blocks.get(computation, ()):
        lines.append(line)
        if hlo.called(line) and not hlo.called(line).startswith("all-reduce-scatter"):
            lines += inside(hlo.called(line), blocks)
    return lines


def program(text: str) -> tuple[dict, dict, list]:
    """(computations, their symbol tables, the top-level instructions the program runs as (line, computation,
    trips)): a while body runs trip-count times, a call's computation once, a conditional's branch with the most
    estimated cycles."""
    blocks, entry = hlo.computations(text)
    tables = {name: hlo.symbols(lines) for name, lines in blocks.items()}
    cycles = lambda line: int((re.search(r'"estimated_cycles":"(-?\d+)"', line) or re.match("()", "")).group(1)
                              or 0)

    def walk(computation: str, trips: int) -> list:
        found = []
        for line in blocks.get(computation, ()):
            op = hlo.opcode(line)
            if op == "while":
                n = trips * hlo.trip_count(line, blocks)
                found += walk(hlo.called(line, "body"), n) + walk(hlo.called(line, "condition"), n)
            elif op == "call":
                found += walk(hlo.called(line, "to_apply"), trips)
            elif op == "conditional":
                found += max((walk(b, trips) for b in hlo.branches(line)),
                             key=lambda branch: sum(t * cycles(l) for l, _, t in branch), default=[])
            else:
                found.append((line, computation, trips))
        return found

    return blocks, tables, walk(entry, 1)


def collectives(text: str) -> list:
    """One dict per collective of a compiled program: kind, bytes (its result), group_size and sent_bytes (what each
    device sends under the ring model, RING_FACTOR); all times its trips. The compiler repeats a collective in the
    fusions that start, overlap and end it: it is counted once per channel."""
    blocks, tables, top = program(text)
    found = {}
    for line, computation, trips in top:
        operand_types = [tables[computation].get(o, "") for o in hlo.operands(line)]
        body = inside(hlo.called(line), blocks) if hlo.opcode(line) == "fusion" and not collective_kind(line) else []
        for inner in [line] + body:
            kind = collective_kind(inner)
            if not kind:
                continue
            result = hlo.result_and_opcode(inner)[0]
            if hlo.opcode(inner).endswith("-start") and result.startswith("(("):  # ((operands), (outputs), ...).
                result = tuple_elements(result)[1]
            whole = (sum(map(hlo.shape_bytes, operand_types)) if kind == "reduce-scatter" and inner is line
                     else hlo.shape_bytes(result))
            size = group_size("\n".join(blocks.get(hlo.called(inner), ())) or inner)
            channel = re.search(r"channel_id=(\d+)", inner)
            found[channel.group(1) if channel else hlo.name(inner)] = {
                "kind": kind, "bytes": trips * hlo.shape_bytes(result), "group_size": size,
                "sent_bytes": trips * RING_FACTOR[kind](size) * whole}
    return list(found.values())


def by_kind(found: list, chip_: "Chip" = None) -> dict:
    """{kind: {"count", "bytes", "sent_bytes"[, "seconds"]}} of `collectives`; with a chip, the seconds its ICI
    takes to send them (v3's two cores share a chip's links)."""
    kinds = {kind: {"count": 0, "bytes": 0, "sent_bytes": 0.0} for kind in COLLECTIVES}
    for c in found:
        k = kinds[c["kind"]]
        k.update(count=k["count"] + 1, bytes=k["bytes"] + c["bytes"], sent_bytes=k["sent_bytes"] + c["sent_bytes"])
    if chip_:
        for k in kinds.values():
            k["seconds"] = k["sent_bytes"] * chip_.devices_per_chip / chip_.ici_bandwidth
    return kinds


def instructions(text: str, chip_: "Chip") -> list:
    """Every top-level instruction the program runs (`program`), as dicts: name, opcode, op (op_path), phase,
    matmul (its fusion holds a dot or convolution), trips, flops (matmul FLOPs), bytes and hbm_bytes (operands +
    result: any memory / HBM only), and its price: pricing 'compiler' (its `estimated_cycles`), 'fallback' (a
    standard op the compiler left uncosted: the roofline max(FLOPs / peak, bytes / HBM bandwidth)), 'collective'
    (the start or end of one, priced by `collectives`), 'async' (a DMA beside compute: not priced, its bytes
    reported), 'none' (no work) or 'unpriced' (a custom call the compiler states no cost for); seconds (all trips).
    """
    blocks, tables, top = program(text)
    peak, hbm = chip_.per_device(chip_.bf16_tflops * 1e12), chip_.per_device(chip_.hbm_bandwidth)
    rows = []
    for line, computation, trips in top:
        result, op = hlo.result_and_opcode(line)
        operand_types = [tables[computation].get(o, "") for o in hlo.operands(line)]
        fused = hlo.called(line) if op == "fusion" else ""
        body = inside(fused, blocks) if fused and not collective_kind(line) else []
        op_name = (re.search(r'op_name="([^"]*)"', line) or re.match("()", "")).group(1)
        flops = (hlo.matmul_flops(fused, blocks, tables) if fused else hlo.conv_flops(line, tables[computation])
                 if op == "convolution" else hlo.dot_flops(line, tables[computation]) if op == "dot" else 0.0)
        cycles = re.search(r'"estimated_cycles":"(-?\d+)"', line)
        targets = set(re.findall(r'custom_call_target="([^"]*)"', "\n".join([line] + body)))
        r = {"name": hlo.name(line), "opcode": op, "op": op_path(op_name), "phase": phase(op_name),
             "matmul": bool(flops > 0), "trips": trips, "flops": float(trips * flops), "cycles": None,
             "bytes": trips * (hlo.shape_bytes(result) + sum(map(hlo.shape_bytes, operand_types))),
             "hbm_bytes": trips * (hlo.shape_bytes(result, on_chip=False)
                                   + sum(hlo.shape_bytes(t, on_chip=False) for t in operand_types)),
             "pricing": "fallback", "seconds": 0.0}
        if cycles:
            r.update(pricing="compiler", cycles=trips * int(cycles.group(1)),
                     seconds=trips * int(cycles.group(1)) / (chip_.clock_ghz * 1e9))
        elif op in NO_WORK or op.endswith("-done") or targets == {"ConcatBitcast"}:
            r["pricing"] = "none"
        elif collective_kind(line) or any(collective_kind(inner) for inner in body):
            r["pricing"] = "collective"
        elif op in ASYNC_COPIES:
            r.update(pricing="async", bytes=trips * hlo.shape_bytes(tuple_elements(result)[op == "slice-start"]))
        elif targets - set(COMPILER_CUSTOM_CALLS):
            r.update(pricing="unpriced", target=",".join(sorted(targets - set(COMPILER_CUSTOM_CALLS))))
        else:
            r["seconds"] = max(r["flops"] / peak, r["bytes"] / hbm)
        rows.append(r)
    return rows


def fusion_table(rows: list, chip_: "Chip", top: int = 15) -> list:
    """The costliest priced work, one line per (op, matmul, phase, pricing) over all blocks: count, FLOPs, bytes
    (operands + result, wherever they live: HBM or on-chip memory), seconds, its share of the program's, and the
    FLOP/s and bytes/s that implies (against the chip's peak and HBM bandwidth)."""
    groups = {}
    for r in rows:
        if r["pricing"] in ("compiler", "fallback"):
            key = (r["op"], r["matmul"], r["phase"], r["pricing"])
            g = groups.setdefault(key, {"op": r["op"], "matmul": r["matmul"], "phase": r["phase"],
                                        "pricing": r["pricing"], "count": 0, "flops": 0.0, "bytes": 0,
                                        "seconds": 0.0})
            g.update(count=g["count"] + r["trips"], flops=g["flops"] + r["flops"], bytes=g["bytes"] + r["bytes"],
                     seconds=g["seconds"] + r["seconds"])
    table = sorted(groups.values(), key=lambda g: -g["seconds"])[:top]
    total = sum(r["seconds"] for r in rows if r["pricing"] in ("compiler", "fallback")) or 1.0
    for g in table:
        seconds = max(g["seconds"], 1e-12)
        g.update(share=g["seconds"] / total, flop_per_s=g["flops"] / seconds, bytes_per_s=g["bytes"] / seconds)
        g.update(of_peak=g["flop_per_s"] / chip_.per_device(chip_.bf16_tflops * 1e12),
                 of_hbm=g["bytes_per_s"] / chip_.per_device(chip_.hbm_bandwidth))
    return table


def accounting(text: str, chip_: "Chip", top: int = 15) -> dict:
    """Where the estimated time of a compiled program goes (see `instructions`): the compiler's cycles, the
    fallback-priced ops, the collectives under the ring model, the asynchronous copies, the unpriced work (any makes
    the program's MFU incomplete), a breakdown by matmul / other x forward / backward / update, and the top table."""
    rows = instructions(text, chip_)
    of = lambda pricing: [r for r in rows if r["pricing"] == pricing]
    priced = of("compiler") + of("fallback")
    seconds = sum(r["seconds"] for r in priced)
    breakdown = {}
    for r in priced:
        key = f"{'matmul' if r['matmul'] else 'other'}/{r['phase']}"
        breakdown[key] = breakdown.get(key, 0.0) + r["seconds"] / (seconds or 1.0)
    kinds = by_kind(collectives(text), chip_)
    copies = of("async")
    copy_bytes, hbm_bytes = sum(r["bytes"] for r in copies), sum(r["hbm_bytes"] for r in priced)
    hbm_bandwidth = chip_.per_device(chip_.hbm_bandwidth)
    # What HBM alone needs for the bytes moved to and from it (the priced ops' HBM operands and results, and every
    # asynchronous copy): a floor the estimate is never let below (bounded_seconds), so bytes moved from fusions
    # into DMAs cannot look free.
    floor = (hbm_bytes + copy_bytes) / hbm_bandwidth
    return {
        "estimated_cycles": sum(r["cycles"] for r in of("compiler")),
        "compiler_seconds": sum(r["seconds"] for r in of("compiler")),
        "fallback_seconds": sum(r["seconds"] for r in of("fallback")), "fallback_count": len(of("fallback")),
        "estimated_seconds": seconds,
        "collective_seconds": sum(k["seconds"] for k in kinds.values()), "collectives": kinds,
        "async_copies": {"count": len(copies), "bytes": copy_bytes,
                         "seconds_at_hbm_bandwidth": copy_bytes / hbm_bandwidth},
        "hbm_bytes": hbm_bytes,
        "hbm_floor_seconds": floor, "bounded_seconds": max(seconds, floor),
        "matmul_flops": sum(r["flops"] for r in rows),
        "unpriced": [{k: r[k] for k in ("name", "opcode", "target", "op", "flops", "bytes", "trips")}
                     for r in of("unpriced")],
        "cycle_breakdown": dict(sorted(breakdown.items())),
        "top": fusion_table(rows, chip_, top),
    }


def compile_program(jitted, *args, chip_: Chip, compiler_options=None) -> tuple[object, dict]:
    """Compiles `jitted` for the devices in `args`' shardings, with XLA / TPU `compiler_options` (part of the
    compilation cache's key); (executable, per-chip figures)."""
    from bench import harness
    compiled, stats = harness.compile_stats(jitted, *args, compiler_options=compiler_options)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_chip = chip_.devices_per_chip
    return compiled, {
        "compile_seconds": stats["compile_seconds"],
        "peak_gib_per_chip": per_chip * stats["peak_bytes_per_device"] / 2**30,
        "argument_gib_per_chip": per_chip * stats["argument_bytes_per_device"] / 2**30,
        "temp_gib_per_chip": per_chip * stats["temp_bytes_per_device"] / 2**30,
        "xla_flops_per_chip": per_chip * stats["xla_flops"],
        "xla_bytes_accessed_per_chip": per_chip * float(cost.get("bytes accessed", 0.0)),
        "optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
        **accounting(compiled.as_text(), chip_),
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
