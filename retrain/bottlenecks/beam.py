"""Bottleneck extraction on many machines, as an Apache Beam pipeline (extra `retrain[beam]`).

    from apache_beam.options.pipeline_options import PipelineOptions
    from retrain import CacheConfig, RetrainConfig
    from retrain.bottlenecks.beam import BeamSettings, extract

    config = RetrainConfig(image_dir="photos", cache=CacheConfig(bottleneck_dir="/shared/b"))
    options = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    summary = extract(config, options, BeamSettings(summary_json="summary.json"))

`extract` reads `config.image_dir`, `data` (the split percentages and `max_image_pixels`),
`module`, `cache.bottleneck_dir` (required here) and `distortions`. The launching machine scans
the image folder as `retrain` does, resolves the module (converting a bundled one once), opens
the module's cache folder and leaves out every image whose file key is already there. With
`distortions.copies` N > 0 it also plans the N distorted copies of every training-split image
that `retrain` with the same settings caches (retrain/bottlenecks/distort.py), leaving out those
whose
derived file key is there. Each element is (path, copy number; ORIGINAL for the image itself):
Reshuffle -> read, hash and decode, and distort a copy (one already cached under its content
key is skipped; an unusable file is counted, logged and skipped, never failing the pipeline)
-> BatchElements -> extract -> write, originals and copies in separate batches. Each worker
process resolves and loads the module once, picks the extraction backend
(`module.extraction_backend`) on its first batch, and writes its own uniquely named shards into
the module's cache folder at the end of every bundle, in the cache's own crash-safe format (see
retrain/bottlenecks/cache.py). A retried bundle at worst writes a vector twice, which the cache
tolerates.
The summary, built from Beam metrics, counts the images found, already cached, computed, failed
(and, when copies are asked for, the copies under "copies").

Where it runs. The same pipeline runs on the DirectRunner, Dataflow, Flink or Spark, with these
requirements:

* The DirectRunner (the default) runs on Beam's FnApiRunner, without the attempt to download
  the Prism binary from GitHub that Beam's DirectRunner makes first (see
  run_direct_on_fn_api_runner); `--runner=PrismRunner` asks for Prism.
* The image folder, the bottleneck folder (and the module cache folder, if given) are POSIX
  paths that the launching machine and every worker see: the same NFS/Filestore/Lustre mount,
  or a FUSE mount of object storage (gcsfuse, mountpoint-s3 does not support renames).
  `gs://`-style URLs are refused: the cache writes a temporary file, fsyncs it and renames it,
  which needs a file system. On gcsfuse a rename is a copy plus delete, not atomic, but the
  index file is renamed last, so a reader never sees an index without its vectors. If the mount
  point differs between machines, `retrain` still finds the vectors by the hash of the image
  bytes (slower: it reads every image once) instead of by path.
* Workers need `retrain` installed (it brings TensorFlow, ai-edge-litert and the bundled
  weights): build a wheel (`pip wheel --no-deps -w dist .`) and pass
  `--extra_package dist/retrain-*.whl`, or use a custom container (`--sdk_container_image`).
* Each worker converts a bundled module on first use into its own ~/.cache/retrain (a minute,
  once per worker) unless `module.cache_dir` names a shared folder. A worker whose module has a
  different fingerprint than the launching machine's fails loudly rather than fill another
  cache folder.
* The list of images is part of the pipeline graph (`beam.Create`); with millions of images
  that can exceed a runner's graph size limit (Dataflow: 10 MB; `--experiments=upload_graph`).
* Dataflow starts one Python process per vCPU by default and each process loads the module
  once; TFLite then uses every CPU in each process. Set `BeamSettings.num_threads=1`, or pass
  `--experiments=no_use_multiple_sdk_containers` for one process per machine.

This module is the launching machine's side: the settings and their check, the plan, running
the pipeline and its summary; what the workers run, and `build_pipeline`, are in
retrain.bottlenecks.beam_transforms. It imports only the library (and Beam, if installed);
`retrain.cli.beam_extract` is its command line.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrain.bottlenecks.backends import BACKENDS
from retrain.bottlenecks.beam_transforms import (
    COPIES,
    METRIC_PREFIX,
    METRICS_NAMESPACE,
    ORIGINAL,
    DecodeImages,
    ExtractToCache,
    WorkerSpec,
    beam,
    build_pipeline,
    require_beam,
)
from retrain.bottlenecks.cache import (
    DEFAULT_SHARD_ROWS,
    BottleneckCache,
    file_keys,
    key_array,
)
from retrain.config import DistortionConfig, RetrainConfig, leaf_fields
from retrain.data.labels_csv import find_images
from retrain.data.scan import split_mask
from retrain.errors import ConfigError, RetrainError, UsageError, first_line
from retrain.utils.atomic import atomic_write_text, check_writable_file
from retrain.utils.handles import looks_like_url
from retrain.utils.runtime import import_tensorflow_quietly

if beam is not None:  # else require_beam() says what to install
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

if TYPE_CHECKING:
    from retrain.models.loading import ImageModule

__all__ = [
    "BeamSettings",
    "DecodeImages",
    "ExtractToCache",
    "ORIGINAL",
    "WorkerSpec",
    "build_pipeline",
    "extract",
    "require_beam",
    "run_direct_on_fn_api_runner",
    "validate",
]

# Folders every worker must see as paths: a URL is refused.
MOUNTED_FOLDERS = ("image_dir", "cache.bottleneck_dir", "module.cache_dir")

log = logging.getLogger("retrain")


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BeamSettings:
    """The pipeline's own settings, besides the RetrainConfig. A ConfigError names them as the
    command line does: `shard_rows`, `num_threads`, `summary_json`."""

    shard_rows: int = DEFAULT_SHARD_ROWS  # most vectors per shard (and one shard per bundle)
    num_threads: int = 0  # CPU threads per worker process for TFLite; 0: every CPU it may use
    summary_json: str | None = None  # also write the summary here

    def validate(self) -> BeamSettings:
        """Raise ConfigError for the first invalid setting; return self when all are valid."""
        if self.shard_rows <= 0:
            raise ConfigError("{0} must be positive, got " + str(self.shard_rows), "shard_rows")
        if self.num_threads < 0:
            raise ConfigError(
                "{0} must be 0 (all CPUs) or positive, got " + str(self.num_threads),
                "num_threads",
            )
        if self.summary_json and (problem := check_writable_file(self.summary_json)):
            raise ConfigError("{0}: cannot write there: " + problem, "summary_json")
        return self


def validate(config: RetrainConfig, settings: BeamSettings) -> None:
    """Raise ConfigError naming the first setting the pipeline cannot use: a folder given as a
    URL (MOUNTED_FOLDERS), then `config.validate()`'s checks, a missing `cache.bottleneck_dir`,
    the int8 backend, then `settings.validate()`'s."""
    values = dict(leaf_fields(config))
    for name in MOUNTED_FOLDERS:
        if values[name] and looks_like_url(values[name]):
            raise ConfigError(
                "{0}: " + values[name] + " is a URL; give a folder that every worker mounts "
                "(e.g. a gcsfuse or NFS mount point)",
                name,
            )
    config.validate()
    if not config.cache.bottleneck_dir:
        raise ConfigError("{0} is required: the folder the workers fill", "cache.bottleneck_dir")
    if config.module.extraction_backend not in BACKENDS:  # tflite_int8 needs a calibration
        raise ConfigError(
            "{0}=" + config.module.extraction_backend + " is not offered by the Beam pipeline; "
            "choose one of " + ", ".join(BACKENDS),
            "module.extraction_backend",
        )
    settings.validate()


# The DirectRunner's names, as --runner accepts them (case-insensitive, "Runner" optional).
_DIRECT_RUNNER_NAMES = ("direct", "directrunner", "switchingdirectrunner")


def run_direct_on_fn_api_runner(options: PipelineOptions) -> None:
    """Make the DirectRunner (also the default runner) of `options` run on the FnApiRunner.

    Since Beam 2.6x the DirectRunner first tries Prism, a Go binary it downloads from GitHub at
    run time, and falls back to the FnApiRunner when that fails. Offline it always fails, after
    a network attempt that can hang behind a firewall, and leaves temporary folders in $TMPDIR
    at every run. Going straight to the FnApiRunner (which --direct_num_workers and
    --direct_running_mode configure) runs locally with no download, as tested here.
    --runner=PrismRunner still asks for Prism.
    """
    standard = options.view_as(StandardOptions)
    name = standard.runner or "DirectRunner"
    if name.rsplit(".", 1)[-1].lower() in _DIRECT_RUNNER_NAMES:
        standard.runner = "FnApiRunner"


# ----------------------------------------------------------------------------- the run


def extract(
    config: RetrainConfig,
    options: PipelineOptions | None = None,
    settings: BeamSettings | None = None,
) -> dict[str, Any]:
    """Cache the vectors of `config`'s images (and, with `config.distortions.copies`, of the
    distorted copies of its training images) that are not cached yet, with a Beam pipeline
    run with `options` (default: the DirectRunner; a DirectRunner is switched to the
    FnApiRunner, see run_direct_on_fn_api_runner). Returns the summary: images, cached,
    computed, failed (None, None where the runner reports no metrics), timings, cache_folder and
    module, and with copies asked for, "copies": per_image, total, cached, computed, failed
    (likewise); it is also written to `settings.summary_json` if set (default: BeamSettings()).

    Raises ConfigError naming an invalid setting (see `validate`), UsageError if Beam is missing
    or `options` names an unknown runner, RetrainError if the pipeline fails. Logs progress on
    the "retrain" logger and leaves logging as it is.
    """
    require_beam()
    settings = BeamSettings() if settings is None else settings
    validate(config, settings)
    start = time.perf_counter()
    options = PipelineOptions([]) if options is None else options  # None would read sys.argv
    run_direct_on_fn_api_runner(options)
    try:
        pipeline = beam.Pipeline(options=options)
    except ValueError as err:  # e.g. an unknown --runner
        raise UsageError(str(err).splitlines()[0]) from None
    import_tensorflow_quietly()
    plan = _plan(config, settings)
    summary = plan.summary
    if plan.images or plan.copies:
        build_pipeline(pipeline, plan.images, plan.spec, plan.copies)
        _add_counts(summary, *_run(pipeline))
    summary["total_seconds"] = round(time.perf_counter() - start, 3)
    _log_summary(summary)
    if settings.summary_json:
        atomic_write_text(settings.summary_json, json.dumps(summary, indent=2) + "\n")
    return summary


def _log_summary(summary: dict[str, Any]) -> None:
    """One line for the originals, and one for the copies if any were asked for."""
    log.info(
        "Bottlenecks: %s computed, %s already cached, %s files skipped (%.1f s)",
        summary["computed"],
        summary["cached"],
        summary["failed"],
        summary["total_seconds"],
    )
    if "copies" in summary:
        copies = summary["copies"]
        log.info(
            "Distorted copies: %s computed, %s already cached, %s skipped",
            copies["computed"],
            copies["cached"],
            copies["failed"],
        )


@dataclass
class _Plan:
    """What the launching machine found: the work for the pipeline, and the summary so far."""

    images: list[str]  # to check and compute
    copies: list[tuple[str, int]]  # (path, copy number) to check and compute
    spec: WorkerSpec
    summary: dict[str, Any]


def _plan(config: RetrainConfig, settings: BeamSettings) -> _Plan:
    """Scan the image folder (and split it as `retrain` does), resolve the module and look the
    files, and the copies asked for, up in its cache folder by file key."""
    from retrain.bottlenecks.stage import load_module, open_cache  # imports TensorFlow

    data = config.data
    image_set = find_images(config.image_dir, data)
    for path, reason in image_set.ignored:
        log.warning("Ignoring %s: %s", path, reason)
    module = load_module(config.module)
    cache = open_cache(config.cache.bottleneck_dir, module)
    paths = image_set.paths
    keys, unreadable = file_keys(paths)  # unreadable files: the worker reports them
    cached = cache.locate(keys, by="file")["shard"] >= 0
    todo = [path for path, known in zip(paths, cached) if not known]
    log.info(
        "%d images in %d classes: %d bottlenecks cached, %d to check and compute with Beam "
        "(module %s, cache folder %s)",
        len(image_set),
        len(image_set.labels),
        len(image_set) - len(todo),
        len(todo),
        module.handle,
        cache.folder,
    )
    summary = {
        "images": len(image_set),
        "cached": len(image_set) - len(todo),
        "computed": 0,
        "failed": 0,
        "pipeline_seconds": 0.0,
        "images_per_second": 0.0,
        "cache_folder": str(cache.folder),
        "module": module.handle,
    }
    copies: list[tuple[str, int]] = []
    if config.distortions.copies:
        training = np.flatnonzero(split_mask(image_set.split_codes, "training"))
        copies, summary["copies"] = _plan_copies(
            paths, training, keys, unreadable, cache, config.distortions
        )
    return _Plan(todo, copies, _worker_spec(config, settings, module, cache), summary)


def _worker_spec(
    config: RetrainConfig, settings: BeamSettings, module: ImageModule, cache: BottleneckCache
) -> WorkerSpec:
    """What the workers need, for `module` and its cache folder `cache`."""
    return WorkerSpec(
        bottleneck_dir=os.fspath(Path(config.cache.bottleneck_dir).expanduser()),
        module_key=cache.folder.name,
        feature_dim=module.feature_dim,
        handle=module.handle,
        module_cache_dir=config.module.cache_dir,
        input_size=tuple(module.input_size),
        max_pixels=config.data.max_image_pixels,
        backend=config.module.extraction_backend,
        batch_size=config.module.extraction_batch_size,
        num_threads=settings.num_threads,
        shard_rows=settings.shard_rows,
        distortions=config.distortions,
    )


def _plan_copies(
    paths: Sequence[str],
    training: np.ndarray,
    keys: np.ndarray,
    unreadable: dict[int, OSError],
    cache: BottleneckCache,
    settings: DistortionConfig,
) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """The distorted copies (path, copy number) of images `training` (indices into `paths`,
    whose file keys are `keys`) that the cache lacks by derived file key (`distort.copy_key`),
    and the summary's "copies" so far. Copies of an `unreadable` file are planned: the worker
    reports them."""
    from retrain.bottlenecks import distort

    numbers = range(settings.copies)
    wanted = [(int(i), c) for i in training for c in numbers]
    copy_keys = key_array([distort.copy_key(keys[i].tobytes(), settings, c) for i, c in wanted])
    cached = cache.locate(copy_keys, by="file")["shard"] >= 0
    cached[[j for j, (i, _) in enumerate(wanted) if i in unreadable]] = False
    todo = [(paths[i], c) for (i, c), known in zip(wanted, cached) if not known]
    log.info(
        "Distorted copies (%d per training image, %s): %d cached, %d to check and compute",
        settings.copies,
        distort.distortion_id(settings),
        len(wanted) - len(todo),
        len(todo),
    )
    summary = {
        "per_image": settings.copies,
        "total": len(wanted),
        "cached": len(wanted) - len(todo),
        "computed": 0,
        "failed": 0,
    }
    return todo, summary


def _run(pipeline: beam.Pipeline) -> tuple[dict[str, int] | None, float]:
    """Run the built `pipeline` to the end; returns its counters (None where the runner
    reports no metrics) and how many seconds it ran."""
    run_start = time.perf_counter()
    try:
        result = pipeline.run()
        state = result.wait_until_finish()
    except KeyboardInterrupt:
        raise
    except Exception as err:
        log.error("The pipeline failed", exc_info=True)
        raise RetrainError(f"the pipeline failed: {first_line(err)}") from None
    seconds = time.perf_counter() - run_start
    if str(state).rsplit(".", 1)[-1] not in ("DONE", "UNKNOWN"):
        raise RetrainError(f"the pipeline ended in state {state}")
    return _counters(result), seconds


def _add_counts(summary: dict[str, Any], counts: dict[str, int] | None, seconds: float) -> None:
    """Add the pipeline's `counts` (its counters, or None: unknown) and timing to `summary`:
    the workers' `cached` add to those the launching machine found."""
    summary["pipeline_seconds"] = round(seconds, 3)
    parts = [(summary, "")]
    if "copies" in summary:
        parts.append((summary["copies"], METRIC_PREFIX[COPIES]))
    for part, prefix in parts:
        if counts is None:
            part.update(computed=None, failed=None)
            continue
        part["cached"] += counts.get(prefix + "cached", 0)
        part["computed"] = counts.get(prefix + "computed", 0)
        part["failed"] = counts.get(prefix + "failed", 0)
    if counts is not None and seconds > 0:
        summary["images_per_second"] = round(summary["computed"] / seconds, 2)


def _counters(result: Any) -> dict[str, int] | None:
    """This pipeline's counters, committed where the runner reports them; None if the runner
    cannot be asked."""
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    except Exception as err:  # noqa: BLE001 - a runner without metrics support
        log.warning("Cannot read the pipeline's metrics from this runner: %s", err)
        return None
    totals: dict[str, int] = {}
    for counter in found["counters"]:
        try:
            value = counter.committed
        except Exception:  # noqa: BLE001 - some runners report attempted values only
            value = None
        if value is None:
            value = counter.attempted
        name = counter.key.metric.name
        totals[name] = totals.get(name, 0) + int(value or 0)
    return totals
