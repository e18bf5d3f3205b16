"""Fault injection for the `retrain` command: run it as a real process, interrupt it on cue.

`run_retrain` starts `python -m retrain`, reads its stderr line by line, and when a line matches a
`Fault`'s trigger (or a fixed time after start), sends a signal, at once or after a delay.
`inspect_cache` opens a bottleneck cache folder the way retrain does and checks every row.
The two `*_CHILD` scripts are tiny writers used to kill the storage layer at random moments.

Nothing here imports TensorFlow at module level; the helpers that need it import it lazily.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain.bottlenecks.cache import BottleneckCache, Location

ROOT = Path(__file__).resolve().parent.parent

# Names that a killed writer may leave behind and that no reader mistakes for real files:
# atomic_open's temporary files (".<name>.<random>.tmp").
TEMP_NAME = re.compile(r"^\..+\.tmp$")


# ----------------------------------------------------------------------------- running retrain


@dataclass
class Fault:
    """Send `sig` `delay` seconds after the first stderr line matching `trigger`.

    `trigger` is a regular expression or a predicate on one line; with `trigger=None`, `delay`
    counts from the start of the process instead.
    """

    trigger: str | Callable[[str], bool] | None
    sig: int = signal.SIGKILL
    delay: float = 0.0

    def matches(self, line: str) -> bool:
        if callable(self.trigger):
            return self.trigger(line)
        return re.search(self.trigger, line) is not None

    def describe(self) -> str:
        name = signal.Signals(self.sig).name
        if self.trigger is None:
            where = "after start"
        else:
            where = f"after the line {getattr(self.trigger, 'description', self.trigger)!r}"
        return f"{name} {self.delay:.2f} s {where}"


def progress_at_least(count: int) -> Callable[[str], bool]:
    """A trigger: the bottleneck progress bar (on a terminal) shows at least `count` images."""

    def trigger(line: str) -> bool:
        match = re.search(r"Bottlenecks:.*?(\d+)/(\d+)", line)
        return match is not None and int(match.group(1)) >= count

    trigger.description = f"Bottlenecks: >= {count} done"
    return trigger


@dataclass
class RunResult:
    """What one retrain process did: exit status, stderr lines (with arrival times), the fault."""

    args: list[str]
    returncode: int
    lines: list[str]
    times: list[float]
    fault: str | None = None
    fault_sent_at: float | None = None
    timed_out: bool = False

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def time_of(self, pattern: str) -> float | None:
        """Arrival time (seconds after start) of the first line matching `pattern`."""
        for line, at in zip(self.lines, self.times):
            if re.search(pattern, line):
                return at
        return None

    def search(self, pattern: str) -> re.Match | None:
        """The first match of `pattern` in any stderr line."""
        for line in self.lines:
            match = re.search(pattern, line)
            if match:
                return match
        return None

    def matching(self, pattern: str) -> list[str]:
        return [line for line in self.lines if re.search(pattern, line)]

    def summary(self, tail: int = 25) -> str:
        """For assertion messages: how it ended, the fault, and the last lines of stderr."""
        head = f"exit {self.returncode}"
        if self.fault:
            head += f"; fault: {self.fault} (sent at {self.fault_sent_at})"
        if self.timed_out:
            head += "; TIMED OUT"
        return head + "\n" + "\n".join(self.lines[-tail:])


def child_env() -> dict[str, str]:
    """The environment for child processes: this checkout first on the path, TF quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.pop("RETRAIN_FAULT_SEED", None)
    return env


class Started:
    """A started retrain process and where its stderr can be read."""

    def __init__(
        self,
        args: list[str],
        tty: bool = False,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.args = args
        slave = None
        if tty:  # a terminal, so that retrain shows its progress bar
            self.fd, slave = pty.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "retrain", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if slave is None else slave,
            env={**child_env(), **(env or {})},
            cwd=cwd,
        )
        if slave is None:
            self.fd = self.proc.stderr.fileno()
        else:
            os.close(slave)

    def lines(self) -> Iterator[str]:
        """stderr split at newlines and carriage returns (progress bar redraws)."""
        pending = b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                chunk = b""
            if not chunk:
                break
            *complete, pending = re.split(rb"[\r\n]", pending + chunk)
            for line in complete:
                if line:
                    yield line.decode("utf-8", "replace")
        if pending:
            yield pending.decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        else:
            os.close(self.fd)


def start_retrain(
    args: list[str],
    tty: bool = False,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Started:
    """Start `python -m retrain args` (on a pseudo-terminal if `tty`), with `env` added."""
    return Started(args, tty, cwd, env)


def run_retrain(
    args: list[str],
    fault: Fault | None = None,
    timeout: float = 300.0,
    tty: bool = False,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> RunResult:
    """Run retrain with `args` (and `env` added) to the end, injecting `fault` if given."""
    return watch(start_retrain(args, tty, cwd, env), fault, timeout)


def watch(started: Started, fault: Fault | None = None, timeout: float = 300.0) -> RunResult:
    """Read a started run's stderr to the end, injecting `fault`; kill it after `timeout` s."""
    proc = started.proc
    start = time.monotonic()
    result = RunResult(args=started.args, returncode=0, lines=[], times=[])
    timers: list[threading.Timer] = []

    def send(sig: int) -> None:
        if proc.poll() is None:
            result.fault_sent_at = round(time.monotonic() - start, 3)
            proc.send_signal(sig)

    def expire() -> None:
        if proc.poll() is None:
            result.timed_out = True
            proc.kill()

    def arm() -> None:
        result.fault = fault.describe()
        if fault.delay <= 0:
            send(fault.sig)
        else:
            timer = threading.Timer(fault.delay, send, (fault.sig,))
            timer.start()
            timers.append(timer)

    watchdog = threading.Timer(timeout, expire)
    watchdog.start()
    armed = False
    if fault is not None and fault.trigger is None:
        arm()
        armed = True
    try:
        for line in started.lines():
            result.lines.append(line)
            result.times.append(round(time.monotonic() - start, 3))
            if not armed and fault is not None and fault.matches(line):
                arm()
                armed = True
        result.returncode = proc.wait()
    finally:
        watchdog.cancel()
        for timer in timers:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        started.close()
    return result


def read_metrics(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def phase_window(run: RunResult, begin: str, end: str) -> float:
    """Seconds between the lines matching `begin` and `end` in a finished run."""
    t0, t1 = run.time_of(begin), run.time_of(end)
    assert t0 is not None and t1 is not None, f"phase markers missing:\n{run.summary()}"
    return max(t1 - t0, 0.05)


def unexpected_files(folder: Path, expected: set[str]) -> list[str]:
    """Plain files in `folder` that are neither expected nor recognisable temporary files."""
    return sorted(
        p.name
        for p in Path(folder).iterdir()
        if p.is_file() and p.name not in expected and not TEMP_NAME.match(p.name)
    )


# ----------------------------------------------------------------------------- the cache


@dataclass
class CacheState:
    """Everything in one module's cache folder, each row checked."""

    folder: Path
    warnings: list[str]
    rows: int = 0
    bad_rows: int = 0
    vectors: dict[bytes, np.ndarray] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)  # vector files without an index
    strays: list[str] = field(default_factory=list)  # files no cache writer makes

    def describe(self) -> str:
        return (
            f"{self.folder}: {self.rows} rows, {self.bad_rows} bad, {len(self.vectors)} images, "
            f"warnings {self.warnings}, orphans {self.orphans}, strays {self.strays}"
        )


def module_folders(bottleneck_dir: Path) -> list[Path]:
    return sorted(p for p in Path(bottleneck_dir).iterdir() if p.is_dir())


def inspect_cache(folder: Path, feature_dim: int | None = None) -> CacheState:
    """Open one module folder with BottleneckCache and check every row's checksum.

    Note: like any run, opening it sets damaged shards aside (renames their index).
    """
    folder = Path(folder)
    if feature_dim is None:
        feature_dim = json.loads((folder / "module.json").read_text())["feature_dim"]
    cache = BottleneckCache(folder.parent, folder.name, feature_dim)
    state = CacheState(folder=folder, warnings=list(cache.warnings))
    for _, content, vector, ok in all_rows(cache):
        state.rows += 1
        if ok:
            state.vectors.setdefault(content, vector)
        else:
            state.bad_rows += 1
    for path in folder.iterdir():
        name = path.name
        if name.endswith(".vec.npy"):
            if not path.with_name(name[: -len(".vec.npy")] + ".idx.npy").exists():
                state.orphans.append(name)
        elif not (
            name == "module.json"
            or name.endswith(".idx.npy")
            or name.endswith(".damaged")
            or TEMP_NAME.match(name)
        ):
            state.strays.append(name)
    return state


def all_rows(cache: BottleneckCache) -> Iterator[tuple[Location, bytes, np.ndarray, bool]]:
    """Every stored row: (location, content key, vector, passed its checksum), via the
    cache's own reader."""
    locations = [
        Location(number, row)
        for number, shard in enumerate(cache.shards)
        for row in range(len(shard.index))
    ]
    if not locations:
        return
    vectors, ok = cache.read(locations)
    for i, location in enumerate(locations):
        entry = cache.shards[location.shard].index[location.row]
        yield location, bytes(entry["content"]), vectors[i], bool(ok[i])


def vector_mismatches(
    state: CacheState, reference: dict[bytes, np.ndarray], atol: float = 2e-4
) -> list[str]:
    """Rows of `state` that are unknown to `reference` or differ from it."""
    problems = []
    for key, vector in state.vectors.items():
        if key not in reference:
            problems.append(f"{key.hex()}: not in the reference cache")
        elif not np.allclose(vector, reference[key], rtol=2e-4, atol=atol):
            diff = float(np.abs(vector - reference[key]).max())
            problems.append(f"{key.hex()}: differs from the reference by {diff:g}")
    return problems


def copy_cache_resharded(source: Path, target_root: Path, shard_rows: int) -> list[Path]:
    """Copy one module folder's rows into `target_root` as shards of `shard_rows` rows.

    Returns the new index files in the order the cache reads them.
    """
    source = Path(source)
    feature_dim = json.loads((source / "module.json").read_text())["feature_dim"]
    original = BottleneckCache(source.parent, source.name, feature_dim)
    copy = BottleneckCache(target_root, source.name, feature_dim, description={"copy": True})
    with copy.writer(shard_rows) as writer:
        for location, _, vector, ok in all_rows(original):
            assert ok, f"{source}: row {location} fails its checksum"
            entry = original.shards[location.shard].index[location.row]
            writer.add(bytes(entry["content"]), bytes(entry["file"]), vector)
    return sorted((Path(target_root) / source.name).glob("*.idx.npy"))


def flip_byte_in_row(index_path: Path, row: int, byte: int = 5) -> None:
    """Flip one byte of one stored vector (the data is at the end of the .npy file)."""
    vec_path = index_path.with_name(index_path.name[: -len(".idx.npy")] + ".vec.npy")
    vectors = np.load(vec_path, mmap_mode="r")
    rows, dim = vectors.shape
    del vectors
    data = bytearray(vec_path.read_bytes())
    offset = len(data) - rows * dim * 4 + row * dim * 4 + byte
    data[offset] ^= 0xFF
    vec_path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- frozen graphs


def _tensorflow():
    from retrain.utils.runtime import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf

    return tf


def load_test_images(paths: list[Path], size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """Images as the exported graph takes them: float32 [n, h, w, 3] in [0, 1]."""
    _tensorflow()
    from retrain.data.decode import decode_image
    from retrain.data.preprocess import to_module_input

    return np.stack([to_module_input(decode_image(p, size), size).numpy() for p in paths])


def graph_scores(graph_path: Path, images: np.ndarray) -> np.ndarray:
    """Run a frozen graph as a TF1 client does: Placeholder -> final_result."""
    tf = _tensorflow()

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(Path(graph_path).read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        return session.run("final_result:0", {"Placeholder:0": images})


# ----------------------------------------------------------------------------- a second module


def save_tiny_module(path: Path) -> None:
    """A small TF2 image feature-vector SavedModel: 4x4 average-pooled colours (48 features)."""
    tf = _tensorflow()

    class TinyModule(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)])
        def __call__(self, images):
            pooled = tf.nn.avg_pool2d(images, ksize=56, strides=56, padding="VALID")
            return tf.reshape(pooled, [-1, 4 * 4 * 3])

    tf.saved_model.save(TinyModule(), str(path))


def module_features(module_path: Path, paths: list[Path]) -> dict[bytes, np.ndarray]:
    """Content key -> feature vector, computed here with retrain's own input pipeline."""
    tf = _tensorflow()

    from retrain.bottlenecks.cache import file_content_key
    from retrain.bottlenecks.extract import decoded_batches

    module = tf.saved_model.load(str(module_path))
    errors: dict[int, str] = {}
    out = {}
    for positions, images, ok in decoded_batches(paths, (224, 224), 16, errors):
        feats = module(images).numpy()
        for j, position in enumerate(positions.numpy()):
            assert ok[j], errors
            out[file_content_key(paths[int(position)])] = feats[j]
    return out


# ----------------------------------------------------------------------------- storage children


def shard_row(prefix: int, i: int, dim: int) -> tuple[bytes, bytes, np.ndarray]:
    """Content key, file key and vector of row `i` written by writer `prefix`."""
    content = prefix.to_bytes(4, "big") + i.to_bytes(12, "big")
    file = b"F" + content[1:]
    vector = np.random.default_rng([prefix, i]).standard_normal(dim).astype(np.float32)
    return content, file, vector


def decode_row_key(content: bytes) -> tuple[int, int]:
    return int.from_bytes(content[:4], "big"), int.from_bytes(content[4:], "big")


SHARD_WRITER_CHILD = """
import sys
from retrain.bottlenecks.cache import BottleneckCache
from tests.fault_tools import shard_row
root, prefix, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
writer = BottleneckCache(root, "m", dim).writer(shard_rows=3)
print("ready", flush=True)
i = 0
while True:
    writer.add(*shard_row(prefix, i, dim))
    i += 1
"""

ATOMIC_WRITER_CHILD = """
import sys
from retrain.utils.atomic import atomic_write_bytes
from tests.fault_tools import atomic_payloads
path, size = sys.argv[1], int(sys.argv[2])
payloads = atomic_payloads(size)
print("ready", flush=True)
i = 0
while True:
    atomic_write_bytes(path, payloads[i % len(payloads)])
    i += 1
"""


def atomic_payloads(size: int) -> list[bytes]:
    """Three distinct payloads of different lengths, each recognisable in full."""
    return [bytes([65 + k]) * (size + k * 4099) for k in range(3)]


def start_python(code: str, *args: str) -> subprocess.Popen:
    """Start `python -c code args...`; returns once it printed its 'ready' line."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        cwd=ROOT,
    )
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"child did not start: {line!r} {err.decode(errors='replace')}")
    return proc


def kill_after(proc: subprocess.Popen, delay: float) -> int:
    """SIGKILL `proc` after `delay` seconds; returns its exit status."""
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    status = proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return status


# ----------------------------------------------------------------------------- failing storage


class FailingWrites:
    """Make the `n`-th write() (1-based, over every file `retrain.utils.atomic` opens) fail with
    OSError `code` after writing half its data, as a file system that fills up midway does;
    `at="fsync"` makes the `n`-th fsync fail instead. Use with pytest's monkeypatch::

        failing = FailingWrites(errno.ENOSPC, n=2).install(monkeypatch)
    """

    def __init__(self, code: int, n: int = 1, at: str = "write"):
        self.code, self.n, self.at = code, n, at
        self.writes = self.fsyncs = 0

    def install(self, monkeypatch) -> FailingWrites:
        real_fdopen, real_fsync = os.fdopen, os.fsync
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FailingFile(real_fdopen(*a, **k), self))
        monkeypatch.setattr(os, "fsync", lambda fd: self._fsync(real_fsync, fd))
        return self

    def error(self) -> OSError:
        return OSError(self.code, os.strerror(self.code))

    def _fsync(self, real_fsync, fd: int) -> None:
        self.fsyncs += 1
        if self.at == "fsync" and self.fsyncs == self.n:
            raise self.error()
        real_fsync(fd)


class _FailingFile:
    """A file object whose writes count towards a FailingWrites plan."""

    def __init__(self, handle, plan: FailingWrites):
        self._handle, self._plan = handle, plan

    def write(self, data) -> int:
        self._plan.writes += 1
        if self._plan.at == "write" and self._plan.writes == self._plan.n:
            self._handle.write(memoryview(data)[: len(memoryview(data)) // 2])
            self._handle.flush()
            raise self._plan.error()
        return self._handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.__exit__(*exc)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "200k") mounted at `path` for the block; pytest.skip where
    this process may not mount one (not root, or in a container without the capability)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace')}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize_tmpfs(path: Path, size: str) -> None:
    """Give a mounted `small_tmpfs` another size (its files stay)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@contextlib.contextmanager
def read_only_view(source: Path, view: Path) -> Iterator[Path]:
    """`source` seen through a read-only bind mount at `view` for the block, as a cache shared
    on a read-only mount is (even root cannot write there); pytest.skip where this process may
    not mount."""
    import pytest

    view.mkdir(parents=True, exist_ok=True)
    for command in (
        ["mount", "--bind", str(source), str(view)],
        ["mount", "-o", "remount,bind,ro", str(view)],
    ):
        done = subprocess.run(command, capture_output=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(view)], capture_output=True)
            pytest.skip(f"cannot mount read-only here: {done.stderr.decode(errors='replace')}")
    try:
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)
