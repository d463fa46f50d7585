"""The exception types for mistakes a user can fix (main.py prints their message as a single line), and the two
checks that the config check and the modules reading the config share: a named option, and image tiling."""


class UserError(ValueError):
    """Bad input (config value, dataset, checkpoint, file): the message names the problem and the fix."""


class MissingInputError(UserError, FileNotFoundError):
    """A dataset, weights file or checkpoint the config names is not there."""


def check_tiling(height: int, width: int, divisor: int, what: str, fix: str):
    """Raises the UserError for images of height x width that `divisor` (a patch side, or cells per side) does
    not split into whole tiles."""
    if height % divisor or width % divisor:
        raise UserError(f"Image size {height}x{width} is not divisible by {what}; {fix}.")


def check_choice(field: str, value, allowed):
    """`value` if it is one of `allowed` (a tuple of names or a dict's keys), else the one-line UserError naming
    config.`field` and the accepted values (validate.check_names runs it on every field before anything is built)."""
    if value not in allowed:
        raise UserError(f"config.{field}={value!r} is not a known value; use one of {', '.join(map(repr, allowed))}.")
    return value
