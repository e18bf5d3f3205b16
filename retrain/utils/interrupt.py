"""Ctrl-C that stops a run cleanly: at a safe point between units of work, not anywhere.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be,
including inside TensorFlow's C++/Python glue (an iterator reaching its end, for one). There it
can crash the process (SIGSEGV), surface as a RuntimeError with a traceback, or be swallowed so
that the run goes on to the end. Within `stop_at_safe_points()`, the first Ctrl-C is only noted
and `check()`, called between extraction batches, training calls and phases, raises the
KeyboardInterrupt; a second Ctrl-C raises at once, for a user who will not wait.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

# In the log's own format (a warning line).
_NOTICE = b"W Ctrl-C: stopping at the next safe point (press it again to stop at once)\n"
_requested = False
_notice_fd = -1  # the terminal's stderr, duplicated: fd 2 may be silenced (quiet TF import)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed since `stop_at_safe_points()` began."""
    if _requested:
        raise KeyboardInterrupt


def _note_interrupt(signum: int, frame: object) -> None:
    global _requested
    if _requested:
        raise KeyboardInterrupt
    _requested = True
    # os.write, not print: the handler may run while the main thread is inside a write to
    # sys.stderr (the progress bar), and Python's buffered streams are not reentrant.
    with contextlib.suppress(OSError):
        os.write(_notice_fd, (b"\n" if os.isatty(_notice_fd) else b"") + _NOTICE)


@contextlib.contextmanager
def stop_at_safe_points() -> Iterator[None]:
    """Defer Ctrl-C to the next `check()` (or the end of the block) while inside the block.

    Does nothing outside the main thread or where SIGINT already has a handler of its own
    (an application embedding retrain keeps its behaviour).
    """
    global _requested, _notice_fd
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    _requested = False
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
        _notice_fd = os.dup(sys.stderr.fileno())
    signal.signal(signal.SIGINT, _note_interrupt)
    try:
        yield
        check()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _requested = False
        if _notice_fd >= 0:
            os.close(_notice_fd)
            _notice_fd = -1
