"""The Beam extraction pipeline's transforms: what every worker runs, and the steps that chain
them (`build_pipeline`). retrain.bottlenecks.beam plans the work on the launching machine, runs
the pipeline and sums up; see its docstring for the whole picture and where it runs.

Each element is (path, copy number; ORIGINAL for the image itself). `DecodeImages` reads,
hashes and decodes it (and distorts a copy), dropping what the cache already has and counting
unusable files; `ExtractToCache` runs the module on batches of its output and writes the
vectors as shards of the module's cache folder. A worker process loads the module and opens the
cache once (`_per_process`), whatever number of DoFn instances it runs; `WorkerSpec` is all that
travels to the workers.

This module imports only the library (and Beam, if installed; `require_beam` says what to
install when it is not).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrain.bottlenecks.cache import (
    BottleneckCache,
    file_content_key,
    file_key,
    module_cache_key,
)
from retrain.config import DistortionConfig
from retrain.data.decode import decode_image, skip_reason
from retrain.data.scan import display_path
from retrain.errors import UsageError
from retrain.utils.runtime import import_tensorflow_quietly

# Without apache-beam[gcp], importing Beam logs "apitools not found ..." on the root logger,
# which also installs a default handler there: silence that one message while importing.
_root_logger, _null_handler = logging.getLogger(), logging.NullHandler()


def _not_apitools_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("apitools not found")


_root_logger.addFilter(_not_apitools_notice)
_root_logger.addHandler(_null_handler)
try:
    import apache_beam as beam
    from apache_beam.metrics import Metrics
except ImportError as _err:  # the optional extra is missing; require_beam() says what to install
    beam = None
    _BEAM_IMPORT_ERROR: ImportError | None = _err
else:
    _BEAM_IMPORT_ERROR = None
finally:
    _root_logger.removeFilter(_not_apitools_notice)
    _root_logger.removeHandler(_null_handler)

__all__ = [
    "COPIES",
    "METRICS_NAMESPACE",
    "METRIC_PREFIX",
    "MIN_BATCH_SIZE",
    "ORIGINAL",
    "ORIGINALS",
    "DecodeImages",
    "ExtractToCache",
    "WorkerSpec",
    "build_pipeline",
    "require_beam",
]

METRICS_NAMESPACE = "retrain"
# The copy number of an element that is the image itself, not one of its distorted copies.
ORIGINAL = -1
# DecodeImages' outputs: originals (its main output) and distorted copies, and the prefix of
# each one's metric names (`cached`, `computed`, `failed`; `copies_cached`, ...).
ORIGINALS, COPIES = "originals", "copies"
METRIC_PREFIX = {ORIGINALS: "", COPIES: "copies_"}
MIN_BATCH_SIZE = 8

log = logging.getLogger("retrain")

# A DoFn base that exists without Beam too, so that this module imports (and require_beam
# explains what to install) when the extra is missing.
_DoFn: type = beam.DoFn if beam is not None else object


def require_beam() -> None:
    """Raise UsageError saying what to install if Apache Beam is missing."""
    if beam is None:
        raise UsageError(
            f"Apache Beam is not installed ({_BEAM_IMPORT_ERROR}); pip install 'retrain[beam]'"
        )


# ----------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs to decode, extract and write (pickled into the DoFns)."""

    bottleneck_dir: str  # with ~ expanded
    module_key: str  # the module's cache folder name on the launching machine
    feature_dim: int
    handle: str
    module_cache_dir: str | None  # None: each worker's default
    input_size: tuple[int, int]
    max_pixels: int
    backend: str  # one of retrain.bottlenecks.backends.BACKENDS
    batch_size: int  # largest batch per module call
    num_threads: int  # TFLite threads; 0: every CPU
    shard_rows: int
    distortions: DistortionConfig = DistortionConfig()  # how copies (number >= 0) are made


_shared_lock = threading.Lock()
_shared: dict[tuple, Any] = {}


def _per_process(key: tuple, make: Callable[[], Any]) -> Any:
    """One object per worker process (and key), shared by all DoFn instances (threads) in it:
    a runner may run many DoFn instances per process, and each would otherwise load the model
    and the cache index again."""
    with _shared_lock:
        if key not in _shared:
            _shared[key] = make()
        return _shared[key]


class _SharedCache:
    """The module's cache folder as seen by one worker process, with a lock for writers."""

    def __init__(self, bottleneck_dir: str, module_key: str, feature_dim: int):
        self.cache = BottleneckCache(bottleneck_dir, module_key, feature_dim)
        self.lock = threading.Lock()

    def has(self, file_k: bytes | None, content_k: bytes | None) -> bool:
        return self.cache.find(file_k, content_k) is not None


def _shared_cache(spec: WorkerSpec) -> _SharedCache:
    """The process's view of the cache folder, refreshed: a process may run several pipelines."""
    shared = _per_process(
        ("cache", spec.bottleneck_dir, spec.module_key),
        lambda: _SharedCache(spec.bottleneck_dir, spec.module_key, spec.feature_dim),
    )
    with shared.lock:
        shared.cache.refresh()
    return shared


class _WorkerModel:
    """The module, loaded once per worker process; the backend is chosen on the first batch
    (`auto` checks TFLite against TensorFlow on a few of those images)."""

    def __init__(self, spec: WorkerSpec):
        from retrain.models.loading import resolve_module

        import_tensorflow_quietly()
        from retrain.data.preprocess import PREPROCESSING_ID

        self.spec = spec
        self.cache_dir = Path(spec.module_cache_dir).expanduser() if spec.module_cache_dir else None
        self.module = resolve_module(spec.handle, self.cache_dir)
        found = module_cache_key(self.module.fingerprint, PREPROCESSING_ID)
        if found != spec.module_key:
            raise RuntimeError(
                f"module {spec.handle!r} on this worker (cache folder {found}) differs from the "
                f"one on the launching machine ({spec.module_key}); install the same module "
                "everywhere"
            )
        self.module_object = self.module.load()
        self._extractor = None
        self._lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            if self._extractor is None:
                from retrain.bottlenecks.backends import TFLiteOptions, choose_backend

                self._extractor, _, _ = choose_backend(
                    self.spec.backend,
                    self.module,
                    self.module_object,
                    images[:4],
                    log,
                    cache_dir=self.cache_dir,
                    tflite=TFLiteOptions(
                        batch_size=self.spec.batch_size, num_threads=self.spec.num_threads or None
                    ),
                )
        return self._extractor(images)


def _skip_counters(prefix: str) -> dict[str, Any]:
    """This pipeline's `cached` and `failed` counters, their names prefixed with `prefix`."""
    return {
        name: Metrics.counter(METRICS_NAMESPACE, prefix + name) for name in ("cached", "failed")
    }


class DecodeImages(_DoFn):
    """(path bytes, copy number) -> (content key, file key, module input float32 [h, w, 3]).

    Copy number ORIGINAL is the image itself, on the main output; number c >= 0 is its distorted
    copy c under `spec.distortions`, on the COPIES output, with the keys and pixels `retrain`
    gives that copy (`distort.copy_key` of the image's keys; decoded at `distort.source_size`,
    resized, distorted by `distort.distort_batch` with `distort.copy_params`). An element
    already in the cache (by file key, else by content key) is counted as `cached` and an
    unusable file as `failed` (`copies_cached`, `copies_failed` for copies), and dropped.
    """

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.counters = {kind: _skip_counters(prefix) for kind, prefix in METRIC_PREFIX.items()}

    def setup(self) -> None:
        import_tensorflow_quietly()
        from retrain.bottlenecks import distort
        from retrain.data.preprocess import to_module_input

        self._distort = distort
        self._to_module_input = to_module_input
        self._cache = _shared_cache(self.spec)

    def process(self, element: tuple[bytes, int]):
        path, number = element
        kind = ORIGINALS if number == ORIGINAL else COPIES
        try:
            keys = self._uncached_keys(path, number)
            if keys is None:
                self.counters[kind]["cached"].inc()
                return
            image = self._module_input(path, keys[0], number)
        except Exception as err:  # noqa: BLE001 - one odd file must never end the pipeline
            reason = skip_reason(err)
        else:
            out = (*keys, image)
            yield out if kind == ORIGINALS else beam.pvalue.TaggedOutput(COPIES, out)
            return
        self.counters[kind]["failed"].inc()
        copy = "" if kind == ORIGINALS else f" (distorted copy {number})"
        log.warning("Skipping %s%s: %s", display_path(path), copy, reason)

    def _uncached_keys(self, path: bytes, number: int) -> tuple[bytes, bytes] | None:
        """(content key, file key) of copy `number` of the image at `path`; None if the cache
        has it. Looks up the file key first and hashes the file's bytes only if need be."""
        file_k = self._key(file_key(path), number)
        if self._cache.has(file_k, None):
            return None
        content_k = self._key(file_content_key(path), number)
        if self._cache.has(None, content_k):
            return None
        return content_k, file_k

    def _key(self, key: bytes, number: int) -> bytes:
        """The cache key of copy `number` of the image whose key is `key`."""
        if number == ORIGINAL:
            return key
        return self._distort.copy_key(key, self.spec.distortions, number)

    def _module_input(self, path: bytes, content_k: bytes, number: int) -> np.ndarray:
        """The module input of copy `number` (content key `content_k`) of the image at `path`,
        as `retrain` makes it (extract.decoded_batches, distort.distorted_batches). Raises
        what decoding raises."""
        size, max_pixels = self.spec.input_size, self.spec.max_pixels
        if number == ORIGINAL:
            return self._to_module_input(decode_image(path, size, max_pixels), size).numpy()
        settings, distort = self.spec.distortions, self._distort
        source = distort.source_size(settings, size)
        photo = self._to_module_input(decode_image(path, source, max_pixels), source)
        params = distort.copy_params([content_k])
        return distort.distort_batch(photo[None], params, settings, size)[0].numpy()


class ExtractToCache(_DoFn):
    """Batches of DecodeImages' output -> vectors written as shards of the module's cache
    folder: each worker its own, at the end of every bundle (and every `shard_rows`). Counts
    the vectors as `computed`, prefixed with `metric_prefix` ("copies_" for copies)."""

    def __init__(self, spec: WorkerSpec, metric_prefix: str = ""):
        self.spec = spec
        self.computed = Metrics.counter(METRICS_NAMESPACE, metric_prefix + "computed")
        self._writer = None

    def setup(self) -> None:
        spec = self.spec
        self._cache = _shared_cache(spec)
        self._model = _per_process(
            ("model", spec.handle, spec.module_cache_dir, spec.module_key),
            lambda: _WorkerModel(spec),
        )
        self._writer = None

    def start_bundle(self) -> None:
        self._writer = self._cache.cache.writer(self.spec.shard_rows)

    def process(self, batch: list[tuple[bytes, bytes, np.ndarray]]):
        features = self._model(np.stack([image for _, _, image in batch]))
        with self._cache.lock:
            self._writer.add_many([(content, file) for content, file, _ in batch], features)
        self.computed.inc(len(batch))
        yield len(batch)

    def finish_bundle(self) -> None:
        self._flush()

    def teardown(self) -> None:
        # A bundle that failed half-way still leaves good vectors: keep them.
        try:
            self._flush()
        except Exception as err:  # noqa: BLE001 - teardown is best effort
            log.warning("bottleneck cache: could not write the last shard: %s", err)

    def _flush(self) -> None:
        if self._writer is not None:
            with self._cache.lock:
                self._writer.flush()
            self._writer = None


# ----------------------------------------------------------------------------- the pipeline


def build_pipeline(
    pipeline: beam.Pipeline,
    paths: Sequence[str | os.PathLike],
    spec: WorkerSpec,
    copies: Sequence[tuple[str | os.PathLike, int]] = (),
) -> beam.PCollection:
    """Add the extraction steps for the images `paths` and the distorted `copies` (path, copy
    number >= 0; made as `spec.distortions` say) to `pipeline`; returns the per-batch counts."""
    elements = [(os.fsencode(p), ORIGINAL) for p in paths]  # bytes: any file name
    elements += [(os.fsencode(p), int(number)) for p, number in copies]
    decoded = (
        pipeline
        | "ListImages" >> beam.Create(elements)
        | "Reshuffle" >> beam.Reshuffle()
        | "ReadDecode" >> beam.ParDo(DecodeImages(spec)).with_outputs(COPIES, main=ORIGINALS)
    )
    counts = _batch_and_extract(decoded[ORIGINALS], spec, ORIGINALS)
    if not copies:
        return counts
    copy_counts = _batch_and_extract(decoded[COPIES], spec, COPIES)
    return (counts, copy_counts) | "AllBatches" >> beam.Flatten()


def _batch_and_extract(decoded: beam.PCollection, spec: WorkerSpec, kind: str) -> beam.PCollection:
    """Batch DecodeImages' output `kind` (ORIGINALS or COPIES) and extract it into the cache;
    the steps of the originals keep the names they had before copies existed."""
    suffix = "" if kind == ORIGINALS else "Copies"
    return (
        decoded
        | f"Batch{suffix}"
        >> beam.BatchElements(
            min_batch_size=min(MIN_BATCH_SIZE, spec.batch_size), max_batch_size=spec.batch_size
        )
        | f"ExtractWrite{suffix}" >> beam.ParDo(ExtractToCache(spec, METRIC_PREFIX[kind]))
    )
