"""Supervised training with Curriculum by Masking (Jarca et al., 2024): the trainer is not implemented yet.

Its parts are: `salience.py`, `masking.py`, `schedules.py` and the classifiers in `models/`.
"""


def train_and_evaluate(config, workdir: str):
    """Not implemented yet: raises with what exists and what is missing."""
    del config, workdir
    raise NotImplementedError(
        "The CBM supervised trainer is not implemented yet (issue 5); cbm_jax's salience, masking, schedules, "
        "ResNet-18 and WRN-52-2 exist and are tested, the train step, configs and CvT-13 do not.")
