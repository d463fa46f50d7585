"""What the seed sweeps (clmae_sweep.py, cbm_sweep.py) share: their JSON, mean ± sample std, the markdown table."""
import json
import math
import os

import numpy as np


def read(path: str) -> dict:
    """A sweep's JSON, {"runs": {"<arm>_s<seed>": {...}}}; empty if it does not exist yet."""
    if not os.path.exists(path):
        return {"runs": {}}
    with open(path) as f:
        return json.load(f)


def write(path: str, sweep: dict):
    """Writes the JSON atomically, so a stop mid-write loses nothing recorded."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(sweep, f, indent=2)
    os.replace(path + ".tmp", path)


def arm_runs(sweep: dict, arm: str) -> list[dict]:
    """The recorded runs of one arm, over its seeds."""
    return [run for name, run in sweep["runs"].items() if name.rsplit("_s", 1)[0] == arm]


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std, n); the std of a single value is NaN (printed as none)."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(np.mean(values)), std, len(values)


def markdown(rows: dict, first: str = "arm") -> str:
    """One row per key of `rows` ({row: {label: (mean, std, n)}}), `mean ± std (n)` per column, '-' where missing."""
    labels = list(dict.fromkeys(label for cells in rows.values() for label in cells))
    lines = [f"| {first} | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for row, cells in rows.items():
        text = []
        for label in labels:
            if label not in cells:
                text.append("-")
                continue
            mean, std, n = cells[label]
            text.append(f"{mean:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}") + f" ({n})")
        lines.append(f"| {row} | " + " | ".join(text) + " |")
    return "\n".join(lines)
