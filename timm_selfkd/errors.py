"""The error type of bad user input, shared by the command line, the data sets and the checkpoints, and the one line
an error is reported by."""

__all__ = ['UsageError', 'first_line']


class UsageError(ValueError):
    """Bad input from the user: reported as one line and a non-zero exit."""


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, or its type's name when the message is empty."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__
