"""Errors that end a run with one clear line instead of a traceback.

A message may name settings: `{0}`, `{1}`... in it stand for the config paths in `fields`
(`training.learning_rate`). str() shows those paths; a command line shows its own names for
them with `render` (`--learning_rate`).

Text that is no exception (health advice, log lines) names a setting with `setting_name`: the
config path unless a command line installed its own names with `name_settings_as`.
"""

from __future__ import annotations

from collections.abc import Callable


class RetrainError(Exception):
    """A problem the user can fix (bad data, bad file); exits with status 1."""

    exit_code = 1

    def __init__(self, message: str, *fields: str):
        self.template = message
        self.fields = fields
        super().__init__(self.render(str))

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with each field shown as `name_of(field)`. Only the `{i}` markers are
        replaced (no str.format: paths and JSON in a message may hold braces)."""
        message = self.template
        for i, name in enumerate(self.fields):
            message = message.replace("{" + str(i) + "}", name_of(name))
        return message


class UsageError(RetrainError):
    """An invalid setting or input path, detected before any heavy work; exits 2."""

    exit_code = 2


class StorageError(RetrainError):
    """A write failed for lack of room, an I/O error or a read-only file system; exits 4.

    What was finished before it is kept (flushed and renamed into place); what was being
    written is removed, so a run with room goes on from there (see retrain.utils.atomic).
    """

    exit_code = 4

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.errno = code


class ConfigError(UsageError):
    """An invalid setting of a RetrainConfig, naming it (see the module docstring)."""


def _config_path(field: str) -> str:
    return field


_name_of: Callable[[str], str] = _config_path


def setting_name(field: str) -> str:
    """How this process names config setting `field` (`training.learning_rate`) to its user: the
    path itself, or what the command line installed with `name_settings_as` (its flag)."""
    return _name_of(field)


def name_settings_as(name_of: Callable[[str], str] | None) -> Callable[[str], str]:
    """From now on, process-wide, `setting_name` gives `name_of(field)`; None restores config
    paths. Returns the renderer it replaces (to restore it)."""
    global _name_of
    previous, _name_of = _name_of, name_of or _config_path
    return previous


def first_line(err: BaseException) -> str:
    """The first non-blank line of an exception's message (or its type): for one-line errors."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
