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

# What `import tensorflow` imports and no run uses, hidden during the import: Keras 3's
# optimizers (TensorFlow imports them eagerly for its SavedModel registry; retrain's optimizers
# are tf_keras', Keras 2), about 1.2 s of CPU and 70 MB; scikit-learn, which Keras' wrappers
# import when installed (the audit extra), about 1 s.
UNUSED_BY_TENSORFLOW = ("keras.src.optimizers", "sklearn")
# What tf_keras imports and its optimizers do not use: pandas, 0.4 s of CPU and 60 MB.
UNUSED_BY_TF_KERAS = ("pandas",)


# glibc's mallopt parameter, and the arenas a run keeps (see limit_malloc_arenas): with 2,
# the export check's peak was 50-60 MB lower (256 clothing photos, batches of 8).
M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def import_tensorflow_quietly() -> None:
    """Import TensorFlow without its start-up chatter (CUDA probing, absl init notices).

    Those lines come from C++ and ignore Python logging, so stderr is silenced at the file
    descriptor for the duration of the import; if the import fails, what it printed is shown.
    Set TF_CPP_MIN_LOG_LEVEL to 0, 1 or 2 to see TensorFlow's messages.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"] != "3":
        with hidden_modules(*UNUSED_BY_TENSORFLOW):
            import tensorflow  # noqa: F401

        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture, hidden_modules(*UNUSED_BY_TENSORFLOW):
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
def hidden_modules(*names: str) -> Iterator[None]:
    """Make `import name` fail (ImportError) for each of `names` not yet imported, for the
    duration of the block; afterwards they import as usual.

    For optional imports of libraries retrain never uses through them: the library that
    tries them goes on without (see UNUSED_BY_TENSORFLOW)."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` fail
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


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


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Let the C heap keep at most `arenas` arenas (glibc's ``mallopt(M_ARENA_MAX)``, as
    MALLOC_ARENA_MAX would) for the threads started from now on; True if it could.

    glibc gives each new thread its own arena, up to 8 per CPU, and memory freed in one arena
    serves no other: TensorFlow's, tf.data's and LiteRT's threads each pile up their own free
    pages, which shows as a run's peak. A call at the start of a process, before the threads.
    """
    mallopt = _libc_function("mallopt")
    return mallopt is not None and mallopt(M_ARENA_MAX, arenas) == 1


def _malloc_trim() -> Any:
    return _libc_function("malloc_trim")


@functools.cache
def _libc_function(name: str) -> Any:
    """The C library's function `name`, or None where it has none (not glibc, Windows)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError, TypeError):  # Windows has no CDLL(None)
        return None
