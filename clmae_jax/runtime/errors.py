"""The one exception type for mistakes a user can fix: main.py prints its message as a single line."""


class UserError(ValueError):
    """Bad input (config value, dataset, checkpoint, file): the message names the problem and the fix."""


class MissingInputError(UserError, FileNotFoundError):
    """A dataset, weights file or checkpoint the config names is not there."""
