"""Errors that end a run with one clear line instead of a traceback."""


class RetrainError(Exception):
    """A problem the user can fix (bad data, bad file); exits with status 1."""

    exit_code = 1


class UsageError(RetrainError):
    """An invalid flag value or input path, detected before any heavy work; exits 2."""

    exit_code = 2
