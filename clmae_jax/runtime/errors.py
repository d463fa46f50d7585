"""The exception types for mistakes a user can fix (main.py prints their message as a single line), and the one
image-tiling check that the config check, the ViT's patch embedding and CBM's cell grid share."""


class UserError(ValueError):
    """Bad input (config value, dataset, checkpoint, file): the message names the problem and the fix."""


class MissingInputError(UserError, FileNotFoundError):
    """A dataset, weights file or checkpoint the config names is not there."""


def check_tiling(height: int, width: int, divisor: int, what: str, fix: str):
    """Raises the UserError for images of height x width that `divisor` (a patch side, or cells per side) does
    not split into whole tiles."""
    if height % divisor or width % divisor:
        raise UserError(f"Image size {height}x{width} is not divisible by {what}; {fix}.")
