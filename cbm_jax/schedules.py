"""CBM's per-epoch masking ratios (official ablation/ablation_curricula.py and experiments/*.py).

Entry t is the ratio of 0-based epoch t; the mask count is masking.num_masked_patches(ratio, 16). The official lists
have length 5*(N//5) (linear repeat) or 4*(N//4) (4-epoch holds), so official training would index past their end
when N is not a multiple. Here every schedule has exactly `epochs` entries and starts with the official list:
linear repeat continues its 5-epoch sawtooth, the held schedules hold their last value. The arithmetic keeps the
official operation order, so the values match it bit for bit.
"""
import math
import numbers

import numpy as np

from clmae_jax.runtime.errors import UserError, check_choice

# (r_min, r_max) of the official linear-repeat curricula: "40" masks 1,2,3,4,6 of 16 cells, "60" masks 1,3,5,7,9.
LIN_REPEAT_PRESETS = {"40": (0.07, 0.4036067977500615), "60": (0.1, 0.6036067977500615)}


def _check(epochs, min_epochs, *ratios):
    if epochs < min_epochs:
        raise UserError(f"This masking schedule needs at least {min_epochs} epochs, got {epochs}.")
    if not all(isinstance(r, numbers.Real) and 0 <= r <= 1 for r in ratios) or sorted(ratios) != list(ratios):
        raise UserError(f"Masking ratios must be numbers with 0 <= r_min <= r_max <= 1, got {ratios}; "
                        f"set r_min/r_max or a preset from {sorted(LIN_REPEAT_PRESETS)}.")


def _hold(values, epochs):
    """Holds each value for 4 epochs, then the last value up to `epochs` entries."""
    held = np.repeat(np.asarray(values, np.float64), 4)
    return np.concatenate([held, np.full(epochs - held.size, held[-1])])


def linear_repeat(r_min, r_max, epochs):
    """The paper's curriculum: a 5-epoch sawtooth [r_min, r_max*ln(F)/ln(8) for F = 2, 3, 5, 8], repeated."""
    _check(epochs, 1, r_min, r_max)
    # Official: F = fibonacci(length=7)[2:] = 1, 2, 3, 5, 8; ln(F)/ln(8) scaled to r_max, with the 0 of ln 1 -> r_min.
    period = [r_min] + [math.log(f) / (math.log(8) / r_max) for f in (2, 3, 5, 8)]
    return np.resize(np.asarray(period, np.float64), epochs)  # np.resize repeats cyclically.


def constant(r_max, epochs):
    """No curriculum: r_max every epoch (official `static`)."""
    _check(epochs, 1, r_max)
    return np.full(epochs, r_max, np.float64)


def linear(r_min, r_max, epochs):
    """One ramp linspace(r_min, r_max, N//4), each value held 4 epochs."""
    _check(epochs, 4, r_min, r_max)
    return _hold(np.linspace(r_min, r_max, epochs // 4), epochs)


def log(r_max, epochs):
    """r_i = r_max * ln(i) / ln(N//4) for i = 1..N//4, each held 4 epochs (the first 4 epochs are unmasked)."""
    _check(epochs, 8, r_max)
    return _hold([math.log(i) / (math.log(epochs // 4) / r_max) for i in range(1, epochs // 4 + 1)], epochs)


def exp(r_max, epochs, rate=0.148):
    """r_i = r_max * e^(rate * (i - (N/4 - 1))) for i = 0..N//4-1, each held 4 epochs; convex, ends at r_max."""
    _check(epochs, 4, r_max)
    return _hold([math.e**(rate * i) / (math.e**(rate * (epochs / 4 - 1)) / r_max) for i in range(epochs // 4)],
                 epochs)


def anti_linear(r_min, r_max, epochs):
    """Anti-curriculum: the official linear list reversed (hard to easy), then r_min held to `epochs` entries."""
    _check(epochs, 4, r_min, r_max)
    return _hold(np.linspace(r_min, r_max, epochs // 4)[::-1], epochs)


def none(epochs):
    """Conventional training: ratio 0, no masking (official `baseline`)."""
    _check(epochs, 1)
    return np.zeros(epochs, np.float64)


def masking_schedule(name, epochs, r_min=None, r_max=None, preset=None):
    """Ratios for 0-based epochs 0..epochs-1 of a named schedule; `preset` ("40"/"60") sets r_min and r_max."""
    if preset is not None:
        check_choice("cbm.preset", preset, LIN_REPEAT_PRESETS)
        if r_min is not None or r_max is not None:
            raise UserError(f"Give either preset={preset!r} or r_min/r_max, not both.")
        r_min, r_max = LIN_REPEAT_PRESETS[preset]
    builders = {
        "linear_repeat": lambda: linear_repeat(r_min, r_max, epochs),
        "constant": lambda: constant(r_max, epochs),
        "linear": lambda: linear(r_min, r_max, epochs),
        "log": lambda: log(r_max, epochs),
        "exp": lambda: exp(r_max, epochs),
        "anti_linear": lambda: anti_linear(r_min, r_max, epochs),
        "none": lambda: none(epochs),
    }
    return builders[check_choice("cbm.schedule", name, builders)]()
