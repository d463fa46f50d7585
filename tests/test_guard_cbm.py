"""CBM's masking curriculum as the training loop applies it: the mask count every step of a short run hands to the
update step, against the schedule's table written out here. An off-by-one epoch (epoch(step) for epoch(step - 1))
shifts every count by one epoch; only this per-step check tells, rather than the index past the last epoch."""
import pytest

from cbm_jax import train_supervised as cbm
from clmae_jax.runtime import loop, mesh as mesh_lib
from configs import cbm_fashion_mnist

# Cells of the 4x4 grid masked in each 0-based epoch: the official "40" sawtooth (1, 2, 3, 4, 6 of 16) repeated,
# and the log curriculum over 8 epochs (ratio r_max ln(i) / ln(2) for i = 1, 2, each held 4 epochs: 0 then 0.4).
TABLES = {"linear_repeat_40": (dict(schedule="linear_repeat", preset="40"), [1, 2, 3, 4, 6, 1, 2]),
          "log": (dict(schedule="log", preset="", r_min=None, r_max=0.4), [0, 0, 0, 0, 6, 6, 6, 6])}
STEPS_PER_EPOCH = 3


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_step_masks_the_cell_count_of_its_epoch_in_the_schedule_table(name):
    """Guards which epoch's mask count each training step (and each epoch's evaluation record) uses."""
    fields, table = TABLES[name]
    config = cbm_fashion_mnist.get_config("test")
    config.cbm.update(fields)
    # The last epoch one step short: a partial epoch still masks with its own count.
    total = len(table) * STEPS_PER_EPOCH - 1
    budget = loop.Budget(config, steps_per_epoch=STEPS_PER_EPOCH, total_steps=total, num_classes=10)
    experiment = cbm.Supervised(config, mesh_lib.make_mesh(), budget)
    assert config.cbm.grid ** 2 == 16 and experiment.patches == table
    handed = []
    # The compiled update is replaced by a recorder: what is checked is the count train_step chooses for it.
    experiment.step_fn = lambda state, batch, num_masked: (handed.append(num_masked) or state, {})
    for step in range(1, total + 1):  # As loop.train numbers them: step s ends iteration s, 1-based.
        experiment.train_step(None, None, step)
        assert handed[-1] == table[(step - 1) // STEPS_PER_EPOCH], f"step {step} masked {handed[-1]} cells"
    # Evaluation after the last step of each epoch records that epoch's count.
    for epoch, count in enumerate(table):
        step = min((epoch + 1) * STEPS_PER_EPOCH, total)
        assert experiment.eval_scalars(step)["masked_patches"] == count, f"epoch {epoch}"
