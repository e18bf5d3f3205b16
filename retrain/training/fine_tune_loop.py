"""The loop both fine-tunings share (the whole network, `fine_tune_network`; the blocks above
a cut, `fine_tune_partial`): the step function with its warm-up, the validation watch with the
plateau of the rate and early stopping, TensorBoard scalars, the learning-rate finder's range
test, and the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from retrain.config import DEFAULT_MAX_IMAGE_PIXELS, DistortionConfig, FineTuningConfig
from retrain.errors import ConfigError
from retrain.heads.evaluation import Evaluation
from retrain.heads.head import Head
from retrain.training.activity import ActivityProbe, write_activity
from retrain.training.activity import summary as summarize_activity
from retrain.training.early_stopping import VALIDATION_PLATEAU_PATIENCE, Gain, KeepBest
from retrain.training.fine_tune_diagnosis import Discard, why_discarded
from retrain.training.lr_find import RateSearch, range_test
from retrain.training.optim import Plateau, current_learning_rate, make_optimizer
from retrain.utils.interrupt import check as check_interrupt

log = logging.getLogger(__name__)

# --fine_tune_lr_schedule=plateau: Keras' ReduceLROnPlateau defaults, counted in log intervals.
PLATEAU_FACTOR = 0.1
PLATEAU_PATIENCE = 10
# Early stopping and the plateau count evaluations from this step at the latest (see
# judging_start).
JUDGED_FROM_STEP = 100
# Fine-tuning's linear warm-up (see warmup_steps) lasts at most this many steps.
MAX_WARMUP_STEPS = 30
# TensorBoard run (under --summaries_dir) of the fine-tuning scalars.
SUMMARIES_RUN = "fine_tune"
# The learning-rate finder of fine-tuning: a range test of few steps.
FIND_STEPS = 60
FIND_MIN_RATE = 1e-7
FIND_MAX_RATE = 0.1


@dataclass(frozen=True)
class FineTuneOptions:
    """How a fine-tuning runs besides its settings: where its TensorBoard scalars go (None:
    nowhere), its seed, how often it logs and evaluates validation, the decoding guard, the
    distortions of its training images, the validation images that guard it (whole network),
    and how many test images it is judged on (partial; <= 0: all)."""

    summaries_dir: str | Path | None = None
    seed: int = 0
    log_every: int = 10
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    distortions: DistortionConfig | None = None
    validation: Any = None  # fine_tune_network.LabeledImages
    test_images: int = -1


DEFAULT_OPTIONS = FineTuneOptions()


@dataclass
class Guarded:
    """What `run_guarded` trains and how it is judged: the model (its `trainable` variables,
    `final_weights` and `final_biases`), its head and optimizer under a strategy, the
    distributed dataset, the validation watch and plateau (`watch_validation`), and callables
    for the sparsity probe, the test evaluation and the module to export; `before` is the test
    evaluation of the head alone."""

    model: Any
    head: Head
    optimizer: Any
    strategy: tf.distribute.Strategy
    dataset: Any
    watch: KeepBest | None
    plateau: Plateau | None
    probe: Callable[[], ActivityProbe | None]
    evaluate_test: Callable[[], Evaluation | None]
    before: Evaluation | None
    exportable: Callable[[], Any]


@dataclass
class StepHooks:
    """What `run_steps` does beside the steps: write scalars (`writer`, None: none), feed the
    mean training loss of each interval to `plateau` (if it watches training), evaluate
    validation (`watch`) and measure sparsity (`probe`) at the end of each interval."""

    writer: Any
    optimizer: Any
    plateau: Plateau | None = None
    probe: ActivityProbe | None = None
    watch: KeepBest | None = None

    def write_step(self, record: dict) -> None:
        """A step's loss, accuracy and learning rate in TensorBoard."""
        if self.writer is None:
            return
        with self.writer.as_default(step=record["step"]):
            tf.summary.scalar("cross_entropy", record["loss"])
            tf.summary.scalar("accuracy", record["accuracy"])
            tf.summary.scalar("learning_rate", current_learning_rate(self.optimizer))

    def end_interval(self, record: dict, losses: list[float]) -> None:
        """The end of a logging interval: plateau, validation, sparsity, the log line."""
        if self.plateau is not None:
            self.plateau.update(sum(losses) / len(losses))
        if self.watch is not None:
            _note_validation(record, self.watch.check(record["step"]), self.writer)
        if self.probe is not None:
            activity = self.probe.measure()
            record.update(summarize_activity(activity))
            with self.writer.as_default(step=record["step"]):
                write_activity(activity)
        log.info(
            "Fine-tune step %d: loss = %f, train accuracy = %.1f%%",
            record["step"],
            record["loss"],
            100 * record["accuracy"],
        )


@dataclass
class FineTuneResult:
    """The fine-tuned module (plain variables, ready to export), its layer and measurements."""

    module_object: Any
    weights: np.ndarray
    biases: np.ndarray
    input_size: tuple[int, int]
    settings: FineTuningConfig
    replicas: int
    seconds: float
    steps_per_second: float
    history: list[dict] = field(default_factory=list)
    before: Evaluation | None = None
    after: Evaluation | None = None
    rate_search: RateSearch | None = None  # the finder's, when the rate was 'auto'
    steps_run: int = 0  # fewer than settings.steps when it stopped early
    best_step: int | None = None  # the step kept (0: the head alone); None: no validation
    validation_before: Evaluation | None = None  # the head alone's, on the validation images
    validation_best: Evaluation | None = None  # the kept network's
    validation_seconds: float = 0.0
    gain: Gain | None = None  # the kept network's over the head alone (see KeepBest.gain)
    # partial fine-tuning's cut and its cached activations (retrain.training.cut)
    cut: dict | None = None

    @property
    def head_alone(self) -> bool:
        """Whether the kept network is the pretrained module with the trained layer, unchanged:
        export it as such."""
        return self.best_step == 0

    @property
    def discarded(self) -> Discard | None:
        """Why the fine-tuned steps were thrown away, when validation kept the head alone."""
        if not self.head_alone or self.validation_before is None:
            return None
        suggested = self.rate_search.suggestion if self.rate_search else None
        return why_discarded(
            self.history, self.validation_before, self.settings.learning_rate, suggested
        )

    def metrics(self) -> dict:
        """The run's figures for --metrics_json."""
        last = self.history[-1] if self.history else {}
        before, best = self.validation_before, self.validation_best
        return {
            "steps": self.settings.steps,
            "learning_rate": self.settings.learning_rate,
            "batch_size": self.settings.batch_size,
            "lr_schedule": self.settings.lr_schedule,
            "replicas": self.replicas,
            "seconds": round(self.seconds, 3),
            "steps_per_second": round(self.steps_per_second, 4),
            "final_loss": last.get("loss"),
            "final_train_accuracy": last.get("accuracy"),
            "test_images": self.after.count if self.after else 0,
            "test_accuracy_before": self.before.accuracy if self.before else None,
            "test_accuracy_after": self.after.accuracy if self.after else None,
            "lr_find": self.rate_search.metrics() if self.rate_search else None,
            "steps_run": self.steps_run,
            "stopped_early": self.steps_run < self.settings.steps,
            "patience": self.settings.patience,
            "best_step": self.best_step,
            "kept": _kept(self.best_step),
            "validation_images": before.count if before else 0,
            "validation_accuracy_before": before.accuracy if before else None,
            "validation_cross_entropy_before": before.cross_entropy if before else None,
            "validation_accuracy_best": best.accuracy if best else None,
            "validation_cross_entropy_best": best.cross_entropy if best else None,
            "validation_seconds": round(self.validation_seconds, 3),
            "validation_gain": self.gain.as_dict() if self.gain else None,
            "discarded": discarded.as_dict() if (discarded := self.discarded) else None,
            "cut": self.cut,
        }


def _kept(best_step: int | None) -> str:
    if best_step is None:
        return "last step (no validation images)"
    return "head alone" if best_step == 0 else "fine-tuned"


def make_train_step(
    strategy: tf.distribute.Strategy,
    model: Any,
    head: Head,
    optimizer: Any,
    global_batch: int,
    warmup_steps: int = 0,
):
    """A tf.function taking one global batch from a distributed iterator, over all replicas.
    Over the first `warmup_steps` steps the gradients are scaled up linearly from
    1/warmup_steps to 1 (for SGD, the same as warming the rate up).

    Returns [summed cross-entropy, correct, images] of the batch, summed over the replicas.
    """

    def replica_step(pixels: tf.Tensor, labels: tf.Tensor, ok: tf.Tensor) -> tf.Tensor:
        weight = tf.cast(ok, tf.float32)
        with tf.GradientTape() as tape:
            logits = model(pixels)
            losses = weight * head.losses(logits, labels)
            loss = tf.reduce_sum(losses) / global_batch  # replicas' losses sum to the mean
        gradients = tape.gradient(loss, model.trainable)
        if warmup_steps:
            done = tf.cast(optimizer.iterations + 1, tf.float32)
            gradients = [g * tf.minimum(1.0, done / warmup_steps) for g in gradients]
        optimizer.apply_gradients(zip(gradients, model.trainable))
        hits = head.hits(logits, labels)
        return tf.stack(
            [tf.reduce_sum(losses), tf.reduce_sum(hits * weight), tf.reduce_sum(weight)]
        )

    @tf.function
    def train_step(iterator) -> tf.Tensor:
        per_replica = strategy.run(replica_step, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return train_step


def warmup_steps(steps: int) -> int:
    """The steps of fine-tuning's warm-up: a tenth of them, at most MAX_WARMUP_STEPS. The
    first steps at the full rate would shake the pretrained weights before the gradients
    settle, so the validation watch would see them worse than the head alone at first."""
    return min(steps // 10, MAX_WARMUP_STEPS)


def judging_start(steps: int) -> int:
    """The step from which early stopping and the plateau of the rate count evaluations without
    improvement: a third of the steps, at most JUDGED_FROM_STEP. While the pretrained blocks
    first move, validation dips below the head alone for 50 to 100 steps (measured: README,
    Partial fine-tuning): stopping there would keep the head alone, and lowering the rate there
    would starve the steps that climb out of it. The best network is still kept."""
    return min(steps // 3, JUDGED_FROM_STEP)


def run_guarded(
    job: Guarded, settings: FineTuningConfig, input_size: tuple[int, int], options: FineTuneOptions
) -> FineTuneResult:
    """Train `job.model` (its `trainable` variables and final layer) on `job.dataset` for
    `settings.steps` steps (see `run_steps`), under its validation watch and plateau (see
    `watch_validation`), writing TensorBoard scalars (and, from `job.probe()`, sparsity) to
    `options.summaries_dir`; then put the best network back, evaluate the test images on it
    (`job.evaluate_test`; `job.before` is the head alone's) and return the result, whose
    module is `job.exportable()`."""
    watch = job.watch
    writer = summary_writer(job.strategy, options.summaries_dir)
    try:
        step = make_train_step(
            job.strategy,
            job.model,
            job.head,
            job.optimizer,
            settings.batch_size,
            warmup_steps(settings.steps),
        )
        hooks = StepHooks(
            writer, job.optimizer, job.plateau, job.probe() if writer is not None else None, watch
        )
        history, seconds, rate = run_steps(
            step, iter(job.dataset), settings.steps, options.log_every, hooks
        )
    finally:
        if writer is not None:
            writer.close()
    steps_run = history[-1]["step"] if history else 0
    if watch is not None:
        watch.restore()
        log.info("Fine-tuning: %s", watch.explain(steps_run))
    after = job.before if watch is not None and watch.best_step == 0 else job.evaluate_test()
    log_test("after", after)
    return FineTuneResult(
        module_object=job.exportable(),
        weights=job.model.final_weights.numpy(),
        biases=job.model.final_biases.numpy(),
        input_size=input_size,
        settings=settings,
        replicas=int(job.strategy.num_replicas_in_sync),
        seconds=seconds,
        steps_per_second=rate,
        history=history,
        before=job.before,
        after=after,
        steps_run=steps_run,
        best_step=watch.best_step if watch else None,
        validation_before=watch.head_alone if watch else None,
        validation_best=watch.best if watch else None,
        validation_seconds=watch.seconds if watch else 0.0,
        gain=watch.gain if watch else None,
    )


def watch_validation(
    evaluate_layer: Callable[[np.ndarray, np.ndarray], Evaluation] | None,
    model: Any,
    optimizer: Any,
    settings: FineTuningConfig,
) -> tuple[KeepBest | None, Plateau | None]:
    """The validation watch of `model` (its `trainable` variables, its `final_weights` and
    `final_biases`) and the plateau of the "plateau" schedule. `evaluate_layer(weights,
    biases)` evaluates the network as it is now, with that layer, on the validation images;
    None: there are none, so there is no watch and the plateau watches the training loss
    (which `run_steps` feeds); else it watches validation cross-entropy (which the watch
    feeds)."""
    plateau = None
    if evaluate_layer is None:
        log.warning(
            "Fine-tuning: no validation images, so nothing guards it: the last step's network "
            "is exported, even if worse than the new layer alone"
        )
        if settings.lr_schedule == "plateau":
            plateau = Plateau(optimizer, PLATEAU_FACTOR, PLATEAU_PATIENCE)
        return None, plateau
    if settings.lr_schedule == "plateau":
        plateau = Plateau(optimizer, PLATEAU_FACTOR, VALIDATION_PLATEAU_PATIENCE)

    def evaluate() -> Evaluation:
        return evaluate_layer(model.final_weights.numpy(), model.final_biases.numpy())

    start = judging_start(settings.steps)
    watch = KeepBest(evaluate, model.trainable, settings.patience, plateau, start)
    if start and (settings.patience or plateau is not None):
        log.info(
            "Fine-tuning: evaluations before step %d count toward neither early stopping nor "
            "the plateau (validation dips while the pretrained blocks first move)",
            start,
        )
    log.info(
        "Fine-tuning: validation before (the head alone): accuracy = %.1f%%, cross-entropy = "
        "%f (N=%d)",
        100 * watch.head_alone.accuracy,
        watch.head_alone.cross_entropy,
        watch.head_alone.count,
    )
    return watch, None


def optimizer_for(model: Any, settings: FineTuningConfig) -> Any:
    """The fine-tuning optimizer (momentum) of `model`'s `trainable` variables, built."""
    optimizer = make_optimizer(
        "momentum", settings.learning_rate, settings.lr_schedule, settings.steps
    )
    optimizer.build(model.trainable)
    return optimizer


def check_batch(settings: FineTuningConfig, strategy: tf.distribute.Strategy) -> None:
    """ConfigError if a replica of `strategy` would get an empty piece of each batch, which
    the module cannot run on."""
    if settings.batch_size < strategy.num_replicas_in_sync:
        raise ConfigError(
            f"{{0}} ({settings.batch_size}) must be at least the number of "
            f"replicas ({strategy.num_replicas_in_sync})",
            "fine_tuning.batch_size",
        )


def find_rate(train_step: Any, iterator: Any, optimizer: Any) -> RateSearch:
    """Fine-tuning's range test: `train_step` (see make_train_step) on `iterator`'s batches for
    up to FIND_STEPS steps while `optimizer`'s rate grows from FIND_MIN_RATE to FIND_MAX_RATE;
    the suggestion by the "edge" rule (see retrain.training.lr_find)."""

    def step_at(rate: float) -> float:
        optimizer.learning_rate.assign(rate)
        loss_sum, _, count = train_step(iterator).numpy()
        return float(loss_sum / max(count, 1))

    return range_test(
        step_at, FIND_STEPS, FIND_MIN_RATE, FIND_MAX_RATE, "fine_tuning.learning_rate", "edge"
    )


def summary_writer(strategy: tf.distribute.Strategy, summaries_dir: str | Path | None) -> Any:
    """The writer of the fine_tune/ TensorBoard run; None without a folder or off the chief."""
    if summaries_dir is None or not strategy.extended.should_checkpoint:
        return None
    return tf.summary.create_file_writer(str(Path(summaries_dir).expanduser() / SUMMARIES_RUN))


def log_test(when: str, evaluation: Evaluation | None) -> Evaluation | None:
    """Log the test accuracy `when` ("before", "after") fine-tuning; returns `evaluation`."""
    if evaluation is not None:
        log.info(
            "Fine-tuning: test accuracy %s = %.1f%% (N=%d)",
            when,
            100 * evaluation.accuracy,
            evaluation.count,
        )
    return evaluation


def run_steps(
    train_step: Any, iterator: Any, steps: int, log_every: int, hooks: StepHooks
) -> tuple[list[dict], float, float]:
    """Run the steps, logging and writing scalars; returns (history, seconds, steps/s). Every
    `log_every` steps (and at the last), `hooks` see the interval (see `StepHooks`) and the
    step is logged; the steps stop early when the validation watch's patience runs out.

    Steps/s leaves out the first step, which traces and compiles the step function, and the
    time spent evaluating validation.
    """
    history: list[dict] = []
    interval_losses: list[float] = []
    start = time.perf_counter()
    warm = start
    watch = hooks.watch
    validated_before = watch.seconds if watch else 0.0  # step 0's evaluation
    for step in range(1, steps + 1):
        check_interrupt()
        loss_sum, correct, count = train_step(iterator).numpy()
        if step == 1:
            warm = time.perf_counter()
        record = {
            "step": step,
            "loss": float(loss_sum / max(count, 1)),
            "accuracy": float(correct / max(count, 1)),
        }
        interval_losses.append(record["loss"])
        hooks.write_step(record)
        if step % log_every == 0 or step == steps:
            hooks.end_interval(record, interval_losses)
            interval_losses.clear()
            history.append(record)
            if watch is not None and watch.stop:
                log.info(
                    "Fine-tuning stopped early at step %d of %d: validation did not improve in "
                    "%d evaluations",
                    step,
                    steps,
                    watch.waited,
                )
                break
    end = time.perf_counter()
    run = history[-1]["step"] if history else steps
    timed, busy = run - 1, end - warm - ((watch.seconds if watch else 0.0) - validated_before)
    rate = timed / busy if timed and busy > 0 else run / (end - start)
    log.info("Fine-tuned %d steps in %.1f s (%.2f steps/s)", run, end - start, rate)
    return history, end - start, rate


def _note_validation(record: dict, evaluation: Evaluation, writer: Any) -> None:
    """Add a validation evaluation to a history record (and to TensorBoard), and log it."""
    record["validation_loss"] = evaluation.cross_entropy
    record["validation_accuracy"] = evaluation.accuracy
    if writer is not None:
        with writer.as_default(step=record["step"]):
            tf.summary.scalar("validation_cross_entropy", evaluation.cross_entropy)
            tf.summary.scalar("validation_accuracy", evaluation.accuracy)
    log.info(
        "Fine-tune step %d: validation accuracy = %.1f%%, cross-entropy = %f",
        record["step"],
        100 * evaluation.accuracy,
        evaluation.cross_entropy,
    )
