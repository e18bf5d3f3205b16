"""Process-level set-up shared by the command-line tools."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any


def import_tensorflow_quietly() -> None:
    """Import TensorFlow without its start-up chatter (CUDA probing, absl init notices).

    Those lines come from C++ and ignore Python logging, so stderr is silenced at the file
    descriptor for the duration of the import; if the import fails, what it printed is shown.
    Set TF_CPP_MIN_LOG_LEVEL to 0, 1 or 2 to see TensorFlow's messages.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"] != "3":
        with _without_sklearn():
            import tensorflow  # noqa: F401

        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture, _without_sklearn():
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except Exception:  # a failed import: show why (not on Ctrl-C: that is no failure)
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _without_sklearn() -> Iterator[None]:
    """Hide scikit-learn while TensorFlow imports: TensorFlow imports Keras, whose scikit-learn
    wrappers (which retrain never uses) import scikit-learn when it is installed (the audit
    extra brings it), about a second of every start-up. Afterwards it imports as usual."""
    if "sklearn" in sys.modules:
        yield
        return
    sys.modules["sklearn"] = None  # type: ignore[assignment]  # makes `import sklearn` fail
    try:
        yield
    finally:
        if sys.modules.get("sklearn", 0) is None:
            del sys.modules["sklearn"]


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence C++ chatter on file descriptor 2 (the MLIR converter's warnings, LiteRT's
    XNNPACK notice) unless TF_CPP_MIN_LOG_LEVEL asks for TensorFlow's messages (0, 1 or 2)."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") != "3":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        sink = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):
        yield
        return
    try:
        os.dup2(sink, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(sink)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def return_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``); nothing
    where the C library has no such call.

    glibc keeps memory freed by TensorFlow's and LiteRT's threads in per-thread arenas, so a
    long extraction's resident memory climbs by a few hundred MB of pages nothing uses.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc; Windows has no CDLL(None)
        return None
