"""The bottleneck cache: feature vectors of images, stored in immutable, checksummed shards.

Layout under --bottleneck_dir:

    <bottleneck_dir>/<module key>/          one folder per module (weights + preprocessing)
        module.json                         what the folder holds, for people
        <shard>.vec.npy                     float32 (or float16) [rows, dim], memory-mappable
        <shard>.idx.npy                     per row: content key, file key, CRC-32 of the row

An image's *content key* is a hash of its bytes, so a changed file never reuses a stale vector and
a moved or copied photo reuses its vector. Its *file key* hashes (real path, size, mtime), which
lets a run with a filled cache find vectors without reading the images again.

Each shard is written under a temporary name, fsynced, and renamed: the vector file first, the
index last. A run killed at any moment therefore leaves only complete shards (an orphaned vector
file without an index is ignored and cleaned up later), and any number of runs can share the
folder, each adding its own shards; a vector present twice is harmless. Every row carries a
CRC-32 that is checked when the row is read; a shard or row that fails is reported and
recomputed, never used.

A folder that cannot be written (a cache shared on a read-only mount) is only read: vectors
computed meanwhile are kept in memory for the run (`MemoryShard`), with a warning that they
cannot be kept.

The index of every shard is memory-mapped and its keys are kept in sorted NumPy arrays (about
50 bytes per entry), so finding a million images' vectors is a vectorised search, not a
million-entry dict.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrain.errors import StorageError
from retrain.utils.atomic import atomic_write_bytes, atomic_write_text, check_writable_dir

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
KEY_BYTES = 16
# Raw bytes ("V"), not strings ("S"): numpy strips trailing zero bytes from "S" values.
INDEX_DTYPE = np.dtype([("content", f"V{KEY_BYTES}"), ("file", f"V{KEY_BYTES}"), ("crc", "<u4")])
DEFAULT_SHARD_ROWS = 4096
# What vectors may be stored as: float16 halves long vectors (activations at a fine-tuning cut).
VECTOR_DTYPES = (np.dtype("<f4"), np.dtype("<f2"))
# A writer buffers a shard in memory, and three copies of it exist while it is written: long
# vectors (activations at a fine-tuning cut) get shards of fewer rows, so the buffer stays this
# small (a shard of 4096 Lite0 bottlenecks is 21 MB).
SHARD_BYTES = 24 << 20
# Orphaned vector files (a writer killed between its two renames) are removed after this long.
ORPHAN_AGE_SECONDS = 3600.0


def content_key(data: bytes) -> bytes:
    """Key of an image's bytes."""
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()


def file_content_key(path: str | os.PathLike) -> bytes:
    """Key of an image file's bytes, read in chunks."""
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


def file_key(path: str | os.PathLike) -> bytes:
    """Key of a file's identity and version: real path, size and modification time."""
    stat = os.stat(path)
    ident = b"\0".join(
        [
            os.fsencode(os.path.realpath(path)),
            str(stat.st_size).encode(),
            str(stat.st_mtime_ns).encode(),
        ]
    )
    return hashlib.blake2b(ident, digest_size=KEY_BYTES).digest()


def file_keys(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, dict[int, OSError]]:
    """The file key of each path as an array [n, 2] (see `key_array`), and by index the error
    of each file that could not be looked at (its row stays zero)."""
    keys = np.zeros((len(paths), 2), dtype=np.uint64)
    errors: dict[int, OSError] = {}
    for i, path in enumerate(paths):
        try:
            keys[i] = np.frombuffer(file_key(path), dtype=np.uint64)
        except OSError as err:
            errors[i] = err
    return keys, errors


def module_cache_key(module_fingerprint: str, preprocessing: str) -> str:
    """Folder name for one module and one preprocessing recipe."""
    text = f"v{CACHE_FORMAT_VERSION}\0{module_fingerprint}\0{preprocessing}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def row_crc(row: np.ndarray) -> int:
    """CRC-32 of one feature vector as stored: little-endian, in its own float type."""
    return zlib.crc32(np.ascontiguousarray(row, dtype=row.dtype.newbyteorder("<")).tobytes())


# A vector's place in the cache, for many at once: shard number (in BottleneckCache.shards)
# and row. NOWHERE (shard -1) marks "not cached".
LOCATION_DTYPE = np.dtype([("shard", "<i4"), ("row", "<i4")])
NOWHERE = np.array((-1, -1), dtype=LOCATION_DTYPE)


@dataclass(frozen=True, slots=True)
class Location:
    """Where one vector lives: shard number (in BottleneckCache.shards) and row."""

    shard: int
    row: int


def as_locations(locations: np.ndarray | Sequence[Location]) -> np.ndarray:
    """Locations as a LOCATION_DTYPE array (from such an array or a sequence of Location)."""
    if isinstance(locations, np.ndarray):
        return locations.astype(LOCATION_DTYPE, copy=False)
    return np.array(
        [(loc.shard, loc.row) if isinstance(loc, Location) else loc for loc in locations],
        dtype=LOCATION_DTYPE,
    )


def key_array(keys: Sequence[bytes]) -> np.ndarray:
    """16-byte keys as an array [n, 2] of uint64, the form the cache's index compares."""
    if not keys:
        return np.zeros((0, 2), np.uint64)
    return np.frombuffer(b"".join(keys), dtype=np.uint64).reshape(-1, 2).copy()


def _all_keys(shards: Sequence[Shard], name: str) -> np.ndarray:
    """Key column `name` ("content" or "file") of every shard's index, as [rows, 2] uint64."""
    columns = [np.ascontiguousarray(s.index[name]).view(np.uint64).reshape(-1, 2) for s in shards]
    return np.concatenate(columns) if columns else np.zeros((0, 2), np.uint64)


class _SortedKeys:
    """One kind of key (content or file) of every entry, sorted for vectorised lookup.

    A million entries take 24 MB (two uint64 halves and an entry number each), not the ~250 MB
    of a dict of bytes. Where a key occurs more than once the newest entry wins, so a vector
    recomputed after a failed checksum replaces the damaged one.
    """

    def __init__(self, keys: np.ndarray, entries: np.ndarray):
        order = np.lexsort((entries, keys[:, 1], keys[:, 0]))  # by key, then oldest first
        keys, entries = keys[order], entries[order]
        newest = np.ones(len(entries), dtype=bool)
        newest[:-1] = (keys[:-1] != keys[1:]).any(axis=1)
        self.high = np.ascontiguousarray(keys[newest, 0])
        self.low = np.ascontiguousarray(keys[newest, 1])
        self.entries = entries[newest]

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Entry number of each key [n, 2], or -1."""
        found = np.full(len(keys), -1, dtype=np.int64)
        if not len(keys) or not len(self.entries):
            return found
        first = np.searchsorted(self.high, keys[:, 0], side="left")
        last = np.searchsorted(self.high, keys[:, 0], side="right")
        # 64-bit halves of random hashes practically never collide: one candidate per key.
        single = np.flatnonzero(last - first == 1)
        hit = single[self.low[first[single]] == keys[single, 1]]
        found[hit] = self.entries[first[hit]]
        for i in np.flatnonzero(last - first > 1):
            candidates = np.arange(first[i], last[i])
            match = candidates[self.low[candidates] == keys[i, 1]]
            if len(match):
                found[i] = self.entries[match[0]]
        return found


class Shard:
    """One immutable pair of files. The index is memory-mapped (small); vectors are read with
    pread, so reading a million rows does not grow the process's resident memory."""

    def __init__(self, index_path: Path):
        self.index_path = index_path
        self.name = index_path.name[: -len(".idx.npy")]
        self.vector_path = index_path.with_name(self.name + ".vec.npy")
        self.index = np.load(index_path, mmap_mode="r", allow_pickle=False)
        if self.index.dtype != INDEX_DTYPE or self.index.ndim != 1:
            raise ValueError("index has the wrong layout")
        with open(self.vector_path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(handle)
            self.data_offset = handle.tell()
            size = os.fstat(handle.fileno()).st_size
        if dtype not in VECTOR_DTYPES or len(shape) != 2 or fortran_order:
            raise ValueError("vectors have the wrong layout")
        self.dtype = np.dtype(dtype)
        self.rows, self.dim = shape
        if self.rows != len(self.index):
            raise ValueError(f"{self.rows} vectors for {len(self.index)} index rows")
        expected = self.data_offset + self.rows * self.dim * self.dtype.itemsize
        if size != expected:
            raise ValueError(f"vector file is {size} bytes, expected {expected}")

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Vectors [len(rows), dim] (as stored) for sorted row numbers, reading runs of rows
        at once."""
        out = np.empty((len(rows), self.dim), dtype=self.dtype)
        row_bytes = self.dim * self.dtype.itemsize
        fd = os.open(self.vector_path, os.O_RDONLY)
        try:
            start = 0
            while start < len(rows):
                end = start + 1
                while end < len(rows) and rows[end] == rows[end - 1] + 1:
                    end += 1
                data = os.pread(
                    fd, (end - start) * row_bytes, self.data_offset + int(rows[start]) * row_bytes
                )
                out[start:end] = np.frombuffer(data, self.dtype).reshape(end - start, self.dim)
                start = end
        finally:
            os.close(fd)
        return out


class MemoryShard:
    """Vectors computed in a run that cannot write the cache: a shard held in memory, read
    like one on disk."""

    def __init__(self, vectors: np.ndarray, index: np.ndarray):
        self.name = f"memory-{uuid.uuid4().hex[:12]}"
        self.vectors, self.index = vectors, index
        self.rows, self.dim = vectors.shape
        self.dtype = vectors.dtype

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Vectors [len(rows), dim] of the given row numbers."""
        return self.vectors[rows]


class BottleneckCache:
    """The cached vectors of one module: lookup, verified reads and crash-safe appends."""

    def __init__(
        self,
        root: str | os.PathLike,
        module_key: str,
        feature_dim: int,
        description: dict | None = None,
        dtype: str = "float32",
    ):
        self.folder = Path(root).expanduser() / module_key
        self.dtype = np.dtype(dtype).newbyteorder("<")  # what the vectors are stored as
        # Why the folder cannot be written (then new vectors stay in memory), or None.
        self.read_only = check_writable_dir(self.folder)
        self.feature_dim = feature_dim
        meta = self.folder / "module.json"
        if description is not None and not self.read_only and not meta.exists():
            atomic_write_text(
                meta,
                json.dumps(
                    {
                        **description,
                        "feature_dim": feature_dim,
                        "dtype": self.dtype.name,
                        "format": CACHE_FORMAT_VERSION,
                    },
                    indent=2,
                ),
            )
        self.shards: list[Shard | MemoryShard] = []
        self.warnings: list[str] = []
        self._starts = np.zeros(1, dtype=np.int64)  # first entry number of each shard, + total
        self._live = np.zeros(0, dtype=bool)  # False for entries forgotten after a bad checksum
        # (shards covered, by content, by file): rebuilt when first needed after new shards.
        self._index: tuple = (-1, None, None)
        self.refresh()

    def refresh(self) -> None:
        """(Re)read the list of shards, e.g. to see shards another run has added."""
        known = {s.name for s in self.shards}
        added: list[Shard] = []
        for index_path in sorted(self.folder.glob("*.idx.npy")):
            name = index_path.name[: -len(".idx.npy")]
            if name in known:
                continue
            try:
                shard = Shard(index_path)
                if shard.dim != self.feature_dim:
                    raise ValueError(f"vectors are {shard.dim}-wide, expected {self.feature_dim}")
                if shard.dtype != self.dtype:
                    raise ValueError(f"vectors are {shard.dtype.name}, expected {self.dtype.name}")
            except (OSError, ValueError) as err:
                self._discard(index_path, str(err))
                continue
            added.append(shard)
        self._add(added)
        if not self.read_only:
            self._remove_orphans()

    def _add(self, added: Sequence[Shard | MemoryShard]) -> None:
        if added:  # one concatenation, not one per shard: a million entries open fast
            rows = np.array([shard.rows for shard in added], dtype=np.int64)
            self._starts = np.concatenate([self._starts, self._starts[-1] + np.cumsum(rows)])
            self._live = np.concatenate([self._live, np.ones(int(rows.sum()), dtype=bool)])
            self.shards.extend(added)

    def keep_in_memory(self, vectors: np.ndarray, index: np.ndarray) -> None:
        """Add vectors [n, dim] with their index rows (INDEX_DTYPE) for this process only,
        warning once that the folder cannot keep them."""
        if not any(isinstance(shard, MemoryShard) for shard in self.shards):
            message = (
                f"bottleneck cache: cannot write {self.folder} ({self.read_only}); the vectors "
                "computed in this run are kept in memory only and will be computed again"
            )
            log.warning(message)
            self.warnings.append(message)
        self._add([MemoryShard(vectors, index)])

    def _discard(self, index_path: Path, reason: str) -> None:
        message = f"bottleneck cache: ignoring damaged shard {index_path.name} ({reason})"
        log.warning(message)
        self.warnings.append(message)
        # Quarantine rather than delete, so a person can inspect what went wrong.
        with contextlib.suppress(OSError):
            os.replace(index_path, index_path.with_name(index_path.name + ".damaged"))

    def _remove_orphans(self) -> None:
        now = time.time()
        for vector_path in self.folder.glob("*.vec.npy"):
            index_path = vector_path.with_name(vector_path.name[: -len(".vec.npy")] + ".idx.npy")
            with contextlib.suppress(OSError):
                age = now - vector_path.stat().st_mtime
                if not index_path.exists() and age > ORPHAN_AGE_SECONDS:
                    vector_path.unlink()

    def _indexes(self) -> tuple[_SortedKeys, _SortedKeys]:
        covered, by_content, by_file = self._index
        shards = self.shards[:]  # a snapshot: another thread's flush may append meanwhile
        if covered != len(shards):
            # Shards load oldest first (names start with their time): entry numbers grow with
            # age, and appending shards never renumbers the entries of earlier ones.
            content, file = (_all_keys(shards, name) for name in ("content", "file"))
            entries = np.arange(len(content), dtype=np.int64)
            by_content, by_file = _SortedKeys(content, entries), _SortedKeys(file, entries)
            self._index = (len(shards), by_content, by_file)
        return by_content, by_file

    def __len__(self) -> int:
        return len(self._indexes()[0])

    def release_index(self) -> None:
        """Free the sorted keys behind `locate` (about 50 MB per million entries) once lookups
        are done; the next `locate` rebuilds them."""
        self._index = (-1, None, None)

    def locate(self, keys: np.ndarray, by: str = "content") -> np.ndarray:
        """Locations (LOCATION_DTYPE, NOWHERE if not cached) of keys [n, 2] from `key_array`,
        by content key (`by="content"`) or file key (`by="file"`)."""
        by_content, by_file = self._indexes()
        entries = (by_content if by == "content" else by_file).find(keys)
        known = entries >= 0
        entries[known] = np.where(self._live[entries[known]], entries[known], -1)
        return self._locations(entries)

    def _locations(self, entries: np.ndarray) -> np.ndarray:
        out = np.full(len(entries), NOWHERE, dtype=LOCATION_DTYPE)
        known = entries >= 0
        shard = np.searchsorted(self._starts, entries[known], side="right") - 1
        out["shard"][known] = shard
        out["row"][known] = entries[known] - self._starts[shard]
        return out

    def content_keys_at(self, locations: np.ndarray) -> np.ndarray:
        """The content keys [n, 2] (see `key_array`) stored with the vectors at `locations`
        (LOCATION_DTYPE, every one cached)."""
        keys = np.zeros((len(locations), 2), dtype=np.uint64)
        for shard in np.unique(locations["shard"]).tolist():
            at = np.flatnonzero(locations["shard"] == shard)
            column = self.shards[shard].index["content"][locations["row"][at]]
            keys[at] = np.ascontiguousarray(column).view(np.uint64).reshape(-1, 2)
        return keys

    def find(self, file_k: bytes | None, content_k: bytes | None) -> Location | None:
        """Location of one vector by file key (fast path) or content key."""
        for key, by in ((file_k, "file"), (content_k, "content")):
            if key is not None:
                (where,) = self.locate(key_array([key]), by)
                if where["shard"] >= 0:
                    return Location(int(where["shard"]), int(where["row"]))
        return None

    def read(self, locations: np.ndarray | Sequence[Location]) -> tuple[np.ndarray, np.ndarray]:
        """Read vectors [n, dim] and a boolean mask of rows that passed their checksum."""
        locations = as_locations(locations)
        out = np.empty((len(locations), self.feature_dim), dtype=np.float32)
        ok = np.ones(len(locations), dtype=bool)
        shards = locations["shard"].astype(np.int64)
        rows = locations["row"].astype(np.int64)
        order = np.lexsort((rows, shards))
        for shard_number in np.unique(shards):
            picks = order[shards[order] == shard_number]
            shard = self.shards[shard_number]
            vectors = shard.read_rows(rows[picks])
            crcs = shard.index["crc"][rows[picks]]
            for j, i in enumerate(picks):
                if row_crc(vectors[j]) == int(crcs[j]):
                    out[i] = vectors[j]
                else:
                    ok[i] = False
        return out, ok

    def forget(self, location: Location | np.ndarray) -> None:
        """Stop using one vector (it failed its checksum) so that it is recomputed."""
        if isinstance(location, Location):
            location = np.array((location.shard, location.row), dtype=LOCATION_DTYPE)
        self._live[self._starts[location["shard"]] + location["row"]] = False

    def writer(self, shard_rows: int | None = None) -> ShardWriter:
        """A writer that appends new vectors to this cache in shards of `shard_rows` (default:
        DEFAULT_SHARD_ROWS, fewer for vectors so long that a shard would pass SHARD_BYTES)."""
        if shard_rows is None:
            row_bytes = self.dtype.itemsize * self.feature_dim
            shard_rows = max(1, min(DEFAULT_SHARD_ROWS, SHARD_BYTES // row_bytes))
        return ShardWriter(self, shard_rows)


class ShardWriter:
    """Buffers new vectors and writes them out as complete shards."""

    def __init__(
        self, cache: BottleneckCache, shard_rows: int, max_seconds_between_flushes: float = 60.0
    ):
        self.cache = cache
        self.shard_rows = shard_rows
        self.max_seconds = max_seconds_between_flushes
        self._rows: list[np.ndarray] = []
        self._index: list[tuple[bytes, bytes, int]] = []
        self._last_flush = time.monotonic()

    def add(self, content_k: bytes, file_k: bytes, vector: np.ndarray) -> None:
        """Queue one vector; full shards are written as they fill."""
        vector = np.asarray(vector, dtype=self.cache.dtype)
        self._rows.append(vector)
        self._index.append((content_k, file_k, row_crc(vector)))
        if (
            len(self._rows) >= self.shard_rows
            or time.monotonic() - self._last_flush > self.max_seconds
        ):
            self.flush()

    def add_many(self, keys: Iterable[tuple[bytes, bytes]], vectors: np.ndarray) -> None:
        """Queue a batch of vectors with their (content key, file key) pairs."""
        for (content_k, file_k), vector in zip(keys, vectors):
            self.add(content_k, file_k, vector)

    def flush(self) -> None:
        """Write the queued vectors as one shard (vectors first, index last); in a cache that
        cannot be written, keep them in memory for this run."""
        self._last_flush = time.monotonic()
        if not self._rows:
            return
        vectors, index = np.stack(self._rows), np.array(self._index, dtype=INDEX_DTYPE)
        if self.cache.read_only:
            self.cache.keep_in_memory(vectors, index)
        else:
            self._write_shard(vectors, index)
        self._rows.clear()
        self._index.clear()

    def _write_shard(self, vectors: np.ndarray, index: np.ndarray) -> None:
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}"
        vector_path = self.cache.folder / f"{name}.vec.npy"
        atomic_write_bytes(vector_path, _npy_bytes(vectors), "bottleneck vectors")
        try:
            atomic_write_bytes(
                self.cache.folder / f"{name}.idx.npy", _npy_bytes(index), "bottleneck index"
            )
        except BaseException:
            with contextlib.suppress(OSError):  # no orphan left waiting for its hour
                vector_path.unlink()
            raise
        self.cache.refresh()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # Also on KeyboardInterrupt: what was computed is kept. Not after a failed write: the
        # same rows would fail the same way.
        if exc_type is None or not issubclass(exc_type, StorageError):
            self.flush()


def _npy_bytes(array: np.ndarray) -> memoryview:
    """`array` in .npy format, in memory: written with one write() call, whose failure is
    a proper OSError (np.save to a file reports a full disk without an errno)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getbuffer()
