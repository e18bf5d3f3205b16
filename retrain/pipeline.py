"""One retraining run, start to finish: scan, cache bottlenecks, train, evaluate, export.

`cli` parses and checks the flags, then calls `run`. Everything heavy (TensorFlow) is imported
here, after the flags were found valid, so a typo costs no wait.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrain import backends, distribute, export, extract, finetune, scan
from retrain import evaluate as evaluation
from retrain.atomic import atomic_write_text
from retrain.cache import BottleneckCache, module_cache_key
from retrain.decode import ImageDecodeError, decode_image
from retrain.errors import RetrainError, UsageError
from retrain.features import FeatureSplit, Split
from retrain.interrupt import check as check_interrupt
from retrain.models.loading import ImageModule, ModuleError, default_cache_dir, resolve_module
from retrain.preprocess import PREPROCESSING_ID, to_module_input
from retrain.train import Summaries, TrainConfig, TrainResult, train_head

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger("retrain")


class AccuracyBelowThreshold(RetrainError):
    """--assert_accuracy_at_least was not met."""

    exit_code = 3


# A streamed validation split is evaluated on a random subset of at most this many images
# (51 MB of vectors: what a 100k-image run holds, so memory stays flat beyond it).
STREAMED_VALIDATION_ROWS = 10_000


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

    def in_split(self, name: str) -> np.ndarray:
        """Mask of the images of one split."""
        return scan.split_mask(self.split_codes, name)

    def split(self, name: str) -> FeatureSplit:
        picks = np.flatnonzero(self.in_split(name))
        return FeatureSplit(self.cache, self.locations[picks], self.labels[picks])

    def paths_of(self, name: str) -> scan.PathList:
        return self.paths.take(self.in_split(name))


def load_module(f) -> ImageModule:
    """Resolve --tfhub_module, converting a bundled model on first use."""
    try:
        cache_dir = Path(f.module_cache_dir).expanduser() if f.module_cache_dir else None
        return resolve_module(f.tfhub_module, cache_dir)
    except ModuleError as err:
        raise UsageError(f"--tfhub_module: {err}") from None


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


def open_cache(bottleneck_dir: str | Path, module: ImageModule) -> BottleneckCache:
    """The module's folder of the bottleneck cache, created with its module.json."""
    return BottleneckCache(
        bottleneck_dir,
        module_cache_key(module.fingerprint, PREPROCESSING_ID),
        module.feature_dim,
        description={
            "module": module.handle,
            "fingerprint": module.fingerprint,
            "preprocessing": PREPROCESSING_ID,
        },
    )


def compute_bottlenecks(
    f,
    image_set: scan.ImageSet,
    module: ImageModule,
    module_object: LazyModule,
    cluster: tf.distribute.Strategy | None = None,
) -> Bottlenecks:
    """Look every image up in the cache and compute what is missing; with a multi-worker
    `cluster`, each worker first computes its share (`_extract_in_cluster`)."""
    cache = open_cache(f.bottleneck_dir, module)
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
    extract_some = partial(_extract, f, module, module_object, cache, paths, found)
    extraction, cluster_computed = extract.ExtractionStats(), None
    if cluster is not None:
        extraction, cluster_computed = _extract_in_cluster(
            cluster, cache, paths, found, extract_some
        )
    # Alone: all that is missing. In a cluster: what no worker could use, skipped with a reason.
    extraction += extract_some(found.missing())
    seconds = time.perf_counter() - start
    cache.release_index()  # from here on, vectors are read by location
    keep = np.ones(len(paths), dtype=bool)
    keep[list(found.skipped)] = False
    skipped = [
        {"file": scan.display_path(paths[i]), "reason": reason}
        for i, reason in sorted(found.skipped.items())
    ]
    return Bottlenecks(
        cache=cache,
        locations=found.locations[keep],
        labels=image_set.label_indices[keep].astype(np.int64),
        split_codes=image_set.split_codes[keep],
        paths=paths.take(keep),
        skipped=skipped,
        computed=extraction.computed,
        seconds=seconds,
        extraction_seconds=extraction.seconds,
        cluster_computed=cluster_computed,
    )


def _extract(
    f,
    module: ImageModule,
    module_object: LazyModule,
    cache: BottleneckCache,
    paths: list[str],
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
        _extractor(f, module, module_object, [paths[i] for i in picks[:32]]),
        module.input_size,
        f.extraction_batch_size,
        f.max_image_pixels,
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
    paths: list[str],
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


def _extractor(f, module: ImageModule, module_object: LazyModule, todo: list[str]):
    """The extraction backend for --extraction_backend, checked on a few of the images `todo`
    (the first of those to compute)."""
    if not todo:
        return None  # nothing to compute: no module loading, no conversion
    if f.distribution_strategy == "mirrored":
        strategy = distribute.make_strategy(f.distribution_strategy, log)
        log.info("Extraction backend: tensorflow, %d replica(s)", strategy.num_replicas_in_sync)
        return distribute.mirrored_backend(module_object.get(), strategy)
    samples = []
    for path in todo[:32]:
        try:
            pixels = decode_image(path, module.input_size, f.max_image_pixels)
        except (ImageDecodeError, OSError):
            continue
        samples.append(to_module_input(pixels, module.input_size).numpy())
        if len(samples) == 4:
            break
    extractor, _, _ = backends.choose_backend(
        f.extraction_backend,
        module,
        module_object,
        np.stack(samples) if samples else None,
        log,
        cache_dir=f.module_cache_dir or None,
    )
    return extractor


def _check_trainable(b: Bottlenecks, labels: list[str]) -> None:
    train_labels = set(b.labels[b.in_split("training")].tolist())
    missing = [labels[i] for i in range(len(labels)) if i not in train_labels]
    if missing:
        raise RetrainError(
            "no usable training images for class "
            + ", ".join(f"'{m}'" for m in missing)
            + " (all of them were skipped; see the warnings above)"
        )


def _training_inputs(b: Bottlenecks, seed: int) -> tuple[Split | FeatureSplit, Split]:
    """The training split (in memory if it fits, else streamed) and the validation split."""
    train = b.split("training")
    if train.fits_in_memory():
        train = train.load()
    else:
        log.info(
            "Streaming %d training bottlenecks from the cache (%.1f GB)",
            len(train),
            train.nbytes / 1e9,
        )
    validation = b.split("validation")
    if not validation.fits_in_memory():
        validation = validation.subset(STREAMED_VALIDATION_ROWS, seed)
        log.info("Validating on a random %d of the validation images", len(validation))
    return train, validation.load()


def run(f) -> dict:
    """Run retraining with checked flags `f`; returns the metrics written to --metrics_json."""
    wall_start = time.perf_counter()
    cluster = _cluster_strategy(f)  # first of all: before TensorFlow runs any op
    chief = cluster is None or distribute.is_chief()
    image_set = scan.scan_image_dir(f.image_dir, f.validation_percentage, f.testing_percentage)
    needed = tuple(
        split
        for split, pct in (
            ("validation", f.validation_percentage),
            ("testing", f.testing_percentage),
        )
        if pct > 0
    )
    for warning in scan.check_splits_populated(image_set, needed):
        log.warning(warning)
    for path, reason in image_set.ignored:
        log.warning("Ignoring %s: %s", path, reason)
    counts = image_set.split_counts()
    log.info(
        "Found %d classes, %d images (training %d, validation %d, testing %d)",
        len(image_set.labels),
        len(image_set),
        counts["training"],
        counts["validation"],
        counts["testing"],
    )
    if f.split_manifest and chief:
        scan.write_split_manifest(image_set, f.split_manifest)

    module = load_module(f)
    log.info(
        "Module %s: input %dx%d, %d features", module.handle, *module.input_size, module.feature_dim
    )
    module_object = LazyModule(module)
    check_interrupt()
    bottlenecks = compute_bottlenecks(f, image_set, module, module_object, cluster)
    _check_trainable(bottlenecks, image_set.labels)
    check_interrupt()
    config, result = _train(f, bottlenecks, len(image_set.labels), module, module_object, chief)

    test = bottlenecks.split("testing")
    if f.test_batch_size > 0:
        test = test.subset(f.test_batch_size, f.random_seed)
    test_eval = None
    if len(test):
        test_eval = evaluation.evaluate_chunks(
            result.weights,
            result.biases,
            ((c.x, c.y) for c in test.chunks()),
            len(image_set.labels),
        )
        log.info("Final test accuracy = %.1f%% (N=%d)", 100 * test_eval.accuracy, len(test))
        if f.print_misclassified_test_images and f.test_batch_size < 0:
            _print_misclassified(bottlenecks, test_eval, image_set.labels)

    # Fine-tuning: the whole network, exported instead of the pretrained module + layer.
    tuned = None
    if f.fine_tune_steps:
        tuned = finetune.run_from_flags(f, module, bottlenecks, result, cluster)
        if tuned.after is not None:
            test_eval = tuned.after  # the exported model's; cached bottlenecks no longer fit it
    check_interrupt()  # a run stopped before here writes no outputs
    if chief:
        _export(f, image_set.labels, module, module_object, result, tuned)

    metrics = {
        "test_accuracy": test_eval.accuracy if test_eval else None,
        "test_cross_entropy": test_eval.cross_entropy if test_eval else None,
        "per_class_test_accuracy": dict(zip(image_set.labels, test_eval.per_class_accuracy))
        if test_eval
        else None,
        "final_train_accuracy": result.history[-1]["train_accuracy"] if result.history else None,
        "final_validation_accuracy": result.history[-1].get("validation_accuracy")
        if result.history
        else None,
        "classes": image_set.labels,
        "images": scan.count_splits(bottlenecks.split_codes),
        "skipped": bottlenecks.skipped + [{"file": p, "reason": r} for p, r in image_set.ignored],
        "module": module.handle,
        "bottlenecks_computed": bottlenecks.computed,
        "bottleneck_seconds": round(bottlenecks.seconds, 3),
        "bottleneck_images_per_second": _per_second(bottlenecks.computed, bottlenecks.seconds),
        "extraction_seconds": round(bottlenecks.extraction_seconds, 3),
        "extraction_images_per_second": _per_second(
            bottlenecks.computed, bottlenecks.extraction_seconds
        ),
        "training_steps": config.how_many_training_steps,
        "resumed_from_step": result.resumed_from_step,
        "training_seconds": round(result.seconds, 3),
        "total_seconds": round(time.perf_counter() - wall_start, 3),
        "output_graph": f.output_graph,
        "output_labels": f.output_labels,
    }
    if tuned is not None:
        metrics["fine_tune"] = tuned.metrics()
    if cluster is not None:
        metrics["cluster"] = _cluster_metrics(bottlenecks)
    if f.metrics_json and chief:
        atomic_write_text(f.metrics_json, json.dumps(metrics, indent=2) + "\n")
    if cluster is not None:
        distribute.barrier(cluster)  # the others wait for the chief's outputs: all end together
    threshold = f.assert_accuracy_at_least
    if threshold is not None:
        accuracy = metrics["test_accuracy"]
        if accuracy is None or accuracy < threshold:
            raise AccuracyBelowThreshold(
                f"--assert_accuracy_at_least: test accuracy {accuracy} is below {threshold}"
            )
    return metrics


def _cluster_strategy(f) -> tf.distribute.Strategy | None:
    """The MultiWorkerMirroredStrategy of --distribution_strategy=multi_worker_mirrored (made
    before TensorFlow runs any op, as it must be), else None."""
    if f.distribution_strategy != "multi_worker_mirrored":
        return None
    strategy = distribute.make_strategy(f.distribution_strategy, log)
    if not distribute.is_chief():
        log.info(
            "Not the chief: this worker leaves the outputs (graph, labels, SavedModel, TFLite, "
            "metrics, summaries, checkpoints, split manifest) to the chief"
        )
    return strategy


def _per_second(count: int, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 and count else 0.0


def _cluster_metrics(b: Bottlenecks) -> dict:
    """A multi-worker run's figures: which worker this is, what the workers computed."""
    number, count = distribute.cluster_position()
    return {"worker": number, "workers": count, "bottlenecks_computed": b.cluster_computed}


def _train(
    f,
    b: Bottlenecks,
    num_classes: int,
    module: ImageModule,
    module_object: LazyModule,
    chief: bool,
) -> tuple[TrainConfig, TrainResult]:
    """Train the new layer on the bottlenecks. Only the chief writes summaries, checkpoints and
    intermediate graphs. In a cluster every worker trains the same layer (same data and seed);
    fine-tuning starts from the chief's in any case (MultiWorkerMirroredStrategy gives every
    worker the chief's initial values of the variables made in its scope)."""
    config = TrainConfig(
        how_many_training_steps=f.how_many_training_steps,
        learning_rate=f.learning_rate,
        train_batch_size=f.train_batch_size,
        eval_step_interval=f.eval_step_interval,
        validation_batch_size=f.validation_batch_size,
        seed=f.random_seed,
    )
    summaries = Summaries(f.summaries_dir) if chief else None
    on_step = None
    if chief and f.intermediate_store_frequency > 0:
        on_step = _intermediate_graph_writer(f, module, module_object)
    try:
        train, validation = _training_inputs(b, f.random_seed)
        result = train_head(
            train,
            validation,
            num_classes,
            config,
            summaries,
            checkpoint_dir=(f.checkpoint_path or None) if chief else None,
            resume=f.resume and chief,
            on_step=on_step,
            callback_every=f.intermediate_store_frequency,
        )
    finally:
        if summaries is not None:
            summaries.close()
    log.info("Trained %d steps in %.1f s", config.how_many_training_steps, result.seconds)
    return config, result


def _export(
    f,
    labels: list[str],
    module: ImageModule,
    module_object: LazyModule,
    result: TrainResult,
    tuned: finetune.FineTuneResult | None,
) -> None:
    """Write --output_graph, --output_labels, --output_tflite and --saved_model_dir: the
    fine-tuned network if `tuned`, else the pretrained module with the trained layer."""
    weights, biases = (tuned.weights, tuned.biases) if tuned else (result.weights, result.biases)
    export.write_frozen_graph(
        finetune.classifier_graph(tuned, f.final_tensor_name)
        if tuned
        else _classifier_graph(f, module, module_object, weights, biases),
        f.output_graph,
    )
    export.write_labels(labels, f.output_labels)
    log.info("Saved the frozen graph to %s and labels to %s", f.output_graph, f.output_labels)
    if not (f.output_tflite or f.saved_model_dir):
        return
    classifier = export.Classifier(
        tuned.module_object if tuned else module_object.get(),
        weights,
        biases,
        module.input_size,
        f.final_tensor_name,
    )
    if f.output_tflite:
        export.write_tflite(classifier, f.output_tflite)
        log.info("Saved the TFLite model to %s", f.output_tflite)
    if f.saved_model_dir:
        export.write_saved_model(classifier, labels, f.saved_model_dir)
        log.info("Saved the SavedModel to %s", f.saved_model_dir)


def _print_misclassified(
    b: Bottlenecks, test_eval: evaluation.Evaluation, labels: list[str]
) -> None:
    log.info("=== MISCLASSIFIED TEST IMAGES ===")
    test_paths = b.paths_of("testing")
    truth = b.labels[b.in_split("testing")]
    for path, predicted, actual in zip(test_paths, test_eval.predictions, truth):
        if predicted != actual:
            log.info("%70s  %s", scan.display_path(path), labels[predicted])


def _classifier_graph(f, module: ImageModule, module_object: LazyModule, weights, biases):
    """The frozen classifier graph: the module's frozen graph (cached) plus the new layer."""
    root = Path(f.module_cache_dir).expanduser() if f.module_cache_dir else default_cache_dir()
    module_graph = export.cached_frozen_module(
        root / "frozen" / f"{module.fingerprint}-v1.pb", module_object.get, module.input_size
    )
    return export.classifier_graph_def(module_graph, weights, biases, f.final_tensor_name)


def _intermediate_graph_writer(f, module: ImageModule, module_object: LazyModule):
    folder = Path(f.intermediate_output_graphs_dir).expanduser()

    def on_step(step: int, weights: np.ndarray, biases: np.ndarray) -> None:
        if step % f.intermediate_store_frequency:
            return
        path = folder / f"intermediate_{step}.pb"
        export.write_frozen_graph(
            _classifier_graph(f, module, module_object, weights, biases), path
        )
        log.info("Saved intermediate graph %s", path)

    return on_step
