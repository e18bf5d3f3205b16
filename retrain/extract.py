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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from retrain.backends import Extractor
from retrain.cache import BottleneckCache, Location, file_content_key, file_key
from retrain.decode import DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, decode_image
from retrain.preprocess import to_module_input
from retrain.scan import display_path

log = logging.getLogger(__name__)


@dataclass
class LookupResult:
    """Where each image's vector is, or that it must be computed or skipped."""

    locations: list[Location | None]
    content_keys: list[bytes | None]
    file_keys: list[bytes | None]
    skipped: dict[int, str] = field(default_factory=dict)

    def missing(self) -> list[int]:
        """Indices of images that need extraction."""
        return [i for i, loc in enumerate(self.locations) if loc is None and i not in self.skipped]


@dataclass
class ExtractionStats:
    """What one extraction pass did."""

    computed: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def lookup(paths: Sequence[Path], cache: BottleneckCache, threads: int = 4) -> LookupResult:
    """Find each image's cached vector: by file identity first, else by a hash of its bytes."""
    n = len(paths)
    result = LookupResult([None] * n, [None] * n, [None] * n)
    need_hash = []
    for i, path in enumerate(paths):
        try:
            key = file_key(path)
        except OSError as err:
            result.skipped[i] = f"cannot read: {err.strerror or err}"
            continue
        result.file_keys[i] = key
        location = cache.by_file.get(key)
        if location is None:
            need_hash.append(i)
        else:
            result.locations[i] = location

    def hash_one(i: int) -> tuple[int, bytes | None, str | None]:
        try:
            return i, file_content_key(paths[i]), None
        except OSError as err:
            return i, None, f"cannot read: {err.strerror or err}"

    with ThreadPoolExecutor(threads) as pool:
        for i, key, error in pool.map(hash_one, need_hash):
            if error:
                result.skipped[i] = error
                continue
            result.content_keys[i] = key
            result.locations[i] = cache.by_content.get(key)
    return result


def verify(
    result: LookupResult, cache: BottleneckCache, paths: Sequence[Path], chunk: int = 8192
) -> None:
    """Check the checksum of every cached vector found; failed ones are marked missing.

    Reads in chunks, so checking a million entries needs little memory.
    """
    found = [i for i, loc in enumerate(result.locations) if loc is not None]
    for start in range(0, len(found), chunk):
        part = found[start : start + chunk]
        _, ok = cache.read([result.locations[i] for i in part])
        for j in np.flatnonzero(~ok):
            i = part[j]
            message = (
                f"bottleneck cache: the entry for {display_path(paths[i])} failed its "
                "checksum; recomputing it"
            )
            cache.warnings.append(message)
            log.warning(message)
            cache.forget(result.locations[i])
            result.locations[i] = None


def decoded_batches(
    paths: Sequence[Path],
    input_size: tuple[int, int],
    batch_size: int,
    errors: dict[int, str],
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tf.data.Dataset:
    """A dataset of (positions, images [b, h, w, 3] float32 in [0, 1], ok) batches.

    Images that fail to decode come through as blank with ok=False, and their reason lands in
    `errors` keyed by position in `paths`.
    """
    encoded = [os.fsencode(p) for p in paths]

    def load(position: np.int64) -> tuple[np.ndarray, bool]:
        position = int(position)
        try:
            return decode_image(os.fsdecode(encoded[position]), input_size, max_pixels), True
        except ImageDecodeError as err:
            errors[position] = str(err)
        except Exception as err:  # noqa: BLE001 - one odd file must never end a long run
            errors[position] = f"cannot decode: {type(err).__name__}: {err}"
        return np.zeros((1, 1, 3), np.uint8), False

    def load_and_resize(position: tf.Tensor):
        image, ok = tf.numpy_function(load, [position], [tf.uint8, tf.bool], stateful=False)
        image.set_shape([None, None, 3])
        ok.set_shape([])
        return position, to_module_input(image, input_size), ok

    options = tf.data.Options()
    options.deterministic = True
    return (
        tf.data.Dataset.range(len(paths))
        .map(load_and_resize, num_parallel_calls=tf.data.AUTOTUNE)
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


def extract_missing(
    paths: Sequence[Path],
    result: LookupResult,
    cache: BottleneckCache,
    extractor: Extractor,
    input_size: tuple[int, int],
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> ExtractionStats:
    """Compute the vectors `result` lacks and store them in `cache`.

    Afterwards every image in `result` has a location or is in `result.skipped`. The shard
    writer flushes on the way out, also on Ctrl-C, so finished work is kept.
    """
    todo = result.missing()
    stats = ExtractionStats()
    if not todo:
        return stats
    errors: dict[int, str] = {}
    dataset = decoded_batches([paths[i] for i in todo], input_size, batch_size, errors, max_pixels)
    start = time.perf_counter()
    progress = _progress_bar(len(todo))
    with progress, cache.writer() as writer:
        for positions, images, ok in dataset:
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
                if result.content_keys[i] is None:
                    result.content_keys[i] = file_content_key(paths[i])
                keys.append((result.content_keys[i], result.file_keys[i]))
                kept.append(j)
            writer.add_many(keys, feats[kept])
            stats.computed += len(kept)
            progress.update(len(positions))
    stats.seconds = time.perf_counter() - start
    for i in todo:
        if i not in result.skipped:
            result.locations[i] = cache.by_content[result.content_keys[i]]
    return stats
