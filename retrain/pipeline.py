"""The library's jobs, each a sequence of stages: a retraining run, the audit of the photos,
the learning-rate finder.

    scan and split -> bottlenecks -> head training -> (fine-tuning) -> evaluation -> export
        -> export check -> health, summaries, report, metrics

`run(config)` is the library's entry point (`retrain.run`). Each stage is a function of its
package with typed inputs and outputs; this module only hands the output of one to the next,
decides which process of a cluster writes (the chief), and checks for Ctrl-C between stages.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from retrain.bottlenecks import auto, distribute
from retrain.bottlenecks.stage import (
    Bottlenecks,
    CachedRun,
    LazyModule,
    Parallelism,
    bottleneck_folder,
    cached_bottlenecks,
    cluster_metrics,
    compute_bottlenecks,
    distortion_metrics,
    extraction_metrics,
    load_module,
)
from retrain.config import AUTO, RetrainConfig
from retrain.data import scan
from retrain.data.stage import scan_images
from retrain.errors import ConfigError
from retrain.export import check as export_check
from retrain.export.stage import export_run, intermediate_graph_writer
from retrain.heads.head import AnyEvaluation, Head, make_head
from retrain.models.loading import ImageModule
from retrain.reporting import audit, console, health, summaries
from retrain.reporting import html as report
from retrain.reporting.audit import AuditReport
from retrain.results import RunResult, Timings, write_json
from retrain.training import cut, evaluate, lr_find
from retrain.training.fine_tune_loop import FineTuneResult
from retrain.training.fine_tune_stage import fine_tune_stage, search_fine_tuning_rate
from retrain.training.head import StepCallback, Summaries, TrainResult, train_head
from retrain.training.inputs import training_inputs
from retrain.utils.atomic import writing
from retrain.utils.interrupt import check as check_interrupt
from retrain.utils.phases import PhaseClock
from retrain.utils.runtime import return_free_memory

if TYPE_CHECKING:
    import numpy as np
    import tensorflow as tf

log = logging.getLogger("retrain")


@dataclass
class _Trained:
    """What the stages on the bottlenecks hand to export and reporting."""

    config: RetrainConfig  # with the learning rate the finder chose, if it was 'auto'
    trained: TrainResult
    evaluations: dict[str, AnyEvaluation]
    test_paths: scan.PathList
    tuned: FineTuneResult | None = None
    rate_search: lr_find.RateSearch | None = None
    projected: tuple[np.ndarray, list] | None = None


def run(config: RetrainConfig, *, startup_seconds: float | None = None) -> RunResult:
    """Retrain as `config` says and return what was trained, measured and written.

    Writes only what the config names (outputs, summaries, checkpoints, metrics); without a
    `cache.bottleneck_dir` the vectors live in a temporary folder removed at the end. Leaves
    logging and signal handlers as they are. Raises ConfigError for an invalid setting,
    RetrainError for unusable data or files, KeyboardInterrupt when interrupted.
    `startup_seconds`: what the calling process spent before this call (the command line
    passes its imports and flag parsing), reported as the run's first phase.
    """
    if not isinstance(config, RetrainConfig):
        raise TypeError(f"run() takes a RetrainConfig, got {type(config).__name__}")
    clock = PhaseClock()
    with clock.phase("checks"):
        config.validate()
        console.log_preset(config)
        cluster = distribute.cluster_strategy(config.distribution.strategy, log)  # before any op
    chief = cluster is None or distribute.is_chief()
    with clock.phase("scan"):
        image_set = scan_images(config, write_manifest=chief)
    with clock.phase("module"):
        module = load_module(config.module)
        log.info(
            "Module %s: input %dx%d, %d features",
            module.handle,
            *module.input_size,
            module.feature_dim,
        )
        _check_cut(config, module)
        module_object = LazyModule(module)
    check_interrupt()
    with bottleneck_folder(config.cache.bottleneck_dir) as folder:
        with clock.phase("bottlenecks"):
            settings, choice = auto.extraction_settings(config, len(image_set))
            b = compute_bottlenecks(
                image_set,
                module,
                module_object,
                folder,
                settings,
                config.data.max_image_pixels,
                Parallelism(config.distribution.strategy == "mirrored", cluster),
                distortions=config.distortions,
            )
            head = make_head(image_set)
            b.check_trainable(image_set.labels, head)
        check_interrupt()
        cached = CachedRun(image_set, module, module_object, b, folder)
        done = _train_and_evaluate(config, cached, head, cluster, chief, clock)
    check_interrupt()  # a run stopped before here writes no outputs
    return_free_memory()  # what training freed, before export loads the module's graph
    config, tuned = done.config, done.tuned
    outputs, export_checks = _export(config, cached, done, chief, clock)
    result = RunResult(
        labels=image_set.labels,
        head=done.trained,
        evaluations=done.evaluations,
        images=scan.count_splits(b.split_codes),
        skipped=b.skipped + [{"file": p, "reason": r} for p, r in image_set.ignored],
        module=module.handle,
        bottlenecks_computed=b.computed,
        training_steps=config.training.how_many_training_steps,
        timings=_timings(clock, b, done.trained, startup_seconds),
        outputs=outputs,
        fine_tune=tuned,
        cluster=cluster_metrics(b) if cluster is not None else None,
        distortions=distortion_metrics(config, b),
        extraction=extraction_metrics(config, choice, b),
        unlisted_images=image_set.unlisted,
        split_folders=image_set.split_folders,
        split_note=image_set.split_note,
        test_paths=done.test_paths,
        rate_search=done.rate_search,
        export_checks=export_checks,
        preset=config.preset,
    )
    result = _report(config, result, b, done.projected, chief, clock)
    if cluster is not None:
        distribute.barrier(cluster)  # the others wait for the chief's outputs: all end together
    return result


def _check_cut(config: RetrainConfig, module: ImageModule) -> None:
    """Refuse a cut the module cannot take before any bottleneck is computed; the error says
    so when the preset set the cut."""
    if config.fine_tuning.from_block:
        try:
            cut.check_cut(module, config.fine_tuning.from_block)
        except ConfigError as err:
            raise config.noting_preset(err) from None


def _timings(
    clock: PhaseClock, b: Bottlenecks, trained: TrainResult, startup: float | None
) -> Timings:
    """The run's timings as the clock has them now."""
    return Timings(
        bottlenecks=b.seconds,
        extraction=b.extraction_seconds,
        training=trained.seconds,
        total=clock.elapsed(),
        phases=dict(clock.seconds),
        startup=startup,
    )


def _train_and_evaluate(
    config: RetrainConfig,
    cached: CachedRun,
    head: Head,
    cluster: tf.distribute.Strategy | None,
    chief: bool,
    clock: PhaseClock,
) -> _Trained:
    """The stages on the cached vectors: the learning-rate finder if the rate is 'auto', head
    training, calibration and evaluation, the projector's sample, fine-tuning."""
    image_set, b = cached.image_set, cached.bottlenecks
    rate_search = None
    if config.training.learning_rate == AUTO:
        with clock.phase("lr_find"):
            rate_search = lr_find.search_on_bottlenecks(b, head, config.training)
        training = replace(config.training, learning_rate=rate_search.suggestion)
        config = replace(config, training=training)
    with clock.phase("training"):
        trained = _train(config, b, head, cached.module, cached.module_object, chief)
    with clock.phase("evaluation"):
        evaluations = evaluate.calibrate(b, trained, image_set.labels)
        test, test_paths = evaluate.testing_split(config, b)
        evaluations.update(evaluate.evaluate_test(test, trained, image_set.labels))
        projected = None
        if chief and config.outputs.summaries_dir:
            projected = summaries.projector_sample(
                b, head, image_set.labels, config.training.random_seed
            )
    tuned = None
    if config.fine_tuning.steps:
        with clock.phase("fine_tuning"):
            tuned = fine_tune_stage(config, cached, trained, cluster)
        if tuned.after is not None and not tuned.head_alone:
            evaluations["testing"] = tuned.after  # cached bottlenecks no longer fit it
            evaluations.pop("validation", None)  # it measured the head before tuning
    return _Trained(config, trained, evaluations, test_paths, tuned, rate_search, projected)


def _export(
    config: RetrainConfig, cached: CachedRun, done: _Trained, chief: bool, clock: PhaseClock
) -> tuple[dict[str, str], list[export_check.ExportCheck]]:
    """The export stage (the chief's only), then every exported file checked on the test
    images: {setting: path written} and the checks."""
    tuned, module = done.tuned, cached.module
    outputs = {}
    if chief:
        with clock.phase("export"):
            outputs = export_run(
                config,
                cached.image_set.labels,
                module,
                cached.module_object,
                done.trained,
                tuned,
                cached.bottlenecks.paths_of("training"),
            )
    cached.module_object.release()  # export was its last user
    gc.collect()  # the loaded module's objects hold cycles
    return_free_memory()  # what freezing the graph freed, before the check's own peak
    with clock.phase("export_check"):
        checks = export_check.check_exports(
            outputs,
            done.test_paths,
            done.evaluations.get("testing"),
            done.trained.head,
            tuned.input_size if tuned is not None else module.input_size,
            config.data.max_image_pixels,
            config.export.quantize,
            config.export.final_tensor_name,
        )
    return outputs, checks


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
    writer = Summaries(summaries_dir) if chief and summaries_dir else None
    on_step = None
    if chief and config.export.intermediate_store_frequency > 0:
        on_step = StepCallback(
            intermediate_graph_writer(config, head, module, module_object),
            config.export.intermediate_store_frequency,
        )
    try:
        train, validation = training_inputs(config, b, module, module_object)
        result = train_head(
            train,
            validation,
            head,
            settings,
            writer,
            on_step=on_step,
            keep_checkpoints=chief,
        )
    finally:
        if writer is not None:
            writer.close()
    log.info("Trained %d steps in %.1f s", settings.how_many_training_steps, result.seconds)
    return result


def _report(
    config: RetrainConfig,
    result: RunResult,
    b: Bottlenecks,
    projected: tuple[np.ndarray, list] | None,
    chief: bool,
    clock: PhaseClock,
) -> RunResult:
    """The run's findings and reports: the health report (logged), TensorBoard's summaries,
    the HTML report and the metrics file, as the config names them (the chief's only), then
    where the time went. Returns the result with its findings, these files and its final
    timings."""
    with clock.phase("report"):
        if config.evaluation.print_misclassified_test_images:
            console.log_misclassified(result)
        result = replace(result, split_counts=health.split_counts(b, result.head.head))
        findings = health.diagnose_run(result, b, config.training.learning_rate)
        console.log_health(findings)
        result = replace(result, health=findings)
        written = {}
        if chief and config.outputs.summaries_dir:
            summaries.write_summaries(config.outputs.summaries_dir, result, projected)
        if chief and config.outputs.report_html:
            written["report_html"] = report.write_report(config.outputs.report_html, config, result)
            log.info("Wrote the report %s", config.outputs.report_html)
    # The metrics file is the last thing written: its time is the only one it cannot hold.
    result = replace(
        result,
        outputs={**result.outputs, **written},
        timings=_timings(clock, b, result.head, result.timings.startup),
    )
    if chief and config.outputs.metrics_json:
        write_json(config.outputs.metrics_json, result.metrics())
        result = replace(
            result, outputs={**result.outputs, "metrics_json": config.outputs.metrics_json}
        )
    console.log_timings(result.timings)
    return result


def audit_photos(config: RetrainConfig) -> AuditReport:
    """The audit (`retrain.reporting.audit`): the config's images scanned and their bottlenecks
    cached (computing only what is missing), then judged for suspect labels, duplicates and
    outliers; writes the CSVs to `audit.output_dir` and the counts to `outputs.metrics_json`
    if set. Trains nothing it keeps and exports nothing."""
    if not isinstance(config, RetrainConfig):
        raise TypeError(f"audit_photos() takes a RetrainConfig, got {type(config).__name__}")
    with cached_bottlenecks(config) as cached:
        findings = audit.audit_bottlenecks(
            cached.bottlenecks,
            cached.image_set.labels,
            config.audit,
            config.training,
            make_head(cached.image_set),
        )
    audit.log_findings(findings, config.audit.output_dir)
    if config.outputs.metrics_json:
        write_json(config.outputs.metrics_json, {"audit": findings.metrics()})
    if config.outputs.report_html:
        report.write_report(config.outputs.report_html, config, audit=findings)
        log.info("Wrote the report %s", config.outputs.report_html)
    return findings


def find_learning_rate(config: RetrainConfig) -> dict[str, lr_find.RateSearch]:
    """The learning-rate finder (`retrain --lr_find`): the config's images scanned and their
    bottlenecks cached (computing only what is missing), then the new layer's range test on
    the training split (see retrain.training.lr_find); with fine-tuning steps configured, the
    layer is then trained (at the configured rate, or the suggestion if that is 'auto') and
    fine-tuning range-tested too. Returns {"training": search[, "fine_tuning": search]}; logs
    loss against rate and the suggestions, writes the plots to TensorBoard if
    `outputs.summaries_dir` and the figures to `outputs.metrics_json`; keeps nothing it
    trains."""
    with cached_bottlenecks(config) as cached:
        head = make_head(cached.image_set)
        b = cached.bottlenecks
        searches = {"training": lr_find.search_on_bottlenecks(b, head, config.training)}
        if config.fine_tuning.steps:
            if config.training.learning_rate == AUTO:
                rate = searches["training"].suggestion
                config = replace(config, training=replace(config.training, learning_rate=rate))
            inputs = training_inputs(config, b, cached.module, cached.module_object)
            trained = train_head(*inputs, head, config.training)
            searches["fine_tuning"] = search_fine_tuning_rate(config, cached, trained)
    for name, search in searches.items():
        log.info("Learning-rate finder for %s:", name.replace("_", "-"))
        for line in search.text_plot():
            log.info("%s", line)
    if config.outputs.summaries_dir:
        with writing(config.outputs.summaries_dir, "TensorBoard summaries"):
            for name, search in searches.items():
                summaries.write_rate_search(config.outputs.summaries_dir, search, name)
    if config.outputs.metrics_json:
        figures = {name: search.metrics() for name, search in searches.items()}
        write_json(config.outputs.metrics_json, {"lr_find": figures})
    return searches


__all__ = ["audit_photos", "find_learning_rate", "run"]
