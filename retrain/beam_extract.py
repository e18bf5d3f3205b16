"""`retrain-beam-extract`: bottleneck extraction on many machines, as an Apache Beam pipeline.

    pip install 'retrain[beam]'
    retrain-beam-extract --image_dir DIR --bottleneck_dir DIR [--tfhub_module efficientnet_lite0]
        [--extraction_batch_size 32] [Beam pipeline options, e.g. --runner=DirectRunner
        --direct_num_workers=2 --direct_running_mode=multi_processing]
    retrain --image_dir DIR --bottleneck_dir DIR      # then finds every bottleneck cached

The launching machine scans --image_dir as `retrain` does, resolves the module (converting a
bundled one once), opens the module's cache folder and leaves out every image whose file key is
already there. The rest go through Reshuffle -> read, hash and decode (an image already cached
under its content key is skipped; an unusable file is counted, logged and skipped, never failing
the pipeline) -> BatchElements -> extract -> write. Each worker process resolves and loads the
module once, picks the extraction backend (`--extraction_backend`, as in `retrain`) on its first
batch, and writes its own uniquely named shards into the module's cache folder at the end of
every bundle, in the cache's own crash-safe format (see retrain/cache.py). A retried bundle at
worst writes a vector twice, which the cache tolerates. The launching machine prints a JSON
summary built from Beam metrics: images found, already cached, computed, failed.

Where it runs. The same command runs on the DirectRunner, Dataflow, Flink or Spark, with these
requirements:

* The DirectRunner (the default) runs on Beam's FnApiRunner, without the attempt to download
  the Prism binary from GitHub that Beam's DirectRunner makes first (see
  run_direct_on_fn_api_runner); `--runner=PrismRunner` asks for Prism.

* --image_dir and --bottleneck_dir (and --module_cache_dir, if given) are POSIX paths that the
  launching machine and every worker see: the same NFS/Filestore/Lustre mount, or a FUSE mount
  of object storage (gcsfuse, mountpoint-s3 does not support renames). `gs://`-style URLs are
  refused: the cache writes a temporary file, fsyncs it and renames it, which needs a file
  system. On gcsfuse a rename is a copy plus delete, not atomic, but the index file is renamed
  last, so a reader never sees an index without its vectors. If the mount point differs between
  machines, `retrain` still finds the vectors by the hash of the image bytes (slower: it reads
  every image once) instead of by path.
* Workers need `retrain` installed (it brings TensorFlow, ai-edge-litert and the bundled
  weights): build a wheel (`pip wheel --no-deps -w dist .`) and pass
  `--extra_package dist/retrain-*.whl`, or use a custom container (`--sdk_container_image`).
* Each worker converts a bundled module on first use into its own ~/.cache/retrain (a minute,
  once per worker) unless --module_cache_dir names a shared folder. A worker whose module has a
  different fingerprint than the launching machine's fails loudly rather than fill another
  cache folder.
* The list of images is part of the pipeline graph (`beam.Create`); with millions of images
  that can exceed a runner's graph size limit (Dataflow: 10 MB; `--experiments=upload_graph`).
* Dataflow starts one Python process per vCPU by default and each process loads the module
  once; TFLite then uses every CPU in each process. Pass `--num_threads=1`, or
  `--experiments=no_use_multiple_sdk_containers` for one process per machine.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrain.atomic import atomic_write_text, check_writable_dir, check_writable_file
from retrain.backends import BACKENDS
from retrain.cache import (
    DEFAULT_SHARD_ROWS,
    BottleneckCache,
    file_content_key,
    file_key,
    file_keys,
    module_cache_key,
)
from retrain.config import DEFAULT_MODULE, ModuleConfig
from retrain.decode import DEFAULT_MAX_IMAGE_PIXELS, decode_image, skip_reason
from retrain.errors import RetrainError, UsageError, first_line
from retrain.handles import looks_like_url
from retrain.runtime import import_tensorflow_quietly
from retrain.scan import display_path

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
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
except ImportError as _err:  # the optional extra is missing; run() says how to install it
    beam = None
    _BEAM_IMPORT_ERROR: ImportError | None = _err
else:
    _BEAM_IMPORT_ERROR = None
finally:
    _root_logger.removeFilter(_not_apitools_notice)
    _root_logger.removeHandler(_null_handler)

__all__ = ["DecodeImages", "ExtractToCache", "build_pipeline", "extract", "main", "run"]

PROG = "retrain-beam-extract"
METRICS_NAMESPACE = "retrain"
MIN_BATCH_SIZE = 8

log = logging.getLogger("retrain")

# A DoFn base that exists without Beam too, so that this module imports (and `run` explains
# what to install) when the extra is missing.
_DoFn: type = beam.DoFn if beam is not None else object


# ----------------------------------------------------------------------------- flags


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UsageError (one line, exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _raise_usage(message: str):
    raise UsageError(message)


def argument_parser() -> argparse.ArgumentParser:
    """This command's own flags; everything else is a Beam pipeline option."""
    p = _ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description="Compute the bottleneck cache of an image folder with an Apache Beam "
        "pipeline, for `retrain --bottleneck_dir` to read.",
        epilog="Other flags are Apache Beam pipeline options, e.g. --runner=DirectRunner "
        "--direct_num_workers=2 --direct_running_mode=multi_processing, or "
        "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp "
        "--extra_package=dist/retrain-0.1.0-py3-none-any.whl.",
    )
    p.add_argument("--image_dir", default="", help="Folder with one subfolder of images per class.")
    p.add_argument(
        "--bottleneck_dir",
        default="/tmp/bottleneck",
        help="The bottleneck cache (as retrain's flag); on a cluster, a folder every worker "
        "mounts.",
    )
    p.add_argument(
        "--tfhub_module",
        default=DEFAULT_MODULE,
        help="Image feature-vector module: a bundled name, a TF Hub URL, or a SavedModel folder.",
    )
    p.add_argument(
        "--module_cache_dir",
        default="",
        help="Where bundled modules are converted and kept (default: $RETRAIN_CACHE_DIR or "
        "~/.cache/retrain, on each worker).",
    )
    p.add_argument(
        "--extraction_backend",
        default="auto",
        choices=BACKENDS,
        help="What runs the module (as retrain's flag); chosen on each worker.",
    )
    p.add_argument(
        "--extraction_batch_size",
        type=int,
        default=32,
        help="Largest batch of images per module call (Beam's BatchElements adapts between "
        f"{MIN_BATCH_SIZE} and this).",
    )
    p.add_argument(
        "--num_threads",
        type=int,
        default=0,
        help="CPU threads per worker process for the tflite backend (0: every CPU it may use).",
    )
    p.add_argument(
        "--max_image_pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="Images with more pixels are skipped (a guard against decompression bombs).",
    )
    p.add_argument(
        "--shard_rows",
        type=int,
        default=DEFAULT_SHARD_ROWS,
        help="Most vectors per cache shard; each worker also writes one at the end of each bundle.",
    )
    p.add_argument("--summary_json", default="", help="Also write the JSON summary here.")
    p.add_argument(
        "--logging_verbosity",
        default="INFO",
        choices=["DEBUG", "INFO", "WARN", "ERROR", "FATAL"],
        help="How much to log.",
    )
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise UsageError for the first invalid flag value, naming the flag."""
    for name in ("image_dir", "bottleneck_dir", "module_cache_dir"):
        value = getattr(args, name)
        if value and looks_like_url(value):
            raise UsageError(
                f"--{name}: {value} is a URL; give a folder that every worker mounts "
                "(e.g. a gcsfuse or NFS mount point)"
            )
    if not args.image_dir:
        raise UsageError("--image_dir is required: a folder with one subfolder of images per class")
    if not os.path.isdir(os.path.expanduser(args.image_dir)):
        raise UsageError(f"--image_dir: folder not found: {args.image_dir}")
    for name in ("extraction_batch_size", "max_image_pixels", "shard_rows"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.num_threads < 0:
        raise UsageError(f"--num_threads must be 0 (all CPUs) or positive, got {args.num_threads}")
    if not args.tfhub_module:
        raise UsageError("--tfhub_module must not be empty")
    for name in ("bottleneck_dir", "module_cache_dir"):
        value = getattr(args, name)
        if value and (problem := check_writable_dir(value)):
            raise UsageError(f"--{name}: cannot write there: {problem}")
    if args.summary_json and (problem := check_writable_file(args.summary_json)):
        raise UsageError(f"--summary_json: cannot write there: {problem}")


def pipeline_options(beam_argv: Sequence[str], own: argparse.ArgumentParser) -> PipelineOptions:
    """Beam's options from the flags this command does not know; an unknown or invalid one is a
    UsageError (Beam itself would drop an unknown flag with a warning, hiding a typo)."""
    parsers: list[argparse.ArgumentParser] = []

    def capture(parser: argparse.ArgumentParser) -> None:
        parser.error = _raise_usage  # one line instead of usage text and SystemExit
        parsers.append(parser)

    options = PipelineOptions(list(beam_argv))
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)  # not "Discarding unparseable args": that is an error here
    try:
        options.get_all_options(add_extra_args_fn=capture)
    finally:
        beam_log.setLevel(level)
    _, unknown = parsers[0].parse_known_args(list(beam_argv))
    run_direct_on_fn_api_runner(options)
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        if not flag.startswith("-"):
            raise UsageError(f"unexpected argument {unknown[0]!r} (flags are --name=value)")
        known = [
            option
            for parser in (*parsers, own)
            for action in parser._actions
            for option in action.option_strings
        ]
        close = difflib.get_close_matches(flag, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"unknown flag {flag}{hint}")
    return options


# The DirectRunner's names, as --runner accepts them (case-insensitive, "Runner" optional).
_DIRECT_RUNNER_NAMES = ("direct", "directrunner", "switchingdirectrunner")


def run_direct_on_fn_api_runner(options: PipelineOptions) -> None:
    """Make the DirectRunner (also the default runner) run on Beam's FnApiRunner.

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


# ----------------------------------------------------------------------------- workers

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


def _shared_cache(bottleneck_dir: str, module_key: str, feature_dim: int) -> _SharedCache:
    """The process's view of the cache folder, refreshed: a process may run several pipelines."""
    shared = _per_process(
        ("cache", bottleneck_dir, module_key),
        lambda: _SharedCache(bottleneck_dir, module_key, feature_dim),
    )
    with shared.lock:
        shared.cache.refresh()
    return shared


class _WorkerModel:
    """The module, loaded once per worker process; the backend is chosen on the first batch
    (`auto` checks TFLite against TensorFlow on a few of those images)."""

    def __init__(self, handle: str, module_cache_dir: str, module_key: str, settings: dict):
        from retrain.models.loading import resolve_module

        import_tensorflow_quietly()
        from retrain.preprocess import PREPROCESSING_ID

        self.cache_dir = Path(module_cache_dir).expanduser() if module_cache_dir else None
        self.module = resolve_module(handle, self.cache_dir)
        found = module_cache_key(self.module.fingerprint, PREPROCESSING_ID)
        if found != module_key:
            raise RuntimeError(
                f"module {handle!r} on this worker (cache folder {found}) differs from the one on "
                f"the launching machine ({module_key}); install the same module everywhere"
            )
        self.module_object = self.module.load()
        self.settings = settings
        self._extractor = None
        self._lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            if self._extractor is None:
                from retrain.backends import choose_backend

                self._extractor, _, _ = choose_backend(
                    self.settings["backend"],
                    self.module,
                    self.module_object,
                    images[:4],
                    log,
                    cache_dir=self.cache_dir,
                    batch_size=self.settings["batch_size"],
                    num_threads=self.settings["num_threads"] or None,
                )
        return self._extractor(images)


class DecodeImages(_DoFn):
    """path (bytes) -> (content key, file key, module input float32 [h, w, 3]); images already
    in the cache are counted as `cached`, unusable files as `failed`, and dropped."""

    def __init__(self, bottleneck_dir: str, module_key: str, feature_dim: int, module_info: dict):
        self.bottleneck_dir = bottleneck_dir
        self.module_key = module_key
        self.feature_dim = feature_dim
        self.input_size = tuple(module_info["input_size"])
        self.max_pixels = module_info["max_pixels"]
        self.cached = Metrics.counter(METRICS_NAMESPACE, "cached")
        self.failed = Metrics.counter(METRICS_NAMESPACE, "failed")

    def setup(self) -> None:
        import_tensorflow_quietly()
        from retrain.preprocess import to_module_input

        self._to_module_input = to_module_input
        self._cache = _shared_cache(self.bottleneck_dir, self.module_key, self.feature_dim)

    def process(self, path: bytes):
        try:
            file_k = file_key(path)
            if self._cache.has(file_k, None):
                self.cached.inc()
                return
            content_k = file_content_key(path)
            if self._cache.has(None, content_k):
                self.cached.inc()
                return
            pixels = decode_image(path, self.input_size, self.max_pixels)
        except Exception as err:  # noqa: BLE001 - one odd file must never end the pipeline
            reason = skip_reason(err)
        else:
            yield content_k, file_k, self._to_module_input(pixels, self.input_size).numpy()
            return
        self.failed.inc()
        log.warning("Skipping %s: %s", display_path(path), reason)


class ExtractToCache(_DoFn):
    """Batches of DecodeImages' output -> vectors written as shards of the module's cache
    folder: each worker its own, at the end of every bundle (and every `shard_rows`)."""

    def __init__(self, bottleneck_dir: str, module_key: str, feature_dim: int, module_info: dict):
        self.bottleneck_dir = bottleneck_dir
        self.module_key = module_key
        self.feature_dim = feature_dim
        self.module_info = dict(module_info)
        self.computed = Metrics.counter(METRICS_NAMESPACE, "computed")
        self._writer = None

    def setup(self) -> None:
        info = self.module_info
        self._cache = _shared_cache(self.bottleneck_dir, self.module_key, self.feature_dim)
        self._model = _per_process(
            ("model", info["handle"], info["module_cache_dir"], self.module_key),
            lambda: _WorkerModel(
                info["handle"], info["module_cache_dir"], self.module_key, info["settings"]
            ),
        )
        self._writer = None

    def start_bundle(self) -> None:
        self._writer = self._cache.cache.writer(self.module_info["shard_rows"])

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
    bottleneck_dir: str,
    module_key: str,
    feature_dim: int,
    module_info: dict,
) -> beam.PCollection:
    """Add the extraction steps for `paths` to `pipeline`; returns the per-batch counts.

    `module_info`: handle, module_cache_dir, input_size, max_pixels, shard_rows and settings
    (backend, batch_size, num_threads).
    """
    batch_size = module_info["settings"]["batch_size"]
    args = (os.fspath(Path(bottleneck_dir).expanduser()), module_key, feature_dim, module_info)
    return (
        pipeline
        | "ListImages" >> beam.Create([os.fsencode(p) for p in paths])  # bytes: any file name
        | "Reshuffle" >> beam.Reshuffle()
        | "ReadDecode" >> beam.ParDo(DecodeImages(*args))
        | "Batch"
        >> beam.BatchElements(
            min_batch_size=min(MIN_BATCH_SIZE, batch_size), max_batch_size=batch_size
        )
        | "ExtractWrite" >> beam.ParDo(ExtractToCache(*args))
    )


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


def extract(args: argparse.Namespace, options: PipelineOptions) -> dict:
    """Run the pipeline with checked flags; returns the summary."""
    start = time.perf_counter()
    try:
        pipeline = beam.Pipeline(options=options)
    except ValueError as err:  # e.g. an unknown --runner
        raise UsageError(str(err).splitlines()[0]) from None
    import_tensorflow_quietly()
    from retrain import scan
    from retrain.bottlenecks import load_module, open_cache

    image_set = scan.scan_image_dir(args.image_dir, 0, 0)
    for path, reason in image_set.ignored:
        log.warning("Ignoring %s: %s", path, reason)
    module = load_module(
        ModuleConfig(handle=args.tfhub_module, cache_dir=args.module_cache_dir or None)
    )
    cache = open_cache(args.bottleneck_dir, module)
    module_key = cache.folder.name
    paths = image_set.paths
    keys, _ = file_keys(paths)  # unreadable files: the worker reports them
    cached = cache.locate(keys, by="file")["shard"] >= 0
    todo = [path for path, known in zip(paths, cached) if not known]
    cached_here = len(image_set) - len(todo)
    log.info(
        "%d images in %d classes: %d bottlenecks cached, %d to check and compute with Beam "
        "(module %s, cache folder %s)",
        len(image_set),
        len(image_set.labels),
        cached_here,
        len(todo),
        module.handle,
        cache.folder,
    )
    summary = {
        "images": len(image_set),
        "cached": cached_here,
        "computed": 0,
        "failed": 0,
        "pipeline_seconds": 0.0,
        "images_per_second": 0.0,
        "cache_folder": str(cache.folder),
        "module": module.handle,
    }
    if todo:
        module_info = {
            "handle": module.handle,
            "module_cache_dir": args.module_cache_dir,
            "input_size": list(module.input_size),
            "max_pixels": args.max_image_pixels,
            "shard_rows": args.shard_rows,
            "settings": {
                "backend": args.extraction_backend,
                "batch_size": args.extraction_batch_size,
                "num_threads": args.num_threads,
            },
        }
        build_pipeline(
            pipeline, todo, args.bottleneck_dir, module_key, module.feature_dim, module_info
        )
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
        counts = _counters(result)
        if counts is None:
            summary.update(computed=None, failed=None)
        else:
            summary["cached"] += counts.get("cached", 0)
            summary["computed"] = counts.get("computed", 0)
            summary["failed"] = counts.get("failed", 0)
            if seconds > 0:
                summary["images_per_second"] = round(summary["computed"] / seconds, 2)
        summary["pipeline_seconds"] = round(seconds, 3)
    summary["total_seconds"] = round(time.perf_counter() - start, 3)
    log.info(
        "Bottlenecks: %s computed, %s already cached, %s files skipped (%.1f s)",
        summary["computed"],
        summary["cached"],
        summary["failed"],
        summary["total_seconds"],
    )
    if args.summary_json:
        atomic_write_text(args.summary_json, json.dumps(summary, indent=2) + "\n")
    return summary


def _setup_logging(verbosity: str) -> None:
    from retrain.cli import setup_logging

    setup_logging(verbosity)
    if verbosity != "DEBUG":
        logging.getLogger("apache_beam").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the command with `argv` (default sys.argv); returns the exit status."""
    argv = list(sys.argv if argv is None else argv)
    parser = argument_parser()
    try:
        if any(arg in ("-h", "--help") for arg in argv[1:]):
            parser.print_help()
            return 0
        if beam is None:
            raise UsageError(
                f"Apache Beam is not installed ({_BEAM_IMPORT_ERROR}); pip install 'retrain[beam]'"
            )
        args, beam_argv = parser.parse_known_args(argv[1:])
        check_args(args)
        options = pipeline_options(beam_argv, parser)
        _setup_logging(args.logging_verbosity)
        print(json.dumps(extract(args, options)))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished shards are kept in the cache", file=sys.stderr)
        return 130
    except RetrainError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
