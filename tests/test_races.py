"""Runs racing for one cache: the module cache's conversions made once by one of several runs
started at once, and remade after a kill; `atomic.exclusive`, the lock that orders them.

The tests with real `retrain` runs convert the bundled module from scratch (about a minute
each on two cores) and are slow-marked; the lock itself is tested with real processes here.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from retrain.atomic import exclusive, remove_leftovers
from tests.conftest import example_subset, retrain_args
from tests.fault_tools import (
    Fault,
    child_env,
    read_metrics,
    read_only_view,
    run_retrain,
    start_retrain,
    watch,
)

SEED = int(time.time_ns() % 2**31)

HOLD_LOCK_CHILD = """
import sys, time
from retrain.atomic import exclusive
with exclusive(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_lock_held_by_a_process_is_waited_for_and_freed_when_it_is_killed(tmp_path):
    target = tmp_path / "cache" / "model.tflite"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK_CHILD, str(target)],
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    assert holder.stdout.readline().strip() == b"holding"
    acquired = threading.Event()

    def wait_for_lock() -> None:
        with exclusive(target) as held:
            assert held
            acquired.set()

    waiter = threading.Thread(target=wait_for_lock)
    waiter.start()
    time.sleep(0.5)
    assert not acquired.is_set()  # the holder makes the file; the waiter waits
    holder.send_signal(signal.SIGKILL)  # killed midway: the kernel frees its lock
    holder.wait()
    holder.stdout.close()
    waiter.join(timeout=10)
    assert acquired.is_set()


def test_leftovers_of_killed_makers_are_removed_and_nothing_else(tmp_path):
    target = tmp_path / "m-v1.tflite"
    keep = [target, tmp_path / "m-v1.tflite.verified", tmp_path / ".m-v1.tflite.lock"]
    keep += [tmp_path / ".other.tflite.x.tmp", tmp_path / "m-v1.tflitex"]
    for path in keep:
        path.write_bytes(b"kept")
    (tmp_path / ".m-v1.tflite.abc123.tmp").write_bytes(b"half")  # atomic_open's
    staging = tmp_path / ".m-v1.tflite.k2j3"  # a staging folder, as module conversion makes
    staging.mkdir()
    (staging / "saved_model.pb").write_bytes(b"half")
    with exclusive(target):
        remove_leftovers(target)
    assert sorted(tmp_path.iterdir()) == sorted(keep)


def test_a_read_only_cache_is_used_without_the_lock(tmp_path):
    (tmp_path / "cache").mkdir()
    with read_only_view(tmp_path / "cache", tmp_path / "view") as view:
        with exclusive(view / "model.tflite") as held:
            assert not held
        remove_leftovers(view / "model.tflite")  # nothing to remove, nothing raised


def _leftovers(cache: Path) -> list[str]:
    """Anything in a module cache but the conversions and their lock files."""
    return sorted(
        str(p.relative_to(cache))
        for p in cache.glob("*/*")
        if p.name.startswith(".") and not p.name.endswith(".lock")
    )


def _cache_holds_every_conversion(cache: Path) -> None:
    (module,) = [p for p in (cache / "modules").iterdir() if not p.name.startswith(".")]
    assert (module / "saved_model.pb").is_file() and (module / "retrain_module.json").is_file()
    assert len(list((cache / "tflite").glob("*.tflite"))) == 1
    assert len(list((cache / "tflite").glob("*.tflite.verified"))) == 1
    assert len(list((cache / "frozen").glob("*.pb"))) == 1
    assert _leftovers(cache) == []


@pytest.mark.slow
def test_runs_started_at_once_on_an_empty_module_cache_all_succeed(tmp_path):
    """Three runs at once, each converting the bundled module, its TFLite form and its frozen
    graph if it gets there first: all succeed alike, and the cache holds one of each."""
    photos = example_subset(tmp_path / "photos")
    env = {"RETRAIN_CACHE_DIR": str(tmp_path / "cache")}
    starts = [
        start_retrain(retrain_args(photos, tmp_path / f"run{i}", steps=20)[1:], env=env)
        for i in range(3)
    ]
    with ThreadPoolExecutor(len(starts)) as pool:
        runs = list(pool.map(lambda started: watch(started, timeout=900), starts))
    for run in runs:
        assert run.returncode == 0, run.summary()
        assert "Extraction backend: tflite" in run.stderr, run.summary()
    metrics = [read_metrics(tmp_path / f"run{i}" / "metrics.json") for i in range(3)]
    assert len({m["test_accuracy"] for m in metrics}) == 1
    _cache_holds_every_conversion(tmp_path / "cache")
    waited = sum("Waiting for another process making" in run.stderr for run in runs)
    print(f"{waited} of the runs waited for another's conversion")


@pytest.mark.slow
def test_a_conversion_killed_midway_is_redone_by_the_next_run(tmp_path):
    """SIGKILL at a random moment of a first run on an empty module cache (converting the
    module, then its TFLite form), then a run to the end: it uses what is complete, remakes
    the rest and leaves no leftovers."""
    rng = random.Random(SEED)
    print(f"seed {SEED}")
    photos = example_subset(tmp_path / "photos")
    for attempt in range(2):
        args = retrain_args(photos, tmp_path / f"out{attempt}", steps=20)[1:]  # cache empty too
        env = {"RETRAIN_CACHE_DIR": str(tmp_path / f"cache{attempt}")}
        delay = rng.uniform(4.0, 12.0) if attempt == 0 else rng.uniform(12.0, 30.0)
        killed = run_retrain(args, Fault(None, signal.SIGKILL, delay), timeout=900, env=env)
        left = _leftovers(tmp_path / f"cache{attempt}")
        print(f"killed after {delay:.1f} s: exit {killed.returncode}, leftovers {left}")
        run = run_retrain(args, timeout=900, env=env)
        assert run.returncode == 0, run.summary()
        _cache_holds_every_conversion(tmp_path / f"cache{attempt}")
