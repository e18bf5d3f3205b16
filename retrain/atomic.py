"""Crash-safe file writes: write to a temporary name in the same folder, fsync, rename.

A reader (or a run restarted after SIGKILL) sees either the old file or the complete new one,
never half of it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to `path`; on success it atomically replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private; give it the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or folder to disk (best effort: errors are ignored)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable_file(path: str | os.PathLike) -> str | None:
    """Return why `path` could not be written, or None if it can.

    Creates the missing parent folders and a probe file that is removed again: asking the file
    system is the only check that also holds for root and for read-only mounts.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return f"{path} is a directory"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{err.strerror or err} ({err.filename or path.parent})"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def check_writable_dir(path: str | os.PathLike) -> str | None:
    """Return why directory `path` could not be created or written, or None if it can."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a directory"
    return check_writable_file(path / "probe")
