"""Tests for the lambda_CL curriculum schedules."""
import pytest

from clmae_jax import curriculum


def test_official_values_for_200_epochs():
    expected = {0: 1.0, 1: 0.99, 99: 0.01, 100: -0.01, 150: -0.51, 199: -1.0}
    for epoch, value in expected.items():
        assert curriculum.lambda_cl(epoch, 200) == pytest.approx(value, abs=1e-12), epoch


def test_odd_total_epochs_by_hand():
    # E = 5: epochs 0..2 satisfy e < 2.5 -> 1 - 2e/5; epochs 3, 4 -> 1 - 2(e+1)/5.
    values = [curriculum.lambda_cl(e, 5) for e in range(5)]
    assert values == pytest.approx([1.0, 0.6, 0.2, -0.6, -1.0])


@pytest.mark.parametrize("total", [1, 2, 3, 7, 10, 101, 200, 1600])
def test_never_zero_and_monotone(total):
    values = [curriculum.lambda_cl(e, total) for e in range(total)]
    assert all(v != 0.0 for v in values)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] == 1.0
    # The last epoch is fully adversarial, except for a one-epoch run that never gets past the first half.
    assert values[-1] == pytest.approx(-1.0 if total > 1 else 1.0)


def test_out_of_range_epoch_raises():
    with pytest.raises(ValueError, match="epoch"):
        curriculum.lambda_cl(200, 200)


def test_constant_schedules_and_dispatch():
    for epoch in (0, 57, 99):
        assert curriculum.curriculum_weight("partner", epoch, 100) == 1.0
        assert curriculum.curriculum_weight("adversary", epoch, 100) == -1.0
        assert curriculum.curriculum_weight("neutral", epoch, 100) == 0.0
        assert curriculum.curriculum_weight("linear", epoch, 100) == curriculum.lambda_cl(epoch, 100)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match=r"^config.clmae.curriculum='cosine' is not a known value; use one of "
                                         r"'linear', 'partner', 'adversary', 'neutral'\.$"):
        curriculum.curriculum_weight("cosine", 0, 10)
