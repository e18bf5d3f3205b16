"""Full disks and failing storage: every write retrain makes ends in one StorageError naming the
path, what was written and how much room it needed; nothing partial is left, and what was
finished before stays, so the next run with room goes on from there.

Fault injection (`FailingWrites`: the n-th write or fsync fails with ENOSPC or EIO) covers the
writers in this process; real runs on a small tmpfs (mounted where the test may) cover the
command, TensorFlow's own writers included. Caches that cannot be written (read-only bind
mounts) are read, and what a run computes meanwhile stays in memory.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrain.bottlenecks.cache import BottleneckCache
from retrain.errors import StorageError
from retrain.utils.atomic import atomic_write_bytes, format_bytes, storage_error, writing
from tests.conftest import EXAMPLE_DIR, example_subset, retrain_args
from tests.fault_tools import (
    TEMP_NAME,
    FailingWrites,
    child_env,
    read_only_view,
    resize_tmpfs,
    small_tmpfs,
)

DIM = 8


def _row(i: int) -> tuple[bytes, bytes, np.ndarray]:
    vector = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return i.to_bytes(16, "big"), (i + 10**6).to_bytes(16, "big"), vector


def _leftovers(folder: Path) -> list[str]:
    """Temporary files and vector files without an index: what no failed write may leave."""
    names = [p.name for p in folder.iterdir()]
    return sorted(
        n
        for n in names
        if TEMP_NAME.match(n) or (n.endswith(".vec.npy") and n[:-8] + ".idx.npy" not in names)
    )


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failed_write_names_path_what_and_size_and_keeps_the_old_file(
    tmp_path, monkeypatch, code
):
    target = tmp_path / "labels.txt"
    target.write_bytes(b"old\n")
    FailingWrites(code).install(monkeypatch)
    with pytest.raises(StorageError) as raised:
        atomic_write_bytes(target, b"x" * 5000, "labels")
    message = str(raised.value)
    assert message.startswith(f"cannot write labels {target}: {__import__('os').strerror(code)}")
    assert "needs 4.9 KB" in message
    assert ("free there" in message) == (code == errno.ENOSPC)
    assert raised.value.exit_code == 4
    assert target.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.txt"]


def test_a_failed_fsync_is_a_storage_error_too(tmp_path, monkeypatch):
    FailingWrites(errno.EIO, at="fsync").install(monkeypatch)
    with pytest.raises(StorageError, match="Input/output error"):
        atomic_write_bytes(tmp_path / "m.json", b"{}", "metrics")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_unchanged(tmp_path):
    with pytest.raises(PermissionError), writing(tmp_path, "x"):
        raise PermissionError(errno.EACCES, "Permission denied")
    assert storage_error(ValueError("bad"), tmp_path) is None
    # TensorFlow's errors carry the C library's text, not an errno.
    tf_like = RuntimeError("/x/ckpt_temp/part-0; No space left on device [Op:SaveV2]")
    assert storage_error(tf_like, tmp_path / "ckpt", "checkpoint").errno == errno.ENOSPC


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1024, 256000, 13 << 20, 5 << 40)] == [
        "0 B",
        "1023 B",
        "1.0 KB",
        "250.0 KB",
        "13.0 MB",
        "5120.0 GB",
    ]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_cache_writer_failing_at_the_nth_write_keeps_finished_shards(
    tmp_path, monkeypatch, code, n
):
    """Shards of 4 rows; each shard is two files (vectors, index) of one write each, so the
    n-th write falls on either file of any of the first three shards."""
    cache = BottleneckCache(tmp_path, "m", DIM, description={"test": True})
    failing = FailingWrites(code, n).install(monkeypatch)
    with pytest.raises(StorageError) as raised, cache.writer(shard_rows=4) as writer:
        for i in range(12):
            writer.add(*_row(i))
    what = "bottleneck vectors" if n % 2 else "bottleneck index"
    assert str(raised.value).startswith(f"cannot write {what} {tmp_path / 'm'}/")
    assert failing.writes == n  # the writer stopped at the failure: no retry of the same rows
    monkeypatch.undo()
    assert _leftovers(tmp_path / "m") == []
    kept = (n - 1) // 2 * 4  # the complete shards written before the failure
    reopened = BottleneckCache(tmp_path, "m", DIM)
    assert len(reopened) == kept and not reopened.warnings
    # The next run with room adds only what is missing, and every row reads back intact.
    missing = [i for i in range(12) if reopened.find(None, _row(i)[0]) is None]
    assert len(missing) == 12 - kept
    with reopened.writer(shard_rows=4) as writer:
        for i in missing:
            writer.add(*_row(i))
    final = BottleneckCache(tmp_path, "m", DIM)
    vectors, ok = final.read([final.find(None, _row(i)[0]) for i in range(12)])
    assert ok.all() and len(final) == 12
    np.testing.assert_array_equal(vectors, np.stack([_row(i)[2] for i in range(12)]))


# ----------------------------------------------------------------------------- real file systems


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retrain", *args[1:]],
        capture_output=True,
        text=True,
        env={**child_env(), **(env or {})},
        timeout=900,
    )


def _one_error_line(run: subprocess.CompletedProcess) -> str:
    """The run's single error line; fails on a traceback or on several error lines."""
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("retrain: error:")]
    assert len(errors) == 1, run.stderr
    return errors[0]


def test_cache_on_a_real_full_disk_keeps_its_shards_and_goes_on_with_room(tmp_path):
    """A real tmpfs with room for two shards of 4 1280-wide vectors (7 pages each), not three."""
    dim = 1280
    rows = [
        (i.to_bytes(16, "big"), (i + 99).to_bytes(16, "big"), np.full(dim, i, "f4"))
        for i in range(12)
    ]
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        cache = BottleneckCache(disk, "m", dim)
        with pytest.raises(StorageError) as raised, cache.writer(shard_rows=4) as writer:
            for row in rows:
                writer.add(*row)
        message = str(raised.value)
        assert message.startswith(f"cannot write bottleneck vectors {disk / 'm'}/")
        assert message.endswith("No space left on device (needs 20.1 KB, 8.0 KB free there)")
        assert _leftovers(disk / "m") == []
        assert len(BottleneckCache(disk, "m", dim)) == 8
        resize_tmpfs(disk, "1m")
        cache = BottleneckCache(disk, "m", dim)
        with cache.writer(shard_rows=4) as writer:
            for row in rows[8:]:
                writer.add(*row)
        final = BottleneckCache(disk, "m", dim)
        vectors, ok = final.read([final.find(None, row[0]) for row in rows])
        assert ok.all() and (vectors[:, 0] == np.arange(12)).all()


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_the_next_run_goes_on(tmp_path):
    """On a real tmpfs: first too small for the bottlenecks, then for the graph, then roomy."""
    photos = example_subset(tmp_path / "photos")
    with small_tmpfs(tmp_path / "disk", "24k") as disk:
        args = retrain_args(photos, disk, steps=20)
        cache = disk / "bottlenecks"

        run = _run(args)
        assert run.returncode == 4, run.stderr
        line = _one_error_line(run)
        assert line.startswith(f"retrain: error: cannot write bottleneck vectors {cache}/")
        assert "No space left on device (needs 60.1 KB," in line and "free there)" in line
        assert [p for p in cache.rglob("*") if p.is_file() and p.name != "module.json"] == []

        resize_tmpfs(disk, "400k")  # room for the cache and logs, not for the 13 MB graph
        run = _run(args)
        assert run.returncode == 4, run.stderr
        assert _one_error_line(run).startswith(
            f"retrain: error: cannot write frozen graph {disk / 'graph.pb'}: "
            "No space left on device"
        )
        assert "I Computed 12 bottlenecks" in run.stderr
        assert not (disk / "graph.pb").exists()
        assert [p.name for p in disk.iterdir() if TEMP_NAME.match(p.name)] == []

        resize_tmpfs(disk, "32m")
        run = _run(args)
        assert run.returncode == 0, run.stderr
        assert "0 to compute" in run.stderr  # the vectors of the failed run were kept
        assert (disk / "graph.pb").stat().st_size > 10 << 20


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "what"),
    [("checkpoint_path", "checkpoint"), ("summaries_dir", "TensorBoard summaries")],
)
def test_tensorflow_writers_on_a_full_disk_end_in_one_line(tmp_path, flag, what):
    """Checkpoints and TensorBoard logs are written by TensorFlow, not by retrain.utils.atomic."""
    photos = example_subset(tmp_path / "photos")
    out = tmp_path / "out"
    with small_tmpfs(tmp_path / "disk", "16k") as disk:
        args = [
            *retrain_args(photos, out, steps=2000),
            "--summaries_dir=",
            "--eval_step_interval=1",
            f"--{flag}={disk / 'target'}",
        ]
        run = _run(args)
        assert run.returncode == 4, run.stderr
        line = _one_error_line(run)
        assert line.startswith(f"retrain: error: cannot write {what} {disk / 'target'}: No space")
        if flag == "checkpoint_path":
            assert "needs 10.0 KB" in line  # the weights (2 classes); plain SGD keeps no slots
            assert list((disk / "target").iterdir()) == []  # no half-written checkpoint


# ----------------------------------------------------------------------------- read-only caches


def test_a_read_only_cache_is_read_and_new_vectors_stay_in_memory(tmp_path, caplog):
    source = tmp_path / "cache"
    with BottleneckCache(source, "m", DIM).writer(shard_rows=4) as writer:
        for i in range(8):
            writer.add(*_row(i))
    files = sorted(p.name for p in (source / "m").iterdir())
    with read_only_view(source, tmp_path / "view") as view:
        cache = BottleneckCache(view, "m", DIM, description={"would be": "module.json"})
        assert cache.read_only and len(cache) == 8 and not cache.warnings
        with cache.writer(shard_rows=3) as writer:
            for i in range(8, 12):
                writer.add(*_row(i))
        assert len(cache.warnings) == 1 and "kept in memory only" in cache.warnings[0]
        assert cache.warnings[0].startswith(f"bottleneck cache: cannot write {view / 'm'} (")
        assert caplog.text.count("kept in memory only") == 1
        vectors, ok = cache.read([cache.find(_row(i)[1], None) for i in range(12)])
        assert ok.all()
        np.testing.assert_array_equal(vectors, np.stack([_row(i)[2] for i in range(12)]))
        assert len(BottleneckCache(view, "m", DIM)) == 8  # nothing was kept on disk
        # A module the read-only cache has no folder for: every vector stays in memory.
        other = BottleneckCache(view, "other", DIM)
        with other.writer() as writer:
            writer.add(*_row(0))
        assert len(other) == 1
    assert sorted(p.name for p in (source / "m").iterdir()) == files


def test_a_read_only_cache_folder_passes_validation(tmp_path):
    from dataclasses import replace

    from retrain.config import CacheConfig, ModuleConfig, OutputsConfig, RetrainConfig
    from retrain.errors import ConfigError

    photos = example_subset(tmp_path / "photos", per_class=1)
    (tmp_path / "cache").mkdir()
    base = RetrainConfig(image_dir=str(photos), cache=CacheConfig(bottleneck_dir=None))
    with read_only_view(tmp_path / "cache", tmp_path / "view") as view:
        replace(base, cache=CacheConfig(bottleneck_dir=str(view))).validate()
        replace(base, module=ModuleConfig(cache_dir=str(view))).validate()
        # An output can still not go there, nor a cache folder that does not exist yet.
        for config in (
            replace(base, outputs=OutputsConfig(summaries_dir=str(view))),
            replace(base, cache=CacheConfig(bottleneck_dir=str(view / "new"))),
        ):
            with pytest.raises(ConfigError, match="cannot write there: Read-only file system"):
                config.validate()


@pytest.mark.slow
def test_a_run_on_read_only_caches_computes_what_is_missing_in_memory(tmp_path):
    """A bottleneck cache and a module cache filled by one run, then shared read-only: the
    next run, with two new photos, reads both and keeps the two new vectors in memory. The
    module cache lacks the frozen graph, which the run then makes for itself."""
    from retrain.models.module_cache import default_cache_dir

    photos = example_subset(tmp_path / "photos")
    first = _run(retrain_args(photos, tmp_path / "first", steps=20))
    assert first.returncode == 0, first.stderr
    for label in ("daisy", "roses"):
        shutil.copy(sorted((EXAMPLE_DIR / label).iterdir())[-1], photos / label)
    cache = tmp_path / "first" / "bottlenecks"
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    out = tmp_path / "second"
    modules = tmp_path / "module_cache"
    for part in ("modules", "tflite"):
        shutil.copytree(default_cache_dir() / part, modules / part, ignore=_no_lock_files)
    with (
        read_only_view(cache, tmp_path / "cache_view") as cache_view,
        read_only_view(modules, tmp_path / "module_view") as module_view,
    ):
        args = retrain_args(photos, out, steps=20)
        args = [a for a in args if not a.startswith("--bottleneck_dir")]
        run = _run([*args, f"--bottleneck_dir={cache_view}", f"--module_cache_dir={module_view}"])
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "error:" not in run.stderr, run.stderr
    assert "14 images: 12 bottlenecks cached, 2 to compute" in run.stderr
    assert run.stderr.count("kept in memory only") == 1, run.stderr
    assert "cannot keep the frozen module" in run.stderr
    assert "Computed 2 bottlenecks" in run.stderr
    assert (out / "graph.pb").exists()
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before


def _no_lock_files(folder: str, names: list[str]) -> list[str]:
    return [name for name in names if name.endswith(".lock")]
