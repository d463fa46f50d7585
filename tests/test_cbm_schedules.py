"""CBM masking-ratio schedules against the official curricula (spec section 4) and the official mask counts."""
import math

import numpy as np
import pytest

from cbm_jax import schedules
from cbm_jax.masking import num_masked_patches


def _counts(ratios):
    return [num_masked_patches(r, 16) for r in ratios]


@pytest.mark.parametrize("preset,period_counts", [("40", [1, 2, 3, 4, 6]), ("60", [1, 3, 5, 7, 9])])
def test_linear_repeat_presets_mask_the_official_cell_counts(preset, period_counts):
    ratios = schedules.masking_schedule("linear_repeat", 200, preset=preset)
    assert ratios.shape == (200,)
    assert _counts(ratios) == period_counts * 40


def test_linear_repeat_period_values():
    r_max = 0.4036067977500615
    expected = [0.07] + [r_max * math.log(f) / math.log(8) for f in (2, 3, 5, 8)]
    np.testing.assert_allclose(schedules.linear_repeat(0.07, r_max, 10), expected * 2, rtol=1e-12)
    np.testing.assert_allclose(expected, [0.070, 0.1345, 0.2132, 0.3124, 0.4036], atol=1e-4)  # Spec table.


def test_linear_repeat_continues_the_sawtooth_past_the_last_full_period():
    ratios = schedules.linear_repeat(0.1, 0.6, 13)
    assert ratios.shape == (13,)
    np.testing.assert_array_equal(ratios[10:], ratios[:3])


def test_log_is_unmasked_for_four_epochs_then_follows_ln():
    ratios = schedules.log(0.4, 40)
    np.testing.assert_array_equal(ratios[:4], 0.0)
    assert _counts(ratios[:4]) == [0] * 4
    expected = np.repeat([0.4 * math.log(i) / math.log(10) for i in range(1, 11)], 4)
    np.testing.assert_allclose(ratios, expected, rtol=1e-12)


@pytest.mark.parametrize("r_max", [0.4, 0.6])
def test_exp_ends_at_r_max_and_starts_near_the_spec_value(r_max):
    ratios = schedules.exp(r_max, 40)
    assert ratios[-1] == pytest.approx(r_max, rel=1e-12)
    assert ratios[0] == pytest.approx(0.105 * r_max / 0.4, rel=0.01)
    np.testing.assert_allclose(ratios, np.repeat(r_max * np.exp(0.148 * (np.arange(10) - 9)), 4), rtol=1e-12)


def test_linear_holds_each_value_four_epochs_and_anti_linear_reverses_it():
    ratios = schedules.linear(0.1, 0.5, 20)
    np.testing.assert_allclose(ratios, np.repeat([0.1, 0.2, 0.3, 0.4, 0.5], 4), rtol=1e-12)
    np.testing.assert_array_equal(schedules.anti_linear(0.1, 0.5, 20), ratios[::-1])


@pytest.mark.parametrize("name", ["linear", "log", "exp", "anti_linear"])
def test_held_schedules_keep_the_official_prefix_and_hold_the_last_value(name):
    ratios = schedules.masking_schedule(name, 42, r_min=0.1, r_max=0.5)
    official_prefix = schedules.masking_schedule(name, 40, r_min=0.1, r_max=0.5)
    assert ratios.shape == (42,)
    if name != "exp":  # exp's values depend on N/4 itself, so N=42 is a different curve.
        np.testing.assert_array_equal(ratios[:40], official_prefix)
    np.testing.assert_array_equal(ratios[40:], ratios[39])


@pytest.mark.parametrize("name", ["linear_repeat", "constant", "linear", "log", "exp", "anti_linear", "none"])
@pytest.mark.parametrize("epochs", [8, 37, 100])
def test_every_schedule_has_exactly_epochs_entries_in_range(name, epochs):
    ratios = schedules.masking_schedule(name, epochs, preset="60")
    assert ratios.shape == (epochs,) and ratios.dtype == np.float64
    assert np.all((ratios >= 0) & (ratios <= 0.6036067977500615 + 1e-12))


def test_constant_and_none():
    np.testing.assert_array_equal(schedules.constant(0.3, 5), [0.3] * 5)
    np.testing.assert_array_equal(schedules.none(3), [0.0] * 3)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="^config.cbm.schedule='cosine' is not a known value; use one of 'linear_re"):
        schedules.masking_schedule("cosine", 10, 0.1, 0.4)
    with pytest.raises(ValueError, match="preset"):
        schedules.masking_schedule("linear_repeat", 10, preset="50")
    with pytest.raises(ValueError, match="not both"):
        schedules.masking_schedule("linear_repeat", 10, 0.1, 0.4, preset="40")
    with pytest.raises(ValueError, match="r_min <= r_max"):
        schedules.masking_schedule("linear", 10, r_min=0.5, r_max=0.1)
    with pytest.raises(ValueError, match="r_min <= r_max"):
        schedules.masking_schedule("linear_repeat", 10)
    with pytest.raises(ValueError, match="at least 8 epochs"):
        schedules.log(0.4, 7)
