"""Reading optimised HLO text: computations, instructions, shapes, operands, FLOPs of matmuls and convolutions.

Shared by the TPU (bench/tpu.py) and GPU (bench/gpu.py) compile benches, which price what they read differently.
"""
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8}
# One array in an HLO type with its layout, e.g. 'bf16[16,50,768]{2,1,0:T(8,128)(2,1)S(1)}'.
ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\](\{[^}]*\})?")


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


def name(line: str) -> str:
    """The name of one HLO instruction line."""
    return re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line).group(1)


def called(line: str, key: str = "calls") -> str:
    """The computation an instruction names in `key=` (calls, to_apply, body, condition), or ''."""
    found = re.search(rf"\b{key}=%?([\w.\-]+)", line)
    return found.group(1) if found else ""


def branches(line: str) -> list:
    """The branch computations of a conditional."""
    return re.findall(r"%([\w.\-]+)", line.split("branch_computations=")[-1].split("}")[0])


def trip_count(while_line: str, blocks: dict) -> int:
    """Iterations of a while loop: the compiler's known trip count, else the bound N of a `counter < N` condition
    (JAX's scans and fori loops count from 0), else 1."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
    if known:
        return int(known.group(1))
    condition = "\n".join(blocks.get(called(while_line, "condition"), ()))
    bound = re.findall(r"s32\[\][^ ]* constant\((\d+)\)", condition)
    return int(bound[0]) if len(bound) == 1 and "direction=LT" in condition else 1


def shape_bytes(text: str, on_chip: bool = True) -> int:
    """Bytes of every array shape written in an HLO type, e.g. '(f32[768]{0}, bf16[4,128]{1,0})'; with
    `on_chip` False only those in HBM (memory space 0: TPU layouts mark on-chip memories S(1), S(2), ...)."""
    total = 0
    for dtype, dims_, layout in ARRAY.findall(text):
        if dtype in DTYPE_BYTES and (on_chip or not re.search(r"S\([1-9]\d*\)", layout or "")):
            total += DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims_.split(",") if d] or [1]))
    return total


def symbols(lines: list) -> dict:
    """{instruction name: result type} of one computation's instruction lines."""
    return {name(line): result_and_opcode(line)[0] for line in lines}


def operands(line: str) -> list:
    """Names of an instruction's operands."""
    rest = line.split(" = ", 1)[1]
    start = rest.index("(", rest.index(opcode(line)))
    depth, end = 0, start
    for end, char in enumerate(rest[start:], start):
        depth += char == "(" and 1 or char == ")" and -1 or 0
        if depth == 0:
            break
    return re.findall(r"%([\w.\-]+)", rest[start:end])


def dims(shape: str) -> list:
    """Dimensions of the first array in an HLO type, e.g. 'bf16[64,197,768]{2,1,0}' -> [64, 197, 768]."""
    found = re.search(r"[a-z]+\d*\[([\d,]*)\]", shape)
    return [int(d) for d in found.group(1).split(",") if d] if found else []


def dot_flops(line: str, table: dict) -> float:
    """2 x output elements x contracted size of a dot (or a cuBLAS GEMM custom call)."""
    lhs = dims(table.get(operands(line)[0], ""))
    contracting = re.search(r'lhs_contracting_dim(?:s|ensions)"?[=:]\{?\[?([\d,"\s]*)', line)
    contracted = [int(d) for d in re.findall(r"\d+", contracting.group(1))] if contracting else []
    return 2.0 * np.prod(dims(result_and_opcode(line)[0]) or [1]) * np.prod([lhs[d] for d in contracted] or [1])


def window_field(line: str, key: str, count: int, default: int) -> list:
    """One field of a convolution's window (e.g. 'stride=15x11'), one number per spatial dimension."""
    found = re.search(rf"window=\{{[^}}]*\b{key}=([-\dx_]+)", line)  # Pads may be negative: crops.
    return [[int(v) for v in part.split("_")] if "_" in part else int(part)
            for part in found.group(1).split("x")] if found else [default] * count


def taps(size: int, window: int, stride: int, low: int, high: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window position) pairs of one spatial dimension that land on an input element, not on
    padding or on the holes of a dilated input."""
    dilated = (size - 1) * lhs_dilate + 1
    outputs = (low + dilated + high - (window - 1) * rhs_dilate - 1) // stride + 1
    return sum(1 for o in range(outputs) for w in range(window)
               if 0 <= (p := o * stride + w * rhs_dilate - low) < dilated and p % lhs_dilate == 0)


def conv_flops(line: str, table: dict) -> float:
    """2 x multiply-adds of a convolution: output batch x output features x input features per group x the window
    taps that land on input elements, per spatial dimension. The TPU compiler writes every matmul as a convolution,
    batch dimensions often as spatial ones under padding or input dilation ('window={size=16x12 stride=15x11
    lhs_dilate=16x12}': one tap per output), so counting the whole window would count work that is never done."""
    lhs, kernel = (dims(table.get(o, "")) for o in operands(line)[:2])
    lhs_labels, kernel_labels, out_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line).groups()
    out = dims(result_and_opcode(line)[0])
    spatial = sorted(c for c in lhs_labels if c.isdigit())  # Window fields list spatial dimensions 0, 1, ...
    sizes, strides = window_field(line, "size", len(spatial), 1), window_field(line, "stride", len(spatial), 1)
    pads = window_field(line, "pad", len(spatial), 0)
    pads = [p if isinstance(p, list) else [0, 0] for p in pads]
    lhs_dilate = window_field(line, "lhs_dilate", len(spatial), 1)
    rhs_dilate = window_field(line, "rhs_dilate", len(spatial), 1)
    pairs = np.prod([taps(lhs[lhs_labels.index(d)], sizes[i], strides[i], *pads[i], lhs_dilate[i], rhs_dilate[i])
                     for i, d in enumerate(spatial)] or [1])
    return 2.0 * out[out_labels.index("b")] * out[out_labels.index("f")] * kernel[kernel_labels.index("i")] * pairs


def matmul_flops(computation: str, blocks: dict, tables: dict) -> float:
    """FLOPs of the dots and convolutions in a computation and the fusions and calls inside it."""
    total = 0.0
    for line in blocks.get(computation, ()):
        op = opcode(line)
        if op == "dot":
            total += dot_flops(line, tables[computation])
        elif op == "convolution":
            total += conv_flops(line, tables[computation])
        elif op in ("fusion", "call"):
            total += matmul_flops(called(line) or called(line, "to_apply"), blocks, tables)
    return total
