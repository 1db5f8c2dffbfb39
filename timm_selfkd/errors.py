"""The error type of bad user input, shared by the command line, the data sets and the checkpoints."""

__all__ = ['UsageError']


class UsageError(ValueError):
    """Bad input from the user: reported as one line and a non-zero exit."""
