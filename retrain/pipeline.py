"""One retraining run, start to finish: the stages in order.

    scan and split -> bottlenecks -> head training -> (fine-tuning) -> evaluation -> export

`run(config)` is the library's entry point (`retrain.run`). Each stage is a function of its own
module with typed inputs and outputs; this module only hands the output of one to the next,
decides which process of a cluster writes (the chief), and reports progress in the log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrain.bottlenecks import distort, distribute
from retrain.bottlenecks.splits import FeatureSplit, Split
from retrain.bottlenecks.stage import (
    Bottlenecks,
    LazyModule,
    Parallelism,
    compute_bottlenecks,
    load_module,
    make_extractor,
)
from retrain.config import AUTO, RetrainConfig
from retrain.data import labels_csv, sampling, scan
from retrain.data.sampling import random_picks
from retrain.errors import RetrainError
from retrain.export import check as export_check
from retrain.export import writer as export
from retrain.heads.head import AnyEvaluation, Head, SigmoidHead, SoftmaxHead
from retrain.models import module_cache, quantize
from retrain.models.loading import ImageModule
from retrain.reporting import audit, health
from retrain.reporting import html as report
from retrain.reporting.audit import AuditReport
from retrain.results import RunResult, Timings
from retrain.training import cut, finetune, finetune_cut, lr_find
from retrain.training.head import (
    StepCallback,
    Summaries,
    TrainingSource,
    TrainResult,
    train_head,
)
from retrain.utils.atomic import atomic_write_text, check_writable_dir, exclusive, writing
from retrain.utils.interrupt import check as check_interrupt

if TYPE_CHECKING:
    import tensorflow as tf


log = logging.getLogger("retrain")

# A streamed validation split is evaluated on a random subset of at most this many images
# (51 MB of vectors: what a 100k-image run holds, so memory stays flat beyond it).
STREAMED_VALIDATION_ROWS = 10_000
# The projector shows a random sample of this many bottleneck vectors (25 MB of 1,280 floats).
PROJECTOR_SAMPLE = 5_000


def run(config: RetrainConfig) -> RunResult:
    """Retrain as `config` says and return what was trained, measured and written.

    Writes only what the config names (outputs, summaries, checkpoints, metrics); without a
    `cache.bottleneck_dir` the vectors live in a temporary folder removed at the end. Leaves
    logging and signal handlers as they are. Raises ConfigError for an invalid setting,
    RetrainError for unusable data or files, KeyboardInterrupt when interrupted.
    """
    if not isinstance(config, RetrainConfig):
        raise TypeError(f"run() takes a RetrainConfig, got {type(config).__name__}")
    config.validate()
    wall_start = time.perf_counter()
    cluster = _cluster_strategy(config)  # first of all: before TensorFlow runs any op
    chief = cluster is None or distribute.is_chief()
    image_set = scan_images(config, write_manifest=chief)

    module = load_module(config.module)
    log.info(
        "Module %s: input %dx%d, %d features", module.handle, *module.input_size, module.feature_dim
    )
    if config.fine_tuning.from_block:
        cut.check_cut(module, config.fine_tuning.from_block)
    module_object = LazyModule(module)
    check_interrupt()
    with _bottleneck_folder(config.cache.bottleneck_dir) as bottleneck_dir:
        bottlenecks = compute_bottlenecks(
            image_set,
            module,
            module_object,
            bottleneck_dir,
            config.module,
            config.data.max_image_pixels,
            Parallelism(config.distribution.strategy == "mirrored", cluster),
            distortions=config.distortions,
        )
        head = make_head(image_set)
        bottlenecks.check_trainable(image_set.labels, head)
        check_interrupt()
        rate_search = None
        if config.training.learning_rate == AUTO:
            rate_search = _search_rate(config, bottlenecks, head)
            training = replace(config.training, learning_rate=rate_search.suggestion)
            config = replace(config, training=training)
        trained = _train(config, bottlenecks, head, module, module_object, chief)
        evaluations = _calibrate(bottlenecks, trained, image_set.labels)
        test, test_paths = _test_split(config, bottlenecks)
        evaluations.update(_evaluate_test(test, trained, image_set.labels))

        projected = None
        if chief and config.outputs.summaries_dir:
            projected = _projector_sample(config, bottlenecks, image_set.labels)

        # Fine-tuning: the whole network, exported instead of the pretrained module + layer.
        tuned = None
        if config.fine_tuning.steps:
            if config.fine_tuning.from_block:
                tuned = _fine_tune_from_cut(
                    config, image_set, module, bottleneck_dir, bottlenecks, trained
                )
            else:
                tuned = _fine_tune(config, module, bottlenecks, trained, cluster)
            if tuned.after is not None and not tuned.head_alone:
                evaluations["testing"] = tuned.after  # cached bottlenecks no longer fit it
                evaluations.pop("validation", None)  # it measured the head before tuning
        training_paths = bottlenecks.paths_of("training")
    check_interrupt()  # a run stopped before here writes no outputs
    outputs = (
        _export(config, image_set.labels, module, module_object, trained, tuned, training_paths)
        if chief
        else {}
    )
    export_checks = export_check.check_exports(
        outputs,
        test_paths,
        evaluations.get("testing"),
        trained.head,
        tuned.input_size if tuned is not None else module.input_size,
        config.data.max_image_pixels,
        config.export.quantize,
        config.export.final_tensor_name,
    )
    result = RunResult(
        labels=image_set.labels,
        head=trained,
        evaluations=evaluations,
        images=scan.count_splits(bottlenecks.split_codes),
        skipped=bottlenecks.skipped + [{"file": p, "reason": r} for p, r in image_set.ignored],
        module=module.handle,
        bottlenecks_computed=bottlenecks.computed,
        training_steps=config.training.how_many_training_steps,
        timings=Timings(
            bottlenecks=bottlenecks.seconds,
            extraction=bottlenecks.extraction_seconds,
            training=trained.seconds,
            total=time.perf_counter() - wall_start,
        ),
        outputs=outputs,
        fine_tune=tuned,
        cluster=_cluster_metrics(bottlenecks) if cluster is not None else None,
        distortions=_distortion_metrics(config, bottlenecks),
        unlisted_images=image_set.unlisted,
        test_paths=test_paths,
        rate_search=rate_search,
        export_checks=export_checks,
    )
    if config.evaluation.print_misclassified_test_images:
        _print_misclassified(result)
    result.health = health.diagnose(
        result,
        _training_counts(bottlenecks, len(image_set.labels)),
        _cross_split_duplicates(bottlenecks),
        config.training.learning_rate,
    )
    _log_health(result.health)
    if chief and config.outputs.summaries_dir:
        _write_summaries(config.outputs.summaries_dir, result, projected)
    if config.outputs.report_html and chief:
        result.outputs["report_html"] = report.write_report(
            config.outputs.report_html, config, result
        )
        log.info("Wrote the report %s", config.outputs.report_html)
    if config.outputs.metrics_json and chief:
        metrics = result.metrics()
        text = json.dumps(metrics, indent=2, default=_plain) + "\n"
        atomic_write_text(config.outputs.metrics_json, text, "metrics")
        result.outputs["metrics_json"] = config.outputs.metrics_json
    if cluster is not None:
        distribute.barrier(cluster)  # the others wait for the chief's outputs: all end together
    return result


def audit_photos(config: RetrainConfig) -> AuditReport:
    """The audit (`retrain.reporting.audit`): the config's images scanned and their bottlenecks
    cached
    (computing only what is missing), then judged for suspect labels, duplicates and outliers;
    writes the CSVs to `audit.output_dir` and the counts to `outputs.metrics_json` if set.
    Trains nothing it keeps and exports nothing."""
    if not isinstance(config, RetrainConfig):
        raise TypeError(f"audit_photos() takes a RetrainConfig, got {type(config).__name__}")
    with _cached_bottlenecks(config) as (image_set, _, _, bottlenecks, _):
        findings = audit.audit_bottlenecks(
            bottlenecks, image_set.labels, config.audit, config.training, make_head(image_set)
        )
    log.info(
        "Audit of %d images in %.1f s: %d suspect labels, %d duplicate pairs (%d across "
        "splits), %d outliers%s",
        findings.images,
        findings.seconds,
        len(findings.suspects),
        len(findings.duplicates),
        len(findings.cross_split_duplicates()),
        len(findings.outliers),
        f"; CSVs in {config.audit.output_dir}" if findings.files else "",
    )
    for row in findings.suspects[:5]:
        log.info(
            "Suspect: %s is filed under %s, looks like %s (%.2f vs %.2f)",
            row["path"],
            row["label"],
            row["expected"],
            row["p_label"],
            row["p_expected"],
        )
    if config.outputs.metrics_json:
        text = json.dumps({"audit": findings.metrics()}, indent=2) + "\n"
        atomic_write_text(config.outputs.metrics_json, text, "metrics")
    if config.outputs.report_html:
        report.write_report(config.outputs.report_html, config, audit=findings)
        log.info("Wrote the report %s", config.outputs.report_html)
    return findings


def find_learning_rate(config: RetrainConfig) -> dict[str, lr_find.RateSearch]:
    """The learning-rate finder (`retrain --lr_find`): the config's images scanned and their
    bottlenecks cached (computing only what is missing), then the new layer's range test on
    the training split (see retrain.training.lr_find); with fine-tuning steps configured, the layer
    is
    then trained (at the configured rate, or the suggestion if that is 'auto') and fine-tuning
    range-tested too. Returns {"training": search[, "fine_tuning": search]}; logs loss against
    rate and the suggestions, writes the plots to TensorBoard if `outputs.summaries_dir` and
    the figures to `outputs.metrics_json`; keeps nothing it trains."""
    with _cached_bottlenecks(config) as (image_set, module, module_object, bottlenecks, folder):
        head = make_head(image_set)
        searches = {"training": _search_rate(config, bottlenecks, head)}
        if config.fine_tuning.steps:
            if config.training.learning_rate == AUTO:
                rate = searches["training"].suggestion
                config = replace(config, training=replace(config.training, learning_rate=rate))
            train, validation = _training_inputs(config, bottlenecks, module, module_object)
            trained = train_head(train, validation, head, config.training)
            if config.fine_tuning.from_block:
                part, activations = _cut_activations(config, image_set, module, folder, bottlenecks)
                searches["fine_tuning"] = _search_rate_from_cut(config, part, activations, trained)
            else:
                searches["fine_tuning"] = _search_fine_tuning_rate(
                    config, module, bottlenecks, trained
                )
    for name, search in searches.items():
        log.info("Learning-rate finder for %s:", name.replace("_", "-"))
        for line in search.text_plot():
            log.info("%s", line)
    if config.outputs.summaries_dir:
        from retrain.reporting import summaries

        with writing(config.outputs.summaries_dir, "TensorBoard summaries"):
            for name, search in searches.items():
                summaries.write_rate_search(config.outputs.summaries_dir, search, name)
    if config.outputs.metrics_json:
        figures = {name: search.metrics() for name, search in searches.items()}
        text = json.dumps({"lr_find": figures}, indent=2) + "\n"
        atomic_write_text(config.outputs.metrics_json, text, "metrics")
    return searches


def _search_fine_tuning_rate(
    config: RetrainConfig, module: ImageModule, b: Bottlenecks, trained: TrainResult
) -> lr_find.RateSearch:
    search = finetune.search_rate(
        module,
        trained.head,
        (trained.weights, trained.biases),
        finetune.split_images(b, "training"),
        config.fine_tuning,
        seed=config.training.random_seed,
        max_pixels=config.data.max_image_pixels,
        distortions=config.distortions,
    )
    _log_fine_tuning_search(search)
    return search


def _log_fine_tuning_search(search: lr_find.RateSearch) -> None:
    log.info(
        "Fine-tuning's learning-rate finder: %d steps in %.1f s; the loss was lowest at %.2g, "
        "suggested fine-tuning learning rate %g",
        len(search.rates),
        search.seconds,
        search.best_rate,
        search.suggestion,
    )


def _search_rate(config: RetrainConfig, b: Bottlenecks, head: Head) -> lr_find.RateSearch:
    train = b.training()
    search = lr_find.search_learning_rate(
        train.load() if train.fits_in_memory() else train, head, config.training
    )
    log.info(
        "Learning-rate finder: %d steps in %.1f s; the loss was lowest at %.2g, suggested "
        "learning rate %g (--optimizer %s)",
        len(search.rates),
        search.seconds,
        search.best_rate,
        search.suggestion,
        config.training.optimizer,
    )
    return search


@contextlib.contextmanager
def _cached_bottlenecks(
    config: RetrainConfig,
) -> Iterator[tuple[scan.ImageSet, ImageModule, LazyModule, Bottlenecks, str]]:
    """For the commands that only read the vectors (audit, learning-rate finder): the config
    validated, its images scanned, its module loaded and every vector cached (computing only
    what is missing), on one machine, and the vectors' folder, which lasts while the context
    does."""
    config.validate()
    image_set = scan_images(config)
    module = load_module(config.module)
    module_object = LazyModule(module)
    with _bottleneck_folder(config.cache.bottleneck_dir) as bottleneck_dir:
        yield (
            image_set,
            module,
            module_object,
            compute_bottlenecks(
                image_set,
                module,
                module_object,
                bottleneck_dir,
                config.module,
                config.data.max_image_pixels,
            ),
            bottleneck_dir,
        )


def _plain(value):
    """A NumPy scalar or array as the Python value json can write."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _training_counts(b: Bottlenecks, outputs: int) -> np.ndarray:
    """Training images per class (positives per label, for 0/1 label rows)."""
    labels = b.labels[b.in_split("training")]
    if labels.ndim == 2:
        return labels.sum(axis=0).astype(np.int64)
    return sampling.class_counts(labels, outputs)


def _cross_split_duplicates(b: Bottlenecks) -> int:
    """Pairs of files with the same bytes in different splits (the health report's
    `duplicates_across_splits` warning is the run's hint at them)."""
    pairs = audit.identical_pairs(b.locations)
    return int(sum(b.split_codes[i] != b.split_codes[j] for i, j in pairs))


def _log_health(findings: list[health.Finding]) -> None:
    for finding in findings:
        level = logging.WARNING if finding.severity == "warning" else logging.INFO
        log.log(level, "Health: %s. Suggestion: %s", finding.message, finding.suggestion)
    if not any(f.severity == "warning" for f in findings):
        log.info("Health: no problem found")


def scan_images(config: RetrainConfig, write_manifest: bool = True) -> scan.ImageSet:
    """The scan-and-split stage: classes, images and their splits, with warnings logged and
    the split manifest written if the config names one (and `write_manifest`)."""
    data = config.data
    image_set = labels_csv.find_images(config.image_dir, data)
    needed = tuple(
        split
        for split, pct in (
            ("validation", data.validation_percentage),
            ("testing", data.testing_percentage),
        )
        if pct > 0
    )
    for warning in scan.check_splits_populated(image_set, needed):
        log.warning(warning)
    for path, reason in image_set.ignored:
        log.warning("Ignoring %s: %s", path, reason)
    if image_set.unlisted:
        log.warning(
            "Ignoring %d image files under %s that %s does not list",
            image_set.unlisted,
            config.image_dir,
            data.labels_csv,
        )
    counts = image_set.split_counts()
    log.info(
        "Found %d %s, %d images (training %d, validation %d, testing %d)",
        len(image_set.labels),
        "labels" if image_set.multi_label else "classes",
        len(image_set),
        counts["training"],
        counts["validation"],
        counts["testing"],
    )
    if config.outputs.split_manifest and write_manifest:
        scan.write_split_manifest(image_set, config.outputs.split_manifest)
    return image_set


def make_head(image_set: scan.ImageSet) -> Head:
    """The output layer's head for the data: a sigmoid per label for multi-label data (labels
    from a CSV), else retrain.py's softmax over the classes."""
    if image_set.multi_label:
        return SigmoidHead(len(image_set.labels))
    return SoftmaxHead(len(image_set.labels))


@contextlib.contextmanager
def _bottleneck_folder(bottleneck_dir: str | None) -> Iterator[str]:
    """`bottleneck_dir`, or a temporary folder removed on the way out."""
    if bottleneck_dir:
        yield bottleneck_dir
        return
    with tempfile.TemporaryDirectory(prefix="retrain-bottlenecks-") as folder:
        log.info("No bottleneck folder given: the vectors are not kept after this run")
        yield folder


def _training_inputs(
    config: RetrainConfig, b: Bottlenecks, module: ImageModule, module_object: LazyModule
) -> tuple[TrainingSource, Split]:
    """The training split (in memory if it fits, else streamed from the cache, or distorted
    afresh at every step) and the validation split."""
    train = _training_source(config, b, module, module_object)
    validation = b.split("validation")
    if not validation.fits_in_memory():
        validation = validation.subset(STREAMED_VALIDATION_ROWS, config.training.random_seed)
        log.info("Validating on a random %d of the validation images", len(validation))
    return train, validation.load()


def _training_source(
    config: RetrainConfig, b: Bottlenecks, module: ImageModule, module_object: LazyModule
) -> TrainingSource:
    distortions = config.distortions
    if distortions.active and not distortions.copies:
        paths = b.paths_of("training")
        log.info(
            "Distorting the training images afresh at every step (%s); --distorted_copies "
            "would cache copies instead",
            distort.distortion_id(distortions),
        )
        return distort.DistortedStream(
            paths,
            b.labels[b.in_split("training")],
            distortions,
            make_extractor(
                module,
                module_object,
                config.module,
                config.data.max_image_pixels,
                config.distribution.strategy == "mirrored",
                list(paths[:32]),
            ),
            module.input_size,
            module.feature_dim,
            config.data.max_image_pixels,
        )
    train = b.training()
    if train.fits_in_memory():
        return train.load()
    log.info(
        "Streaming %d training bottlenecks from the cache (%.1f GB)",
        len(train),
        train.nbytes / 1e9,
    )
    return train


def _cluster_strategy(config: RetrainConfig) -> tf.distribute.Strategy | None:
    """The MultiWorkerMirroredStrategy of a multi_worker_mirrored run (made before TensorFlow
    runs any op, as it must be), else None."""
    if config.distribution.strategy != "multi_worker_mirrored":
        return None
    strategy = distribute.make_strategy(config.distribution.strategy, log)
    if not distribute.is_chief():
        log.info(
            "Not the chief: this worker leaves the outputs (graph, labels, SavedModel, TFLite, "
            "metrics, summaries, checkpoints, split manifest) to the chief"
        )
    return strategy


def _distortion_metrics(config: RetrainConfig, b: Bottlenecks) -> dict | None:
    """How training images were distorted: cached copies, or on the fly (None: not at all)."""
    if b.copies is not None:
        return b.copies.metrics()
    if not config.distortions.active:
        return None
    steps, batch = config.training.how_many_training_steps, config.training.train_batch_size
    return {"mode": "on the fly", "vectors": steps * batch, "computed": steps * batch}


def _cluster_metrics(b: Bottlenecks) -> dict:
    """A multi-worker run's figures: which worker this is, what the workers computed."""
    number, count = distribute.cluster_position()
    return {"worker": number, "workers": count, "bottlenecks_computed": b.cluster_computed}


def _train(
    config: RetrainConfig,
    b: Bottlenecks,
    head: Head,
    module: ImageModule,
    module_object: LazyModule,
    chief: bool,
) -> TrainResult:
    """Train the new layer on the bottlenecks. Only the chief writes summaries, checkpoints and
    intermediate graphs. In a cluster every worker trains the same layer (same data and seed);
    fine-tuning starts from the chief's in any case (MultiWorkerMirroredStrategy gives every
    worker the chief's initial values of the variables made in its scope)."""
    settings = config.training
    summaries_dir = config.outputs.summaries_dir
    summaries = Summaries(summaries_dir) if chief and summaries_dir else None
    on_step = None
    if chief and config.export.intermediate_store_frequency > 0:
        on_step = StepCallback(
            _intermediate_graph_writer(config, head, module, module_object),
            config.export.intermediate_store_frequency,
        )
    try:
        train, validation = _training_inputs(config, b, module, module_object)
        result = train_head(
            train,
            validation,
            head,
            settings,
            summaries,
            on_step=on_step,
            keep_checkpoints=chief,
        )
    finally:
        if summaries is not None:
            summaries.close()
    log.info("Trained %d steps in %.1f s", settings.how_many_training_steps, result.seconds)
    return result


def _test_split(config: RetrainConfig, b: Bottlenecks) -> tuple[FeatureSplit, scan.PathList]:
    """The test split as evaluated (all of it, or its configured random subset: the same draw
    as fine-tuning's), with its image files in the same order."""
    test, paths = b.split("testing"), b.paths_of("testing")
    size = config.evaluation.test_batch_size
    if 0 < size < len(test):
        picks = random_picks(len(test), size, config.training.random_seed)
        test = FeatureSplit(test.cache, test.locations[picks], test.y[picks])
        paths = paths.take(picks)
    return test, paths


def _evaluate_test(
    test: FeatureSplit, trained: TrainResult, labels: list[str]
) -> dict[str, AnyEvaluation]:
    """The evaluation stage on cached bottlenecks: the test split, logged as retrain.py did."""
    if not len(test):
        return {}
    result = trained.head.evaluate(
        trained.weights, trained.biases, ((c.x, c.y) for c in test.chunks())
    )
    log.info("Final test accuracy = %.1f%% (N=%d)", 100 * result.accuracy, len(test))
    _log_evaluation(result, labels)
    return {"testing": result}


def _log_evaluation(result: AnyEvaluation, labels: list[str], split: str = "test") -> None:
    """The evaluation's summary (see evaluate.Evaluation.summary_lines)."""
    for line in result.summary_lines(labels, split):
        log.info("%s", line)


def _calibrate(b: Bottlenecks, trained: TrainResult, labels: list[str]) -> dict[str, AnyEvaluation]:
    """Let the trained head tune its decisions on the validation split (a sigmoid head's
    thresholds; `trained.head` becomes the tuned head), and evaluate it there. Returns
    {"validation": its evaluation}, logged, or {} without validation images."""
    validation = b.split("validation")
    if not len(validation):
        return {}
    trained.head, validated = trained.head.calibrate(
        trained.weights, trained.biases, ((c.x, c.y) for c in validation.chunks())
    )
    if validated is None:
        validated = trained.head.evaluate(
            trained.weights, trained.biases, ((c.x, c.y) for c in validation.chunks())
        )
    _log_evaluation(validated, labels, "validation")
    return {"validation": validated}


def _projector_sample(
    config: RetrainConfig, b: Bottlenecks, names: list[str]
) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """A random sample of at most PROJECTOR_SAMPLE bottleneck vectors, with the file, label
    and split of each, for TensorBoard's projector."""
    picks = random_picks(len(b.locations), PROJECTOR_SAMPLE, config.training.random_seed)
    vectors, _ = b.cache.read(b.locations[picks])
    rows = zip(
        (scan.display_path(p) for p in b.paths.take(picks)),
        (_label_text(b.labels[i], names) for i in picks),
        (scan.SPLITS[code] for code in b.split_codes[picks]),
    )
    return vectors, list(rows)


def _write_summaries(
    summaries_dir: str, result: RunResult, sample: tuple[np.ndarray, list] | None
) -> None:
    """The end of the run in TensorBoard: evaluation, pictures, health, and the sample of
    bottleneck vectors in the projector."""
    from retrain.reporting import summaries

    started = time.perf_counter()
    with writing(summaries_dir, "TensorBoard summaries"):
        summaries.write_run_summaries(summaries_dir, result)
        if sample is not None:
            summaries.write_projector(summaries_dir, *sample)
    log.debug("TensorBoard summaries written in %.2f s", time.perf_counter() - started)


def _label_text(label: np.ndarray, names: list[str]) -> str:
    """A class index, or a multi-label 0/1 row, as the label names it stands for."""
    if np.ndim(label):
        return ",".join(name for name, on in zip(names, label) if on)
    return names[int(label)]


def _fine_tune(
    config: RetrainConfig,
    module: ImageModule,
    b: Bottlenecks,
    trained: TrainResult,
    cluster: tf.distribute.Strategy | None,
) -> finetune.FineTuneResult:
    """Fine-tune the network on the training split's images, guarded by the validation split's
    and evaluated on the test split's (the configured subset of it). Under `cluster` if given,
    else the configured strategy."""
    strategy = cluster
    if strategy is None:
        strategy = distribute.make_strategy(config.distribution.strategy, log)
    seed = config.training.random_seed
    settings, search = config.fine_tuning, None
    if settings.learning_rate == AUTO:
        search = _search_fine_tuning_rate(config, module, b, trained)
        settings = replace(settings, learning_rate=search.suggestion)
    tuned = finetune.fine_tune(
        module,
        trained.head,
        (trained.weights, trained.biases),
        finetune.split_images(b, "training"),
        finetune.subset(
            finetune.split_images(b, "testing"), config.evaluation.test_batch_size, seed
        ),
        settings,
        strategy,
        config.outputs.summaries_dir,
        seed=seed,
        log_every=max(1, config.training.eval_step_interval),
        max_pixels=config.data.max_image_pixels,
        distortions=config.distortions,
        validation=finetune.split_images(b, "validation"),
    )
    tuned.rate_search = search
    return tuned


def _fine_tune_from_cut(
    config: RetrainConfig,
    image_set: scan.ImageSet,
    module: ImageModule,
    bottleneck_dir: str,
    b: Bottlenecks,
    trained: TrainResult,
) -> finetune.FineTuneResult:
    """Fine-tune the blocks above the configured cut on the cached activations there
    (computing what is missing into the bottleneck folder), as `_fine_tune` the whole network."""
    strategy = distribute.make_strategy(config.distribution.strategy, log)
    part, activations = _cut_activations(config, image_set, module, bottleneck_dir, b, strategy)
    settings, search = config.fine_tuning, None
    if settings.learning_rate == AUTO:
        search = _search_rate_from_cut(config, part, activations, trained)
        settings = replace(settings, learning_rate=search.suggestion)
    tuned = finetune_cut.fine_tune_from_cut(
        module,
        part,
        trained.head,
        (trained.weights, trained.biases),
        activations,
        settings,
        strategy,
        config.outputs.summaries_dir,
        seed=config.training.random_seed,
        log_every=max(1, config.training.eval_step_interval),
        test_images=config.evaluation.test_batch_size,
        max_pixels=config.data.max_image_pixels,
    )
    tuned.rate_search = search
    tuned.cut = cut.metrics(part, activations)
    return tuned


def _cut_activations(
    config: RetrainConfig,
    image_set: scan.ImageSet,
    module: ImageModule,
    bottleneck_dir: str,
    b: Bottlenecks,
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[cut.CutModule, Bottlenecks]:
    """The configured cut of `module` (its network rebuilt under `strategy`'s scope) and the
    activations there of the images whose bottlenecks `b` holds, in the same order."""
    part = cut.cut_module(module, config.fine_tuning.from_block, strategy)
    activations = cut.cut_activations(
        image_set,
        part,
        bottleneck_dir,
        config.module,
        config.data.max_image_pixels,
        config.distortions,
    )
    if len(activations.paths) != len(b.paths):
        raise RetrainError(
            f"fine-tuning: {len(b.paths) - len(activations.paths)} image(s) could not be read "
            "again for their activations at the cut (changed during the run?); run again"
        )
    return part, activations


def _search_rate_from_cut(
    config: RetrainConfig, part: cut.CutModule, activations: Bottlenecks, trained: TrainResult
) -> lr_find.RateSearch:
    search = finetune_cut.search_rate_from_cut(
        part,
        trained.head,
        (trained.weights, trained.biases),
        activations,
        config.fine_tuning,
        seed=config.training.random_seed,
    )
    _log_fine_tuning_search(search)
    return search


def _export(
    config: RetrainConfig,
    labels: list[str],
    module: ImageModule,
    module_object: LazyModule,
    trained: TrainResult,
    tuned: finetune.FineTuneResult | None,
    training_paths: scan.PathList,
) -> dict[str, str]:
    """The export stage: the fine-tuned network if `tuned` kept one, else the pretrained module
    with the trained layer; int8 quantization is calibrated on a seeded pick of `training_paths`.
    Returns {setting: path} of the files written."""
    input_size = tuned.input_size if tuned is not None else module.input_size
    representative = quantize.representative_dataset(
        quantize.calibration_paths(training_paths, seed=config.training.random_seed),
        input_size,
        config.data.max_image_pixels,
    )
    if tuned is not None and not tuned.head_alone:
        return export.export_classifier(
            config.export,
            labels,
            export.Network(
                lambda: export.frozen_module_graph_def(tuned.module_object, tuned.input_size),
                lambda: tuned.module_object,
                tuned.input_size,
            ),
            export.TrainedLayer(trained.head, tuned.weights, tuned.biases),
            representative,
        )
    return export.export_classifier(
        config.export,
        labels,
        export.Network(
            lambda: _frozen_module(config, module, module_object),
            module_object.get,
            module.input_size,
        ),
        export.TrainedLayer(trained.head, trained.weights, trained.biases),
        representative,
    )


def _print_misclassified(result: RunResult) -> None:
    log.info("=== MISCLASSIFIED TEST IMAGES ===")
    for mistake in result.misclassified():
        # retrain.py's two columns first (file, predicted label), for scripts that read them.
        log.info(
            "%70s  %s  (true: %s, score %.3f)",
            scan.display_path(mistake.path),
            mistake.predicted,
            mistake.actual,
            mistake.score,
        )


def _frozen_module(config: RetrainConfig, module: ImageModule, module_object: LazyModule):
    """The pretrained module's frozen graph, made once per module and kept in its cache (made
    for this run only, with a warning, when the cache cannot be written)."""
    path = module_cache.frozen_module_path(config.module.cache_dir, module.fingerprint)
    if not path.exists() and (problem := check_writable_dir(path.parent)):
        log.warning("Module cache: cannot keep the frozen module in %s (%s)", path.parent, problem)
        return export.frozen_module_graph_def(module_object.get(), module.input_size)
    with exclusive(path):  # one process at a time freezes it; the others read its file
        return export.cached_frozen_module(path, module_object.get, module.input_size)


def _intermediate_graph_writer(
    config: RetrainConfig, head: Head, module: ImageModule, module_object: LazyModule
):
    folder = Path(config.export.intermediate_output_graphs_dir).expanduser()
    frequency = config.export.intermediate_store_frequency
    name = config.export.final_tensor_name

    def on_step(step: int, weights: np.ndarray, biases: np.ndarray) -> None:
        if step % frequency:
            return
        path = folder / f"intermediate_{step}.pb"
        module_graph = _frozen_module(config, module, module_object)
        export.write_frozen_graph(
            export.classifier_graph_def(module_graph, head, weights, biases, name), path
        )
        log.info("Saved intermediate graph %s", path)

    return on_step
