"""The bottleneck stage: every usable image's feature vector, cached.

`load_module` resolves the configured module; `compute_bottlenecks` looks every image up in the
cache, computes what is missing (alone, or this worker's share in a multi-worker cluster) and
returns `Bottlenecks`: where each usable image's vector is, with its label, split and path.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrain.bottlenecks import auto, backends, distort, distribute, extract
from retrain.bottlenecks.cache import BottleneckCache, key_array, module_cache_key
from retrain.bottlenecks.splits import FeatureSplit
from retrain.config import DistortionConfig, ModuleConfig, RetrainConfig
from retrain.data import scan
from retrain.data.decode import ImageDecodeError, decode_image
from retrain.data.preprocess import PREPROCESSING_ID, to_module_input
from retrain.data.stage import scan_images
from retrain.errors import ConfigError, RetrainError
from retrain.models.loading import ImageModule, ModuleError, resolve_module
from retrain.utils.interrupt import check as check_interrupt

if TYPE_CHECKING:
    import tensorflow as tf

    from retrain.heads.head import Head

log = logging.getLogger("retrain")


@dataclass
class DistortedCopies:
    """The cached vectors of distorted copies of training images."""

    settings: DistortionConfig
    locations: np.ndarray  # cache.LOCATION_DTYPE, one per usable copy
    rows: np.ndarray  # each copy's image, as a row of Bottlenecks
    computed: int  # by this process
    reused: int  # found in the cache
    seconds: float  # lookup and extraction

    def metrics(self) -> dict:
        """The copies' figures for --metrics_json."""
        return {
            "mode": "cached copies",
            "copies_per_image": self.settings.copies,
            "vectors": int(len(self.locations)),
            "computed": self.computed,
            "reused": self.reused,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Bottlenecks:
    """Where the vectors of the usable images are cached, with their labels, splits and paths."""

    cache: BottleneckCache
    locations: np.ndarray  # cache.LOCATION_DTYPE
    labels: np.ndarray
    split_codes: np.ndarray  # int8, an index into scan.SPLITS
    paths: scan.PathList
    skipped: list[dict]
    computed: int  # by this process
    seconds: float  # the whole phase: lookup, hashing, module loading, backend choice, extraction
    extraction_seconds: float = 0.0  # of those, decoding, the model and cache writes only
    cluster_computed: int | None = None  # by all the workers of a multi-worker run
    copies: DistortedCopies | None = None  # of the training images, if asked for
    backend: str | None = None  # what computed the vectors (None: every one was cached)
    backend_reason: str = ""  # why that backend
    int8: bool = False  # the vectors are the int8 model's (else the float model's)

    def in_split(self, name: str) -> np.ndarray:
        """Mask of the images of one split."""
        return scan.split_mask(self.split_codes, name)

    def split(self, name: str) -> FeatureSplit:
        """The cached vectors and labels of one split."""
        picks = np.flatnonzero(self.in_split(name))
        return FeatureSplit(self.cache, self.locations[picks], self.labels[picks])

    def training(self) -> FeatureSplit:
        """The training split's vectors, followed by those of its distorted copies."""
        train = self.split("training")
        if self.copies is None or not len(self.copies.locations):
            return train
        return FeatureSplit(
            self.cache,
            np.concatenate([train.locations, self.copies.locations]),
            np.concatenate([train.y, self.labels[self.copies.rows]]),
        )

    def paths_of(self, name: str) -> scan.PathList:
        """The image files of one split, in the order of `split(name)`."""
        return self.paths.take(self.in_split(name))

    def check_trainable(self, labels: list[str], head: Head) -> None:
        """Raise RetrainError naming every class (multi-label: label) of `head`'s outputs
        (named `labels`) left without a usable training image (multi-label: one where it
        applies)."""
        present = head.positives(self.labels[self.in_split("training")]) > 0
        missing = [label for label, there in zip(labels, present) if not there]
        if missing:
            raise RetrainError(
                f"no usable training images for {head.output_noun} "
                + ", ".join(f"'{m}'" for m in missing)
                + " (all of them were skipped; see the warnings above)"
            )


def load_module(settings: ModuleConfig) -> ImageModule:
    """Resolve `settings.handle`, converting a bundled model on first use; an unusable handle
    is a ConfigError naming `module.handle`."""
    try:
        cache_dir = Path(settings.cache_dir).expanduser() if settings.cache_dir else None
        return resolve_module(settings.handle, cache_dir)
    except ModuleError as err:
        raise ConfigError("{0}: " + str(err), "module.handle") from None


class LazyModule:
    """The image module, loaded from disk only when first used: a run with a filled cache (and
    a verified TFLite conversion) never needs it, which saves seconds and memory."""

    def __init__(self, module: ImageModule):
        self.module = module
        self._loaded = None

    def get(self):
        """The loaded module object."""
        if self._loaded is None:
            self._loaded = self.module.load()
        return self._loaded

    def __call__(self, images):
        """Features of `images`, like the loaded module."""
        return self.get()(images)

    def release(self) -> None:
        """Drop the loaded module (its weights and graphs): `get` loads it again if needed."""
        self._loaded = None


def open_cache(
    bottleneck_dir: str | Path,
    module: ImageModule,
    calibration: backends.Calibration | None = None,
) -> BottleneckCache:
    """The module's folder of the bottleneck cache, created with its module.json: of float
    vectors, or with `calibration`, of the int8 model's calibrated on it (another folder)."""
    description = {
        "module": module.handle,
        "fingerprint": module.fingerprint,
        "preprocessing": PREPROCESSING_ID,
    }
    recipe = PREPROCESSING_ID
    if calibration is not None:
        recipe = f"{PREPROCESSING_ID}\0{calibration.recipe}"
        description |= {
            "precision": "int8",
            "extraction": calibration.recipe,
            "calibration_images": len(calibration.paths),
        }
    return BottleneckCache(
        bottleneck_dir,
        module_cache_key(module.fingerprint, recipe),
        module.feature_dim,
        description=description,
        dtype=module.vector_dtype,
    )


def int8_calibration(
    image_set: scan.ImageSet, settings: ModuleConfig, max_pixels: int
) -> backends.Calibration | None:
    """For the int8 backend, its calibration set: a seeded pick of `image_set`'s training
    images (backends.calibration_set); None for any other backend."""
    if settings.extraction_backend != backends.INT8:
        return None
    training = image_set.paths.take(scan.split_mask(image_set.split_codes, "training"))
    return backends.calibration_set(list(training), max_pixels)


@dataclass(frozen=True)
class Parallelism:
    """Where extraction runs besides this process's one device: `mirrored`, data-parallel
    over this machine's devices; `cluster`, a multi-worker strategy whose workers each compute
    a share of what is missing."""

    mirrored: bool = False
    cluster: tf.distribute.Strategy | None = None


def compute_bottlenecks(
    image_set: scan.ImageSet,
    module: ImageModule,
    module_object: LazyModule,
    bottleneck_dir: str | Path,
    settings: ModuleConfig,
    max_pixels: int,
    parallelism: Parallelism = Parallelism(),
    distortions: DistortionConfig | None = None,
) -> Bottlenecks:
    """Look every image up in the cache and compute what is missing with `settings`' backend
    (`parallelism.mirrored`: data-parallel over this machine's devices); with a multi-worker
    `parallelism.cluster`, each worker first computes its share (`_extract_in_cluster`). With
    `distortions.copies`, also the distorted copies of the training images (every worker
    computes what is missing: copies written twice are harmless)."""
    calibration = int8_calibration(image_set, settings, max_pixels)
    cache = open_cache(bottleneck_dir, module, calibration)
    paths = image_set.paths
    start = time.perf_counter()
    found = extract.lookup(paths, cache)
    extract.verify(found, cache, paths)
    missing = len(found.missing())
    log.info(
        "%d images: %d bottlenecks cached, %d to compute",
        len(paths),
        len(paths) - missing - len(found.skipped),
        missing,
    )
    extractor = _Extractors(
        module, module_object, settings, max_pixels, parallelism.mirrored, calibration
    )
    extract_some = partial(_extract, extractor, cache, paths, found)
    extraction, cluster_computed = extract.ExtractionStats(), None
    if parallelism.cluster is not None:
        extraction, cluster_computed = _extract_in_cluster(
            parallelism.cluster, cache, paths, found, extract_some
        )
    # Alone: all that is missing. In a cluster: what no worker could use, skipped with a reason.
    extraction += extract_some(found.missing())
    seconds = time.perf_counter() - start
    keep = np.ones(len(paths), dtype=bool)
    keep[list(found.skipped)] = False
    copies = None
    if distortions is not None and distortions.copies:
        train = np.flatnonzero(keep & scan.split_mask(image_set.split_codes, "training"))
        copies = _distorted_copies(found, paths, train, cache, extractor, distortions)
        copies.rows = (np.cumsum(keep) - 1)[copies.rows]  # image numbers -> rows of the result
    cache.release_index()  # from here on, vectors are read by location
    skipped = [
        {"file": scan.display_path(paths[i]), "reason": reason}
        for i, reason in sorted(found.skipped.items())
    ]
    return Bottlenecks(
        cache=cache,
        locations=found.locations[keep],
        labels=image_set.label_rows()[keep],
        split_codes=image_set.split_codes[keep],
        paths=paths.take(keep),
        skipped=skipped,
        computed=extraction.computed,
        seconds=seconds,
        extraction_seconds=extraction.seconds,
        cluster_computed=cluster_computed,
        copies=copies,
        backend=extractor.name,
        backend_reason=extractor.reason,
        int8=calibration is not None,
    )


def _distorted_copies(
    found: extract.LookupResult,
    paths: scan.PathList,
    train: np.ndarray,
    cache: BottleneckCache,
    extractors: _Extractors,
    settings: DistortionConfig,
) -> DistortedCopies:
    """Find or compute `settings.copies` distorted copies of each image `train` (indices into
    `paths`). A copy's cache keys derive from its image's keys, the distortion recipe and its
    number, so copies live beside the originals under keys no original or other recipe has."""
    start = time.perf_counter()
    sources = np.repeat(train, settings.copies)
    numbers = np.tile(np.arange(settings.copies), len(train))
    file_keys = key_array(
        [
            distort.copy_key(found.file_keys[i].tobytes(), settings, c)
            for i, c in zip(sources, numbers)
        ]
    )
    copies = extract.LookupResult(
        cache.locate(file_keys, by="file"),
        file_keys,
        np.zeros_like(file_keys),
        np.zeros(len(sources), dtype=bool),
    )
    unknown = np.flatnonzero(~copies.cached())
    for j in unknown:  # not found by file: by content (which hashes the image if need be)
        check_interrupt()
        source = int(sources[j])
        key = distort.copy_key(found.content_key(source, paths[source]), settings, numbers[j])
        copies.content_keys[j] = np.frombuffer(key, dtype=np.uint64)
        copies.hashed[j] = True
    copies.locations[unknown] = cache.locate(copies.content_keys[unknown], by="content")
    todo = copies.missing()
    log.info(
        "Distorted copies (%d per training image, %s): %d cached, %d to compute",
        settings.copies,
        distort.distortion_id(settings),
        len(sources) - len(todo),
        len(todo),
    )
    source_paths = paths.take(sources)
    params = distort.copy_params([copies.content_keys[j].tobytes() for j in todo])
    stats = extract.extract_missing(
        source_paths,
        copies,
        cache,
        extractors.backend([source_paths[j] for j in todo[:32]]) if todo else None,
        partial(
            distort.distorted_batches,
            params=params,
            settings=settings,
            input_size=extractors.module.input_size,
            batch_size=extractors.settings.extraction_batch_size,
            max_pixels=extractors.max_pixels,
        ),
        todo=todo,
    )
    usable = copies.cached()
    return DistortedCopies(
        settings=settings,
        locations=copies.locations[usable],
        rows=sources[usable],
        computed=stats.computed,
        reused=len(sources) - len(todo),
        seconds=time.perf_counter() - start,
    )


@dataclass
class _Extractors:
    """What extraction needs to pick its backend, once there is something to compute."""

    module: ImageModule
    module_object: LazyModule
    settings: ModuleConfig
    max_pixels: int
    mirrored: bool
    calibration: backends.Calibration | None = None  # of the int8 backend
    _chosen: backends.Extractor | None = None
    name: str | None = None  # the backend chosen, once chosen
    reason: str = ""

    def backend(self, todo: list[str]) -> backends.Extractor:
        """The extraction backend, chosen on first use and checked on a few of the images
        `todo` (the first of those to compute)."""
        if self._chosen is None:
            self._chosen = self._choose(todo)
        return self._chosen

    def _choose(self, todo: list[str]) -> backends.Extractor:
        if self.mirrored:
            strategy = distribute.make_strategy("mirrored", log)
            log.info("Extraction backend: tensorflow, %d replica(s)", strategy.num_replicas_in_sync)
            self.name, self.reason = "tensorflow", f"{strategy.num_replicas_in_sync} replica(s)"
            return distribute.mirrored_backend(self.module_object.get(), strategy)
        extractor, self.name, self.reason = backends.choose_backend(
            self.settings.extraction_backend,
            self.module,
            self.module_object,
            self._samples(todo),
            log,
            cache_dir=self.settings.cache_dir,
            calibration=self.calibration,
        )
        return extractor

    def _samples(self, todo: list[str]) -> np.ndarray | None:
        """Up to 4 of the first 32 images `todo`, decoded as module input, to check TFLite on."""
        samples = []
        size = self.module.input_size
        for path in todo[:32]:
            try:
                pixels = decode_image(path, size, self.max_pixels)
            except (ImageDecodeError, OSError):
                continue
            samples.append(to_module_input(pixels, size).numpy())
            if len(samples) == 4:
                break
        return np.stack(samples) if samples else None


def make_extractor(
    module: ImageModule,
    module_object: LazyModule,
    settings: ModuleConfig,
    max_pixels: int,
    mirrored: bool,
    sample_paths: list[str],
) -> backends.Extractor:
    """The extraction backend `settings` ask for (TFLite checked on a few of `sample_paths`),
    as `compute_bottlenecks` chooses it."""
    return _Extractors(module, module_object, settings, max_pixels, mirrored).backend(sample_paths)


def _extract(
    extractors: _Extractors,
    cache: BottleneckCache,
    paths: scan.PathList,
    found: extract.LookupResult,
    picks: list[int],
) -> extract.ExtractionStats:
    """Compute the missing vectors of images `picks` (indices into `paths`) into `cache`, and
    note in `found` where they are, or why they were skipped. Returns how many were computed
    and how long that took."""
    if not picks:
        return extract.ExtractionStats()
    stats = extract.extract_missing(
        paths,
        found,
        cache,
        extractors.backend([paths[i] for i in picks[:32]]),
        extract.DecodedBatches(
            extractors.module.input_size,
            extractors.settings.extraction_batch_size,
            extractors.max_pixels,
        ),
        todo=picks,
    )
    if stats.computed:
        log.info(
            "Computed %d bottlenecks in %.1f s (%.1f images/s)",
            stats.computed,
            stats.seconds,
            stats.images_per_second,
        )
    return stats


def _merge(found: extract.LookupResult, picks: list[int], part: extract.LookupResult) -> None:
    """Copy `part`, the lookup of images `picks`, into `found` (the lookup of all images)."""
    found.locations[picks] = part.locations
    found.content_keys[picks] = part.content_keys
    found.hashed[picks] = part.hashed
    found.skipped.update({picks[j]: reason for j, reason in part.skipped.items()})


def _extract_in_cluster(
    cluster: tf.distribute.Strategy,
    cache: BottleneckCache,
    paths: scan.PathList,
    found: extract.LookupResult,
    extract_some: Callable[[list[int]], extract.ExtractionStats],
) -> tuple[extract.ExtractionStats, int]:
    """Compute this worker's share of the missing vectors, wait for every worker, then look up
    what the others computed (`found` is updated). Returns (what this worker computed, how many
    the cluster computed)."""
    todo = found.missing()
    share = distribute.worker_share(todo)
    log.info("This worker computes %d of the %d missing bottlenecks", len(share), len(todo))
    mine = extract_some(share)
    total = int(distribute.barrier(cluster, mine.computed))
    log.info("The cluster's workers computed %d bottlenecks together", total)
    cache.refresh()
    todo = found.missing()
    again = extract.lookup([paths[i] for i in todo], cache)
    extract.verify(again, cache, [paths[i] for i in todo])
    _merge(found, todo, again)
    return mine, total


@contextlib.contextmanager
def bottleneck_folder(bottleneck_dir: str | None) -> Iterator[str]:
    """`bottleneck_dir`, or a temporary folder removed on the way out."""
    if bottleneck_dir:
        yield bottleneck_dir
        return
    with tempfile.TemporaryDirectory(prefix="retrain-bottlenecks-") as folder:
        log.info("No bottleneck folder given: the vectors are not kept after this run")
        yield folder


@dataclass
class CachedRun:
    """What the commands that only read the vectors (audit, learning-rate finder) start from:
    the images, the module, every vector cached, and the folder the vectors live in."""

    image_set: scan.ImageSet
    module: ImageModule
    module_object: LazyModule
    bottlenecks: Bottlenecks
    folder: str


@contextlib.contextmanager
def cached_bottlenecks(config: RetrainConfig) -> Iterator[CachedRun]:
    """The config validated, its images scanned, its module loaded and every vector cached
    (computing only what is missing), on one machine; the vectors' folder lasts while the
    context does."""
    config.validate()
    image_set = scan_images(config)
    module = load_module(config.module)
    module_object = LazyModule(module)
    with bottleneck_folder(config.cache.bottleneck_dir) as folder:
        b = compute_bottlenecks(
            image_set,
            module,
            module_object,
            folder,
            auto.extraction_settings(config, len(image_set))[0],  # what a run reads
            config.data.max_image_pixels,
        )
        yield CachedRun(image_set, module, module_object, b, folder)


def distortion_metrics(config: RetrainConfig, b: Bottlenecks) -> dict | None:
    """How training images were distorted: cached copies, or on the fly (None: not at all)."""
    if b.copies is not None:
        return b.copies.metrics()
    if not config.distortions.active:
        return None
    steps, batch = config.training.how_many_training_steps, config.training.train_batch_size
    return {"mode": "on the fly", "vectors": steps * batch, "computed": steps * batch}


def extraction_metrics(
    config: RetrainConfig, choice: auto.AutoChoice | None, b: Bottlenecks
) -> dict:
    """How the vectors were made, for --metrics_json: the backend asked for, what `auto` chose
    on this CPU and why (`choice`: None when a backend was named), the model whose vectors they
    are ("int8" or "float"), and the backend that computed them and why (None: all cached)."""
    return {
        "requested": config.module.extraction_backend,
        "auto": {"backend": choice.backend, "reason": choice.reason or None} if choice else None,
        "model": "int8" if b.int8 else "float",
        "backend": b.backend,
        "reason": b.backend_reason or None,
    }


def cluster_metrics(b: Bottlenecks) -> dict:
    """A multi-worker run's figures: which worker this is, what the workers computed."""
    number, count = distribute.cluster_position()
    return {"worker": number, "workers": count, "bottlenecks_computed": b.cluster_computed}
