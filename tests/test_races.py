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

import numpy as np
import pytest

from retrain.bottlenecks.cache import BottleneckCache, file_content_key
from retrain.utils.atomic import exclusive, remove_leftovers
from tests.conftest import EXAMPLE_DIR, example_subset, retrain_args
from tests.fault_tools import (
    Fault,
    all_rows,
    child_env,
    inspect_cache,
    module_folders,
    read_metrics,
    read_only_view,
    run_retrain,
    start_retrain,
    watch,
)

SEED = int(time.time_ns() % 2**31)

HOLD_LOCK_CHILD = """
import sys, time
from retrain.utils.atomic import exclusive
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
    with exclusive(target) as held:  # taking the lock removes them
        assert held
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
    """Two runs at once, each converting the bundled module, its TFLite form and its frozen
    graph if it gets there first: all succeed alike, and the cache holds one of each."""
    photos = example_subset(tmp_path / "photos")
    env = {"RETRAIN_CACHE_DIR": str(tmp_path / "cache")}
    starts = [
        start_retrain(retrain_args(photos, tmp_path / f"run{i}", steps=20)[1:], env=env)
        for i in range(2)
    ]
    with ThreadPoolExecutor(len(starts)) as pool:
        runs = list(pool.map(lambda started: watch(started, timeout=900), starts))
    for run in runs:
        assert run.returncode == 0, run.summary()
        assert "Extraction backend: tflite" in run.stderr, run.summary()
    metrics = [read_metrics(tmp_path / f"run{i}" / "metrics.json") for i in range(2)]
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
    args = retrain_args(photos, tmp_path / "out", steps=20)[1:]  # cache empty too
    env = {"RETRAIN_CACHE_DIR": str(tmp_path / "cache")}
    # Early: while the module converts; late: while its TFLite form does (a seed picks one).
    delay = rng.choice([rng.uniform(4.0, 12.0), rng.uniform(12.0, 30.0)])
    killed = run_retrain(args, Fault(None, signal.SIGKILL, delay), timeout=900, env=env)
    left = _leftovers(tmp_path / "cache")
    print(f"killed after {delay:.1f} s: exit {killed.returncode}, leftovers {left}")
    run = run_retrain(args, timeout=900, env=env)
    assert run.returncode == 0, run.summary()
    _cache_holds_every_conversion(tmp_path / "cache")


# ------------------------------------------------------------------- one cache, many writers

WRITERS = 4


def _beam_args(photos: Path, bottlenecks: Path) -> list[str]:
    return [
        "-m",
        "retrain.cli.beam_extract",
        f"--image_dir={photos}",
        f"--bottleneck_dir={bottlenecks}",
        "--extraction_backend=tflite",
        "--extraction_batch_size=8",
        "--runner=DirectRunner",
    ]


def _every_row_matches(folder: Path, reference: dict[bytes, np.ndarray]) -> int:
    """Check every row of a cache folder, duplicates included, against the reference vectors
    bit for bit; returns how many rows there are."""
    state = inspect_cache(folder)
    assert state.bad_rows == 0 and state.strays == [], state.describe()
    dim = len(next(iter(reference.values())))
    rows = 0
    for location, content, vector, ok in all_rows(BottleneckCache(folder.parent, folder.name, dim)):
        assert ok and content in reference, location
        assert np.array_equal(vector, reference[content]), location
        rows += 1
    return rows


def _tflite_run_args(photos: Path, out: Path, bottlenecks: Path) -> list[str]:
    """A short run's arguments with its cache at `bottlenecks`, on the TFLite backend (which
    every writer uses, so vectors compare bit for bit)."""
    args = retrain_args(photos, out, steps=20)[1:]
    return [
        *(a for a in args if not a.startswith("--bottleneck_dir")),
        f"--bottleneck_dir={bottlenecks}",
        "--extraction_backend=tflite",
    ]


@pytest.mark.slow
def test_four_runs_and_a_beam_extraction_killed_at_random_leave_a_cache_that_is_completed_exactly(
    tmp_path,
):
    """Four `retrain` runs and one Beam extraction share one --bottleneck_dir; each is
    SIGKILLed or interrupted (SIGINT) at a random moment, or left to finish. A final run then
    computes exactly the images no shard holds, and every vector in the cache, whoever wrote
    it, equals an uninterrupted run's bit for bit (all on the TFLite backend)."""
    rng = random.Random(SEED)
    print(f"seed {SEED}")
    photos = EXAMPLE_DIR  # read only
    reference_run = run_retrain(
        _tflite_run_args(photos, tmp_path / "ref", tmp_path / "ref" / "bottlenecks")
    )
    assert reference_run.returncode == 0, reference_run.summary()
    (ref_folder,) = module_folders(tmp_path / "ref" / "bottlenecks")
    reference = inspect_cache(ref_folder).vectors
    assert len(reference) == 79

    shared = tmp_path / "shared"
    processes = []
    for i in range(WRITERS):
        processes.append(start_retrain(_tflite_run_args(photos, tmp_path / f"run{i}", shared)))
    beam = subprocess.Popen(
        [sys.executable, *_beam_args(photos, shared)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=child_env(),
    )
    faults = []
    for _ in range(WRITERS + 1):
        roll = rng.random()
        sig = signal.SIGKILL if roll < 0.5 else signal.SIGINT if roll < 0.8 else None
        faults.append(None if sig is None else Fault(None, sig, rng.uniform(5.0, 60.0)))
    print("faults:", [f.describe() if f else "none" for f in faults])
    timer = None
    if faults[-1] is not None:
        timer = threading.Timer(faults[-1].delay, beam.send_signal, (faults[-1].sig,))
        timer.start()
    with ThreadPoolExecutor(WRITERS) as pool:
        runs = list(pool.map(lambda pf: watch(pf[0], pf[1], timeout=1200), zip(processes, faults)))
    beam_status = beam.wait(timeout=1200)
    if timer is not None:
        timer.cancel()
    print("exits:", [run.returncode for run in runs], "beam:", beam_status)
    for run, fault in zip(runs, faults):
        assert run.returncode in ((0,) if fault is None else (0, 130, -signal.SIGKILL)), (
            run.summary()
        )
        assert "Traceback" not in run.stderr, run.summary()

    (folder,) = module_folders(shared)
    have = set(inspect_cache(folder).vectors)
    wanted = {file_content_key(p) for p in sorted(photos.glob("*/*.jpg"))}
    missing = len(wanted - have)
    final = run_retrain(_tflite_run_args(photos, tmp_path / "final", shared))
    assert final.returncode == 0, final.summary()
    assert f"79 images: {79 - missing} bottlenecks cached, {missing} to compute" in final.stderr
    rows = _every_row_matches(folder, reference)
    assert set(inspect_cache(folder).vectors) == wanted
    print(f"{missing} missing before the final run; {rows} rows in the cache")
