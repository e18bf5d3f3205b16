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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrain import (
    audit,
    distort,
    distribute,
    export,
    finetune,
    health,
    labels_csv,
    module_cache,
    sampling,
    scan,
)
from retrain.atomic import atomic_write_text
from retrain.audit import AuditReport
from retrain.bottlenecks import (
    Bottlenecks,
    LazyModule,
    compute_bottlenecks,
    load_module,
    make_extractor,
)
from retrain.config import RetrainConfig
from retrain.features import Split
from retrain.heads import AnyEvaluation, Head, SigmoidHead, SoftmaxHead
from retrain.interrupt import check as check_interrupt
from retrain.models.loading import ImageModule
from retrain.results import RunResult, Timings
from retrain.train import Summaries, TrainingSource, TrainResult, train_head

if TYPE_CHECKING:
    import tensorflow as tf


log = logging.getLogger("retrain")

# A streamed validation split is evaluated on a random subset of at most this many images
# (51 MB of vectors: what a 100k-image run holds, so memory stays flat beyond it).
STREAMED_VALIDATION_ROWS = 10_000


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
            mirrored=config.distribution.strategy == "mirrored",
            cluster=cluster,
            distortions=config.distortions,
        )
        bottlenecks.check_trainable(image_set.labels)
        check_interrupt()
        head = make_head(image_set)
        trained = _train(config, bottlenecks, head, module, module_object, chief)
        evaluations = _calibrate(bottlenecks, trained, image_set.labels)
        evaluations.update(_evaluate_test(config, bottlenecks, trained, image_set.labels))

        # Fine-tuning: the whole network, exported instead of the pretrained module + layer.
        tuned = None
        if config.fine_tuning.steps:
            tuned = _fine_tune(config, module, bottlenecks, trained, cluster)
            if tuned.after is not None:
                evaluations["testing"] = tuned.after  # cached bottlenecks no longer fit it
    check_interrupt()  # a run stopped before here writes no outputs
    outputs = (
        _export(config, image_set.labels, module, module_object, trained, tuned) if chief else {}
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
    )
    result.health = health.diagnose(
        result,
        _training_counts(bottlenecks, len(image_set.labels)),
        _cross_split_duplicates(bottlenecks),
        config.training.learning_rate,
    )
    _log_health(result.health)
    if chief and config.outputs.summaries_dir:
        _write_evaluation_summaries(config.outputs.summaries_dir, result)
    if config.outputs.metrics_json and chief:
        metrics = result.metrics()
        text = json.dumps(metrics, indent=2, default=_plain) + "\n"
        atomic_write_text(config.outputs.metrics_json, text)
        result.outputs["metrics_json"] = config.outputs.metrics_json
    if cluster is not None:
        distribute.barrier(cluster)  # the others wait for the chief's outputs: all end together
    return result


def audit_photos(config: RetrainConfig) -> AuditReport:
    """The audit (`retrain.audit`): the config's images scanned and their bottlenecks cached
    (computing only what is missing), then judged for suspect labels, duplicates and outliers;
    writes the CSVs to `audit.output_dir` and the counts to `outputs.metrics_json` if set.
    Trains nothing it keeps and exports nothing."""
    if not isinstance(config, RetrainConfig):
        raise TypeError(f"audit_photos() takes a RetrainConfig, got {type(config).__name__}")
    config.validate()
    image_set = scan_images(config)
    module = load_module(config.module)
    with _bottleneck_folder(config.cache.bottleneck_dir) as bottleneck_dir:
        bottlenecks = compute_bottlenecks(
            image_set,
            module,
            LazyModule(module),
            bottleneck_dir,
            config.module,
            config.data.max_image_pixels,
        )
        report = audit.audit_bottlenecks(
            bottlenecks, image_set.labels, config.audit, config.training, make_head(image_set)
        )
    log.info(
        "Audit of %d images in %.1f s: %d suspect labels, %d duplicate pairs (%d across "
        "splits), %d outliers%s",
        report.images,
        report.seconds,
        len(report.suspects),
        len(report.duplicates),
        len(report.cross_split_duplicates()),
        len(report.outliers),
        f"; CSVs in {config.audit.output_dir}" if report.files else "",
    )
    for row in report.suspects[:5]:
        log.info(
            "Suspect: %s is filed under %s, looks like %s (%.2f vs %.2f)",
            row["path"],
            row["label"],
            row["expected"],
            row["p_label"],
            row["p_expected"],
        )
    if config.outputs.metrics_json:
        text = json.dumps({"audit": report.metrics()}, indent=2) + "\n"
        atomic_write_text(config.outputs.metrics_json, text)
    return report


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
        on_step = _intermediate_graph_writer(config, head, module, module_object)
    try:
        train, validation = _training_inputs(config, b, module, module_object)
        result = train_head(
            train,
            validation,
            head,
            settings,
            summaries,
            checkpoint_dir=settings.checkpoint_path if chief else None,
            resume=settings.resume and chief,
            on_step=on_step,
            callback_every=config.export.intermediate_store_frequency,
        )
    finally:
        if summaries is not None:
            summaries.close()
    log.info("Trained %d steps in %.1f s", settings.how_many_training_steps, result.seconds)
    return result


def _evaluate_test(
    config: RetrainConfig, b: Bottlenecks, trained: TrainResult, labels: list[str]
) -> dict[str, AnyEvaluation]:
    """The evaluation stage on cached bottlenecks: the test split (or its configured random
    subset), logged as retrain.py did."""
    test = b.split("testing")
    size = config.evaluation.test_batch_size
    if size > 0:
        test = test.subset(size, config.training.random_seed)
    if not len(test):
        return {}
    result = trained.head.evaluate(
        trained.weights, trained.biases, ((c.x, c.y) for c in test.chunks())
    )
    log.info("Final test accuracy = %.1f%% (N=%d)", 100 * result.accuracy, len(test))
    _log_evaluation(result, labels)
    if config.evaluation.print_misclassified_test_images and size < 0:
        _print_misclassified(b, result, labels)
    return {"testing": result}


def _log_evaluation(result: AnyEvaluation, labels: list[str], split: str = "test") -> None:
    """The evaluation's summary (see evaluate.Evaluation.summary_lines)."""
    for line in result.summary_lines(labels, split):
        log.info("%s", line)


def _calibrate(b: Bottlenecks, trained: TrainResult, labels: list[str]) -> dict[str, AnyEvaluation]:
    """Let the trained head tune its decisions on the validation split (a sigmoid head's
    thresholds; `trained.head` becomes the tuned head). Returns {"validation": the evaluation
    it was tuned on}, logged, or {} for a head with nothing to tune."""
    chunks = ((c.x, c.y) for c in b.split("validation").chunks())
    trained.head, validated = trained.head.calibrate(trained.weights, trained.biases, chunks)
    if validated is None:
        return {}
    _log_evaluation(validated, labels, "validation")
    return {"validation": validated}


def _write_evaluation_summaries(summaries_dir: str, result: RunResult) -> None:
    """Each evaluation's figures for TensorBoard (`scalars`), at the last training step, in
    the run of its split (validation/, test/); nothing for evaluations without any."""
    import tensorflow as tf

    root = Path(summaries_dir).expanduser()
    for split, evaluated in result.evaluations.items():
        scalars = evaluated.scalars(result.labels)
        if not scalars:
            continue
        writer = tf.summary.create_file_writer(str(root / split.removesuffix("ing")))
        with writer.as_default(step=result.training_steps):
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value)
        writer.close()


def _fine_tune(
    config: RetrainConfig,
    module: ImageModule,
    b: Bottlenecks,
    trained: TrainResult,
    cluster: tf.distribute.Strategy | None,
) -> finetune.FineTuneResult:
    """Fine-tune the network on the training split's images, evaluated on the test split's
    (the configured subset of it). Under `cluster` if given, else the configured strategy."""
    strategy = cluster
    if strategy is None:
        strategy = distribute.make_strategy(config.distribution.strategy, log)
    seed = config.training.random_seed
    return finetune.fine_tune(
        module,
        trained.head,
        (trained.weights, trained.biases),
        finetune.split_images(b, "training"),
        finetune.subset(
            finetune.split_images(b, "testing"), config.evaluation.test_batch_size, seed
        ),
        config.fine_tuning,
        strategy,
        config.outputs.summaries_dir,
        seed=seed,
        log_every=max(1, config.training.eval_step_interval),
        max_pixels=config.data.max_image_pixels,
        distortions=config.distortions,
    )


def _export(
    config: RetrainConfig,
    labels: list[str],
    module: ImageModule,
    module_object: LazyModule,
    trained: TrainResult,
    tuned: finetune.FineTuneResult | None,
) -> dict[str, str]:
    """The export stage: the fine-tuned network if `tuned`, else the pretrained module with
    the trained layer. Returns {setting: path} of the files written."""
    if tuned is not None:
        return export.export_classifier(
            config.export,
            labels,
            trained.head,
            lambda: export.frozen_module_graph_def(tuned.module_object, tuned.input_size),
            lambda: tuned.module_object,
            tuned.input_size,
            tuned.weights,
            tuned.biases,
        )
    return export.export_classifier(
        config.export,
        labels,
        trained.head,
        lambda: _frozen_module(config, module, module_object),
        module_object.get,
        module.input_size,
        trained.weights,
        trained.biases,
    )


def _print_misclassified(b: Bottlenecks, test_eval: AnyEvaluation, labels: list[str]) -> None:
    log.info("=== MISCLASSIFIED TEST IMAGES ===")
    test_paths = b.paths_of("testing")
    for row, predicted, actual, score in test_eval.mistakes(labels):
        # retrain.py's two columns first (file, predicted label), for scripts that read them.
        log.info(
            "%70s  %s  (true: %s, score %.3f)",
            scan.display_path(test_paths[row]),
            predicted,
            actual,
            score,
        )


def _frozen_module(config: RetrainConfig, module: ImageModule, module_object: LazyModule):
    """The pretrained module's frozen graph, made once per module and kept in its cache."""
    path = module_cache.frozen_module_path(config.module.cache_dir, module.fingerprint)
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
