"""Crash-safe file writes: write to a temporary name in the same folder, fsync, rename.

A reader (or a run restarted after SIGKILL) sees either the old file or the complete new one,
never half of it.

A write that fails because the file system is full, read-only or failing (`STORAGE_ERRNOS`)
becomes one `StorageError` naming the path, what was written and how much room it needed
(`writing`): the one place where such failures get their wording, for retrain's own writes and,
through `writing`, for those TensorFlow makes (checkpoints, TensorBoard logs, SavedModels).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from retrain.errors import StorageError

log = logging.getLogger("retrain")

# Failures of the storage itself, not of what the program asked of it.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
# TensorFlow reports them as its own errors, with the C library's text in the message.
_STORAGE_TEXTS = {os.strerror(code): code for code in STORAGE_ERRNOS}


def storage_errno(err: BaseException) -> int | None:
    """The errno in `STORAGE_ERRNOS` behind `err` (an OSError, or an error of TensorFlow's
    whose message quotes the C library's text for one), else None."""
    if isinstance(err, StorageError):
        return err.errno
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno if err.errno in STORAGE_ERRNOS else None
    text = str(err)
    return next((code for message, code in _STORAGE_TEXTS.items() if message in text), None)


def format_bytes(size: int) -> str:
    """`size` bytes in the largest unit that keeps it at least 1 (`512 B`, `3.4 MB`)."""
    value, unit = float(size), "B"
    for bigger in ("KB", "MB", "GB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding `path` (or the
    nearest folder above it that exists), or None if that cannot be asked."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            stat = os.statvfs(folder)
            return stat.f_bavail * stat.f_frsize
    return None


def storage_error(
    err: BaseException, path: str | os.PathLike, what: str = "", size: int | None = None
) -> StorageError | None:
    """`err` as a StorageError about writing `what` (a few words, e.g. "bottleneck cache
    shard") of `size` bytes to `path`, or None if `err` is not a failure of the storage."""
    code = storage_errno(err)
    if code is None:
        return None
    if isinstance(err, StorageError):
        return err
    room = []
    if size is not None:
        room.append(f"needs {format_bytes(size)}")
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and (free := free_bytes(path)) is not None:
        room.append(f"{format_bytes(free)} free there")
    detail = f" ({', '.join(room)})" if room else ""
    subject = f"{what} {path}" if what else str(path)
    return StorageError(f"cannot write {subject}: {os.strerror(code)}{detail}", code)


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "", size: int | None = None) -> Iterator[None]:
    """Turn a failure of the storage inside the block into a `StorageError` (see
    `storage_error`); other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        problem = storage_error(err, path, what, size)
        if problem is None or problem is err:
            raise
        raise problem from None


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "wb", what: str = "", size: int | None = None
) -> Iterator[IO]:
    """Open a temporary file next to `path`; on success it atomically replaces `path`.

    On any failure the temporary file is removed and `path` is left as it was; a failure of
    the storage raises StorageError about `what` (`size` bytes: how much room it needs).
    """
    path = Path(path)
    with writing(path, what, size):
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview, what: str = "") -> None:
    """Write `data` to `path` atomically (StorageError about `what` if the storage fails)."""
    with atomic_open(path, "wb", what, len(data)) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "") -> None:
    """Write `text` (UTF-8) to `path` atomically (StorageError about `what` if the storage
    fails)."""
    atomic_write_bytes(path, text.encode("utf-8"), what)


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


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive lock for making `path` (a file or folder) during the block, so that
    of several processes wanting it, one makes it and the others then find it made; what
    makers killed midway left beside it is removed first (`remove_leftovers`).

    Yields whether the lock is held: False where its lock file (`.<name>.lock` beside `path`)
    cannot be made, e.g. in a read-only cache, or the file system has no locks; then nothing
    is removed, and atomic renames alone keep what is made whole. The kernel releases the
    lock of a process that dies, so a killed maker never blocks the next one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield False
        return
    try:
        held = _lock(fd, path)
        if held:
            remove_leftovers(path)
        yield held
    finally:
        os.close(fd)


def _lock(fd: int, path: Path) -> bool:
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process making %s", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # e.g. ENOLCK: a network file system without locks
        return False
    return True


def remove_leftovers(path: str | os.PathLike) -> None:
    """Remove what makers of `path` killed midway left beside it: `atomic_open`'s temporary
    files and temporary folders named `.<name>.*`. Only while holding `exclusive(path)` (which
    calls it): no one else is making it then."""
    path = Path(path)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if leftover.name == f".{path.name}.lock":
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()
