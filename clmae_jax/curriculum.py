"""Curriculum weight lambda_CL for the masking module's reconstruction term (CL-MAE, official main_pretrain.py).

lambda_CL > 0 makes the module a partner (it lowers the MAE's error: easy masks), < 0 an adversary (it raises
the error: hard masks). Values are per 0-based epoch and constant within an epoch, as in the official code.
"""
from clmae_jax.runtime.errors import UserError, check_choice


def lambda_cl(epoch: int, total_epochs: int) -> float:
    """Official linear schedule from +1 to -1 that skips 0: 1 - 2e/E for e < E/2, else 1 - 2(e+1)/E."""
    if total_epochs < 1 or not 0 <= epoch < total_epochs:
        raise UserError(f"Need 0 <= epoch < total_epochs, got epoch={epoch}, total_epochs={total_epochs}.")
    if epoch < total_epochs / 2:
        return 1.0 - 2.0 * epoch / total_epochs
    return 1.0 - 2.0 * (epoch + 1) / total_epochs


def _constant(value: float):
    return lambda epoch, total_epochs: value


SCHEDULES = {
    "linear": lambda_cl,  # The official curriculum: partner -> adversary.
    "partner": _constant(1.0),
    "adversary": _constant(-1.0),
    "neutral": _constant(0.0),
}


def curriculum_weight(schedule: str, epoch: int, total_epochs: int) -> float:
    """lambda_CL for `epoch` under a named schedule ("linear" is the paper's; the constants are ablations)."""
    return float(SCHEDULES[check_choice("clmae.curriculum", schedule, SCHEDULES)](epoch, total_epochs))
