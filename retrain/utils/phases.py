"""Where a run's time goes: a clock that adds up named phases, and the process's age."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseClock:
    """Seconds per named phase, in the order the phases first ran; a phase entered twice adds
    up. `elapsed()` is the time since the clock was made."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (also when it raises)."""
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begun

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def process_age() -> float | None:
    """Seconds since this process started (Python's own start-up and every import included),
    from /proc; None where /proc is not there."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22 (starttime, in clock ticks after boot) comes after the ")" that ends
            # the command name, which may itself hold spaces.
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
