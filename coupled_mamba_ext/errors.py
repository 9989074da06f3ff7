"""Errors in what a user asked for, as opposed to faults of the package."""


class UsageError(ValueError):
    """Options or files of a run that do not fit together (an option out of range, a
    checkpoint trained otherwise). The message names the option and says what to change;
    the ``coupled-mamba`` command prints it without a traceback."""
