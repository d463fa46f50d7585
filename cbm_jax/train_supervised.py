"""Supervised training with Curriculum by Masking (Jarca et al., 2024): the trainer is not implemented yet.

Its parts are: `salience.py`, `masking.py`, `schedules.py` and the classifiers in `models/`.
"""


def train_and_evaluate(config, workdir: str):
    """Not implemented yet: raises with what exists and what is missing."""
    del config, workdir
    raise NotImplementedError(
        "The CBM supervised trainer is not implemented yet (issue 5); cbm_jax's salience, masking, schedules, "
        "ResNet-18, WRN-52-2 and CvT-13 exist and are tested, the train step and its configs do not.")
