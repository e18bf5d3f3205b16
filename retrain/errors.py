"""Errors that end a run with one clear line instead of a traceback."""


class RetrainError(Exception):
    """A problem the user can fix (bad data, bad file); exits with status 1."""

    exit_code = 1


class UsageError(RetrainError):
    """An invalid flag value or input path, detected before any heavy work; exits 2."""

    exit_code = 2


def first_line(err: BaseException) -> str:
    """The first non-blank line of an exception's message (or its type): for one-line errors."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
