"""Computing the bottleneck vectors that are missing from the cache.

A tf.data pipeline decodes and resizes images in parallel (Pillow releases the GIL), batches
them and prefetches the next batch while the module runs on the current one. Images that cannot
be decoded are skipped and reported; the run goes on.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from retrain.bottlenecks.cache import (
    NOWHERE,
    BottleneckCache,
    file_content_key,
    file_keys,
    key_array,
)
from retrain.config import DEFAULT_MAX_IMAGE_PIXELS
from retrain.data.decode import decode_image, skip_reason
from retrain.data.preprocess import to_module_input
from retrain.data.scan import display_path
from retrain.utils.interrupt import check as check_interrupt
from retrain.utils.runtime import return_free_memory, usable_cpus

log = logging.getLogger(__name__)

# Extraction hands the C heap's free pages back every this many batches: glibc keeps what the
# pipeline's threads free in their own arenas, and a minute of batches adds 200-400 MB of
# resident memory that nothing uses (measured: README, Speed and memory of fine-tuning).
# Every batch costs about 4% of the images/s (the pages are faulted in again); every other,
# half that.
RETURN_MEMORY_EVERY = 2


@dataclass
class LookupResult:
    """Where each image's vector is, or that it must be computed or skipped.

    Arrays, one row per image, so a million images cost megabytes, not a gigabyte of objects.
    """

    locations: np.ndarray  # LOCATION_DTYPE; NOWHERE where not cached
    file_keys: np.ndarray  # [n, 2] uint64 (cache.key_array)
    content_keys: np.ndarray  # [n, 2] uint64, valid where `hashed`
    hashed: np.ndarray  # bool
    skipped: dict[int, str] = field(default_factory=dict)

    def cached(self) -> np.ndarray:
        """Mask of images whose vector was found."""
        return self.locations["shard"] >= 0

    def missing(self) -> list[int]:
        """Indices of images that need extraction."""
        todo = ~self.cached()
        todo[list(self.skipped)] = False
        return np.flatnonzero(todo).tolist()

    def content_key(self, i: int, path: str | os.PathLike) -> bytes:
        """Image i's content key, hashing the file if that was not needed before."""
        if not self.hashed[i]:
            self.content_keys[i] = key_array([file_content_key(path)])[0]
            self.hashed[i] = True
        return self.content_keys[i].tobytes()


@dataclass
class ExtractionStats:
    """What one extraction pass did."""

    computed: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def __add__(self, other: ExtractionStats) -> ExtractionStats:
        return ExtractionStats(self.computed + other.computed, self.seconds + other.seconds)


def lookup(
    paths: Sequence[str | os.PathLike], cache: BottleneckCache, threads: int = 4
) -> LookupResult:
    """Find each image's cached vector: by file identity first, else by a hash of its bytes."""
    n = len(paths)
    keys, skipped = file_keys(paths)
    skipped = {i: skip_reason(err) for i, err in skipped.items()}
    result = LookupResult(
        cache.locate(keys, by="file"),
        keys,
        np.zeros((n, 2), dtype=np.uint64),
        np.zeros(n, dtype=bool),
        skipped,
    )
    result.locations[list(skipped)] = NOWHERE
    # A vector found by file identity brings its file's content key from the index, so that
    # identical files share one location whether their vectors were just computed or read:
    # what a run finds about duplicates must not depend on the cache's state.
    by_file = np.flatnonzero(result.cached())
    result.content_keys[by_file] = cache.content_keys_at(result.locations[by_file])
    result.hashed[by_file] = True

    def hash_one(i: int) -> tuple[int, bytes | None, str | None]:
        try:
            return i, file_content_key(paths[i]), None
        except OSError as err:
            return i, None, skip_reason(err)

    with ThreadPoolExecutor(threads) as pool:
        for i, key, error in pool.map(hash_one, result.missing()):
            check_interrupt()
            if error:
                result.skipped[i] = error
            else:
                result.content_keys[i] = np.frombuffer(key, dtype=np.uint64)
                result.hashed[i] = True
    hashed = np.flatnonzero(result.hashed)
    by_content = cache.locate(result.content_keys[hashed], by="content")
    known = by_content["shard"] >= 0  # (an entry forgotten meanwhile keeps its file's find)
    result.locations[hashed[known]] = by_content[known]
    return result


def verify(
    result: LookupResult,
    cache: BottleneckCache,
    paths: Sequence[str | os.PathLike],
    chunk: int = 8192,
) -> None:
    """Check the checksum of every cached vector found; failed ones are marked missing.

    Reads in chunks, so checking a million entries needs little memory.
    """
    found = np.flatnonzero(result.cached())
    for start in range(0, len(found), chunk):
        part = found[start : start + chunk]
        _, ok = cache.read(result.locations[part])
        for i in part[~ok]:
            message = (
                f"bottleneck cache: the entry for {display_path(paths[i])} failed its "
                "checksum; recomputing it"
            )
            cache.warnings.append(message)
            log.warning(message)
            cache.forget(result.locations[i])
            result.locations[i] = NOWHERE


def decoded_batches(
    paths: Sequence[Path],
    input_size: tuple[int, int],
    batch_size: int,
    errors: dict[int, str],
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    positions: tf.data.Dataset | None = None,
) -> tf.data.Dataset:
    """A dataset of (positions, images [b, h, w, 3] float32 in [0, 1], ok) batches of the
    images at `positions` (a dataset of int64 indices into `paths`; default: each in order).

    Images that fail to decode come through as blank with ok=False, and their reason lands in
    `errors` keyed by position in `paths`.
    """
    encoded = [os.fsencode(p) for p in paths]

    def load(position: np.int64) -> tuple[np.ndarray, bool]:
        position = int(position)
        try:
            return decode_image(os.fsdecode(encoded[position]), input_size, max_pixels), True
        except Exception as err:  # noqa: BLE001 - one odd file must never end a long run
            errors[position] = skip_reason(err)
        return np.zeros((1, 1, 3), np.uint8), False

    def load_and_resize(position: tf.Tensor):
        image, ok = tf.numpy_function(load, [position], [tf.uint8, tf.bool], stateful=False)
        image.set_shape([None, None, 3])
        ok.set_shape([])
        return position, to_module_input(image, input_size), ok

    options = tf.data.Options()
    options.deterministic = True
    # Autotuning would pick about the same parallelism, but its model thread can hold up the
    # iterator's teardown for seconds at the end of a pass.
    options.autotune.enabled = False
    if positions is None:
        positions = tf.data.Dataset.range(len(paths))
    return (
        positions.map(load_and_resize, num_parallel_calls=usable_cpus())
        .batch(batch_size)
        .prefetch(2)
        .with_options(options)
    )


class _LoggedProgress:
    """Progress for logs (no terminal): a line with rate and ETA every `every` seconds."""

    def __init__(self, total: int, every: float = 15.0):
        self.total, self.every, self.done = total, every, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.start)
            log.info(
                "Bottlenecks: %d/%d (%.1f images/s, about %.0f s left)",
                self.done,
                self.total,
                rate,
                (self.total - self.done) / rate,
            )

    def __enter__(self) -> _LoggedProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress_bar(total: int):
    """A tqdm bar (images/s, ETA) on a terminal; periodic log lines otherwise."""
    if sys.stderr.isatty():
        return tqdm(total=total, unit="img", desc="Bottlenecks", dynamic_ncols=True)
    return _LoggedProgress(total)


@dataclass(frozen=True)
class DecodedBatches:
    """The batches `extract_missing` computes by default: the images decoded (none over
    `max_pixels`), resized to `input_size`, `batch_size` at a time. Called with (paths, errors)
    it makes their `decoded_batches` dataset."""

    input_size: tuple[int, int]
    batch_size: int = 32
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __call__(self, paths: Sequence[Path], errors: dict[int, str]) -> tf.data.Dataset:
        return decoded_batches(paths, self.input_size, self.batch_size, errors, self.max_pixels)


def extract_missing(
    paths: Sequence[Path],
    result: LookupResult,
    cache: BottleneckCache,
    extractor: Callable[[Any], np.ndarray],  # a backends.Extractor
    batches: Callable[[list, dict[int, str]], tf.data.Dataset],
    todo: Sequence[int] | None = None,
) -> ExtractionStats:
    """Compute the vectors `result` lacks (only those of images `todo`, if given) and store
    them in `cache`.

    `batches(todo_paths, errors)` makes the (positions, images, ok) dataset of the images to
    compute (`DecodedBatches`; distorted copies bring their own). Afterwards every image
    computed has a location or is in `result.skipped`. The shard writer flushes on the way
    out, also on Ctrl-C, so finished work is kept.
    """
    todo = result.missing() if todo is None else list(todo)
    stats = ExtractionStats()
    if not todo:
        return stats
    errors: dict[int, str] = {}
    dataset = batches([paths[i] for i in todo], errors=errors)
    start = time.perf_counter()
    progress = _progress_bar(len(todo))
    with progress, cache.writer() as writer:
        for number, (positions, images, ok) in enumerate(dataset, 1):
            check_interrupt()
            ok = ok.numpy()
            feats = extractor(images)
            keys = []
            kept = []
            for j, position in enumerate(positions.numpy()):
                i = todo[int(position)]
                if not ok[j]:
                    result.skipped[i] = errors.get(int(position), "cannot decode")
                    log.warning("Skipping %s: %s", display_path(paths[i]), result.skipped[i])
                    continue
                keys.append((result.content_key(i, paths[i]), result.file_keys[i].tobytes()))
                kept.append(j)
            writer.add_many(keys, feats[kept])
            stats.computed += len(kept)
            progress.update(len(positions))
            if number % RETURN_MEMORY_EVERY == 0:
                return_free_memory()
    stats.seconds = time.perf_counter() - start
    done = np.array([i for i in todo if i not in result.skipped], dtype=np.int64)
    result.locations[done] = cache.locate(result.content_keys[done], by="content")
    return stats
