"""Fine-tuning the whole network after the new layer was trained on bottlenecks.

The recipe that keeps the pretrained features: first the base is frozen and only the new layer
is trained (on cached bottlenecks, `retrain.training.head`), then the module and the layer are
trained
together at a small learning rate, on decoded images. BatchNorm stays in inference mode (moving
statistics), so small batches do not overwrite the statistics learnt on ImageNet.

Training is data-parallel over any ``tf.distribute`` strategy (None: TensorFlow's default):
each global batch is split over the replicas, the loss is summed over the replicas and divided
by the global batch size, and the optimizer all-reduces the gradients. Once the module is
fine-tuned, cached bottlenecks no longer describe it, so the test split is evaluated on images.

With validation images, fine-tuning is safe (`retrain.training.early_stopping`): the network is
evaluated
on them every `log_every` steps, the rate is lowered on a plateau of their loss, fine-tuning
stops early when they stop improving, and the best network seen is kept, the head alone (step 0)
included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from retrain.bottlenecks import distort, distribute, extract
from retrain.config import DEFAULT_MAX_IMAGE_PIXELS, DistortionConfig, FineTuningConfig
from retrain.data.sampling import random_picks
from retrain.errors import ConfigError, RetrainError
from retrain.heads.evaluation import Evaluation
from retrain.heads.head import Head
from retrain.models.loading import ImageModule
from retrain.models.rebuild import CheckpointedNetwork, copy_values, rebuild
from retrain.training.activity import PROBE_IMAGES, ActivityProbe, write_activity
from retrain.training.activity import summary as summarize_activity
from retrain.training.early_stopping import (
    VALIDATION_IMAGES,
    VALIDATION_PLATEAU_PATIENCE,
    DecodedImages,
    KeepBest,
)
from retrain.training.lr_find import RateSearch, range_test
from retrain.training.optim import Plateau, current_learning_rate, make_optimizer
from retrain.utils.interrupt import check as check_interrupt

if TYPE_CHECKING:
    from retrain.bottlenecks.stage import Bottlenecks

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
# The learning-rate finder for fine-tuning: a few hundred images, a range test of few steps.
FIND_IMAGES = 300
FIND_STEPS = 60
FIND_MIN_RATE = 1e-7
FIND_MAX_RATE = 0.1


@dataclass(frozen=True)
class LabeledImages:
    """Image files with their labels (in their head's form, see retrain.heads.head)."""

    paths: Sequence[str | Path]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


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
    # partial fine-tuning's cut and its cached activations (retrain.training.cut)
    cut: dict | None = None

    @property
    def head_alone(self) -> bool:
        """Whether the kept network is the pretrained module with the trained layer, unchanged:
        export it as such."""
        return self.best_step == 0

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
            "cut": self.cut,
        }


def _kept(best_step: int | None) -> str:
    if best_step is None:
        return "last step (no validation images)"
    return "head alone" if best_step == 0 else "fine-tuned"


class FineTuneModel(tf.Module):
    """The image module followed by a dense layer initialised from the trained one."""

    def __init__(self, module_object: Any, weights: np.ndarray, biases: np.ndarray):
        super().__init__(name="fine_tune")
        self.module = module_object
        self.final_weights = tf.Variable(weights.astype(np.float32), name="final_weights")
        self.final_biases = tf.Variable(biases.astype(np.float32), name="final_biases")
        self._training_arg = _takes_training_arg(module_object)
        self.trainable = [*module_trainable_variables(module_object)]
        self.trainable += [self.final_weights, self.final_biases]

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        """Logits of `images` (float32 [b, h, w, 3] in [0, 1]); BatchNorm in inference mode."""
        if self._training_arg:
            features = self.module(images, training=False)
        else:
            features = self.module(images)
        return tf.matmul(features, self.final_weights) + self.final_biases


def module_trainable_variables(module_object: Any) -> list[tf.Variable]:
    """The module's trainable variables (TF Hub's reusable SavedModel attribute)."""
    variables = list(getattr(module_object, "trainable_variables", None) or [])
    if not variables:
        raise RetrainError(
            "{0}: the module has no trainable_variables (not a reusable TF2 "
            "SavedModel), so it cannot be fine-tuned; run with {0}=0",
            "fine_tuning.steps",
        )
    return variables


def _takes_training_arg(module_object: Any) -> bool:
    """Whether the module's __call__ was saved with a `training` argument."""
    functions = getattr(module_object.__call__, "concrete_functions", None) or []
    return any(
        len(fn.structured_input_signature[0]) > 1 or "training" in fn.structured_input_signature[1]
        for fn in functions
    )


def training_order(count: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the images of `steps` batches: seeded shuffles of all `count`, one epoch after
    another (the same for every worker, so a multi-worker run agrees on its batches)."""
    needed = steps * batch_size
    rng = np.random.default_rng(seed)
    epochs = -(-needed // count)
    return np.concatenate([rng.permutation(count) for _ in range(epochs)])[:needed]


def training_dataset(
    images: LabeledImages,
    input_size: tuple[int, int],
    head: Head,
    settings: FineTuningConfig,
    seed: int,
    max_pixels: int,
    errors: dict[int, str],
    distortions: DistortionConfig | None = None,
) -> tf.data.Dataset:
    """`settings.steps` global batches of (pixels, labels, ok), shuffled with `seed`, each
    image distorted afresh (`distort`) if `distortions` are active.

    Decoding is `extract.decoded_batches`'s; an image that no longer decodes has ok=False and
    weighs nothing in the loss. Shardable by data, for MultiWorkerMirroredStrategy.
    """
    order = training_order(len(images), settings.steps, settings.batch_size, seed)
    labels = tf.constant(head.label_array(np.asarray(images.labels)[order]))
    paths = [images.paths[i] for i in order]
    if distortions is not None and distortions.active:
        params = np.random.default_rng([seed, 1]).random((len(order), distort.PARAMS), np.float32)
        batches = distort.distorted_batches(
            paths, params, distortions, input_size, settings.batch_size, errors, max_pixels
        )
    else:
        batches = extract.decoded_batches(
            paths, input_size, settings.batch_size, errors, max_pixels
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return batches.map(
        lambda positions, pixels, ok: (pixels, tf.gather(labels, positions), ok)
    ).with_options(options)


def make_train_step(
    strategy: tf.distribute.Strategy,
    model: FineTuneModel,
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


def evaluate_images(
    extractor: Any,
    images: LabeledImages,
    head: Head,
    weights: np.ndarray,
    biases: np.ndarray,
    input_size: tuple[int, int],
    batch_size: int,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Evaluation | None:
    """Evaluate module (`extractor`: images -> features) + layer + `head` on image files;
    None if there are none.

    Images that no longer decode are left out.
    """
    if not len(images):
        return None
    errors: dict[int, str] = {}
    labels = np.asarray(images.labels)
    chunks = []
    for positions, pixels, ok in extract.decoded_batches(
        images.paths, input_size, batch_size, errors, max_pixels
    ):
        check_interrupt()
        keep = ok.numpy()
        chunks.append((extractor(pixels)[keep], labels[positions.numpy()[keep]]))
    return head.evaluate(weights, biases, chunks)


def fine_tune(
    module: ImageModule,
    head: Head,
    layer: tuple[np.ndarray, np.ndarray],
    train: LabeledImages,
    test: LabeledImages,
    settings: FineTuningConfig,
    strategy: tf.distribute.Strategy | None = None,
    summaries_dir: str | Path | None = None,
    *,
    seed: int = 0,
    log_every: int = 10,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    distortions: DistortionConfig | None = None,
    validation: LabeledImages | None = None,
) -> FineTuneResult:
    """Fine-tune `module` and the trained `layer` (weights, biases) of `head` on `train`'s
    images (distorted afresh if `distortions` are active) for `settings.steps` steps of
    `settings.batch_size`, logging every `log_every` steps.

    With `validation` images (a seeded VALIDATION_IMAGES of them, decoded once), the network is
    evaluated on them before the first step and every `log_every` steps; the "plateau" schedule
    watches their cross-entropy; fine-tuning stops after `settings.patience` evaluations
    without a better one; and the result holds the best network seen (`best_step`; 0 is the
    head alone, see `FineTuneResult.head_alone`). Without, the last step's network.

    The module is loaded afresh under `strategy`'s scope. `test` is evaluated before and after.
    Every worker of a multi-worker strategy must call this with the same arguments; only the
    chief writes TensorBoard scalars to `summaries_dir`/fine_tune. Raises RetrainError when
    there is nothing to train on or a replica would get an empty piece of each batch.
    """
    if not len(train):
        raise RetrainError("fine-tuning: no training images to fine-tune on")
    active = strategy or tf.distribute.get_strategy()
    check_batch(settings, active)
    module_object = distribute.load_module(module, strategy)
    with active.scope():
        module_object = checkpointed(module, module_object)
        model = FineTuneModel(module_object, *layer)
        optimizer = optimizer_for(model, settings)
    log.info(
        "Fine-tuning the whole network: %d steps of %d images, learning rate %g, %d replica(s)",
        settings.steps,
        settings.batch_size,
        settings.learning_rate,
        active.num_replicas_in_sync,
    )
    extractor = distribute.mirrored_backend(module_object, strategy)
    evaluate = partial(
        _evaluate,
        extractor,
        model,
        head,
        test,
        module.input_size,
        settings.batch_size,
        max_pixels,
    )
    before = log_test("before", evaluate())
    evaluate_validation = None
    if validation is not None and len(validation):
        validation = subset(validation, VALIDATION_IMAGES, seed)
        decoded = DecodedImages.decode(
            validation.paths, validation.labels, module.input_size, max_pixels
        )
        if len(decoded):
            evaluate_validation = partial(
                decoded.evaluate, extractor, head, batch_size=settings.batch_size
            )
    watch, plateau = watch_validation(evaluate_validation, model, optimizer, settings)
    errors: dict[int, str] = {}
    dataset = active.experimental_distribute_dataset(
        training_dataset(
            train, module.input_size, head, settings, seed, max_pixels, errors, distortions
        )
    )
    tuned = run_guarded(
        model,
        head,
        optimizer,
        active,
        dataset,
        settings,
        module.input_size,
        log_every=log_every,
        summaries_dir=summaries_dir,
        probe=lambda: ActivityProbe.for_module(
            module, module_object, probe_images(train, module.input_size, max_pixels)
        ),
        guard=(watch, plateau),
        evaluate_test=evaluate,
        before=before,
        exportable=lambda: _exportable(module, module_object, strategy),
    )
    if errors:
        log.warning("Fine-tuning: %d training image(s) no longer decode; left out", len(errors))
    return tuned


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
    model: Any,
    head: Head,
    optimizer: Any,
    strategy: tf.distribute.Strategy,
    dataset: Any,
    settings: FineTuningConfig,
    input_size: tuple[int, int],
    *,
    log_every: int,
    summaries_dir: str | Path | None,
    probe: Callable[[], ActivityProbe | None],
    guard: tuple[KeepBest | None, Plateau | None],
    evaluate_test: Callable[[], Evaluation | None],
    before: Evaluation | None,
    exportable: Callable[[], Any],
) -> FineTuneResult:
    """Train `model` (its `trainable` variables and final layer) on the distributed `dataset`
    for `settings.steps` steps (see `run_steps`), under the validation watch and plateau of
    `guard` (see `watch_validation`), writing TensorBoard scalars (and, from `probe()`,
    sparsity) to `summaries_dir`; then put the best network back, evaluate the test images
    on it (`evaluate_test`; `before` is the head alone's) and return the result, whose module
    is `exportable()`."""
    watch, plateau = guard
    writer = summary_writer(strategy, summaries_dir)
    try:
        step = make_train_step(
            strategy, model, head, optimizer, settings.batch_size, warmup_steps(settings.steps)
        )
        history, seconds, rate = run_steps(
            step,
            iter(dataset),
            settings.steps,
            log_every,
            writer,
            optimizer,
            plateau,
            probe() if writer is not None else None,
            watch,
        )
    finally:
        if writer is not None:
            writer.close()
    steps_run = history[-1]["step"] if history else 0
    if watch is not None:
        watch.restore()
        log.info("Fine-tuning: %s", watch.explain(steps_run))
    after = before if watch is not None and watch.best_step == 0 else evaluate_test()
    log_test("after", after)
    return FineTuneResult(
        module_object=exportable(),
        weights=model.final_weights.numpy(),
        biases=model.final_biases.numpy(),
        input_size=input_size,
        settings=settings,
        replicas=int(strategy.num_replicas_in_sync),
        seconds=seconds,
        steps_per_second=rate,
        history=history,
        before=before,
        after=after,
        steps_run=steps_run,
        best_step=watch.best_step if watch else None,
        validation_before=watch.head_alone if watch else None,
        validation_best=watch.best if watch else None,
        validation_seconds=watch.seconds if watch else 0.0,
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


def search_rate(
    module: ImageModule,
    head: Head,
    layer: tuple[np.ndarray, np.ndarray],
    train: LabeledImages,
    settings: FineTuningConfig,
    *,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    distortions: DistortionConfig | None = None,
) -> RateSearch:
    """The learning-rate finder for fine-tuning (see retrain.training.lr_find): the module with the
    trained `layer` on top, trained on a seeded FIND_IMAGES of `train` in batches of
    `settings.batch_size` while the rate grows from FIND_MIN_RATE to FIND_MAX_RATE over at
    most FIND_STEPS steps. Nothing it trains is kept."""
    search_settings = replace(
        settings, steps=FIND_STEPS, learning_rate=FIND_MIN_RATE, lr_schedule="constant"
    )
    strategy = tf.distribute.get_strategy()
    model = FineTuneModel(checkpointed(module, module.load()), *layer)
    optimizer = optimizer_for(model, search_settings)
    images = subset(train, FIND_IMAGES, seed)
    batches = training_dataset(
        images, module.input_size, head, search_settings, seed, max_pixels, {}, distortions
    )
    iterator = iter(strategy.experimental_distribute_dataset(batches))
    step = make_train_step(strategy, model, head, optimizer, settings.batch_size)
    log.info(
        "Fine-tuning's learning-rate finder: up to %d steps of %d of %d training images",
        FIND_STEPS,
        settings.batch_size,
        len(images),
    )
    return find_rate(step, iterator, optimizer)


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


def _evaluate(
    extractor: Any,
    model: FineTuneModel,
    head: Head,
    images: LabeledImages,
    input_size: tuple[int, int],
    batch_size: int,
    max_pixels: int,
) -> Evaluation | None:
    return evaluate_images(
        extractor,
        images,
        head,
        model.final_weights.numpy(),
        model.final_biases.numpy(),
        input_size,
        batch_size,
        max_pixels,
    )


def run_steps(
    train_step: Any,
    iterator: Any,
    steps: int,
    log_every: int,
    writer: Any,
    optimizer: Any,
    plateau: Plateau | None,
    probe: ActivityProbe | None = None,
    watch: KeepBest | None = None,
) -> tuple[list[dict], float, float]:
    """Run the steps, logging and writing scalars; returns (history, seconds, steps/s).
    `plateau`, if given, watches the mean training loss of each `log_every` steps; `probe`,
    if given, measures the network's sparsity every `log_every` steps (for TensorBoard);
    `watch`, if given, evaluates validation every `log_every` steps and stops the steps early
    when its patience runs out.

    Steps/s leaves out the first step, which traces and compiles the step function, and the
    time spent evaluating validation.
    """
    history = []
    interval_losses = []
    start = time.perf_counter()
    warm = start
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
        if writer is not None:
            with writer.as_default(step=step):
                tf.summary.scalar("cross_entropy", record["loss"])
                tf.summary.scalar("accuracy", record["accuracy"])
                tf.summary.scalar("learning_rate", current_learning_rate(optimizer))
        if step % log_every == 0 or step == steps:
            if plateau is not None:
                plateau.update(sum(interval_losses) / len(interval_losses))
            interval_losses.clear()
            if watch is not None:
                _note_validation(record, watch.check(step), writer)
            if probe is not None:
                activity = probe.measure()
                record.update(summarize_activity(activity))
                with writer.as_default(step=step):
                    write_activity(activity)
            history.append(record)
            log.info(
                "Fine-tune step %d: loss = %f, train accuracy = %.1f%%",
                step,
                record["loss"],
                100 * record["accuracy"],
            )
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


def probe_images(train: LabeledImages, input_size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """The sparsity probe's images: the first PROBE_IMAGES training images that decode, as
    the module takes them."""
    first = DecodedImages.decode(
        train.paths[:PROBE_IMAGES], train.labels[:PROBE_IMAGES], input_size, max_pixels
    )
    return first.pixels.astype(np.float32) / 255


def checkpointed(module: ImageModule, module_object: Any) -> Any:
    """`module_object` as fine-tuning runs it: a bundled EfficientNet-Lite rebuilt with its
    weights as a CheckpointedNetwork (its gradients recompute each block's activations: a
    third of the memory, for about a third more time a step); any other module as it is."""
    net = rebuild(module, module_object)
    if net is None:
        return module_object
    log.info("Fine-tuning: activations recomputed block by block in the backward pass")
    return CheckpointedNetwork(net)


def _exportable(module: ImageModule, module_object: Any, strategy: Any) -> Any:
    """The fine-tuned module as export takes it: a loaded module with plain variables. A
    rebuilt network's or distributed variables are copied into a fresh load of the module."""
    if strategy is None and not isinstance(module_object, CheckpointedNetwork):
        return module_object
    plain = module.load()
    copy_values(module_object.variables, plain.variables)
    return plain


def split_images(bottlenecks: Bottlenecks, name: str) -> LabeledImages:
    """The image files and labels of one split ("training", "validation", "testing")."""
    return LabeledImages(bottlenecks.paths_of(name), bottlenecks.labels[bottlenecks.in_split(name)])


def subset(images: LabeledImages, size: int, seed: int) -> LabeledImages:
    """A seeded random `size` of `images` (in their order); all of them if size <= 0."""
    if not 0 < size < len(images):
        return images
    picks = random_picks(len(images), size, seed)  # the same draw as the cached test subset
    return LabeledImages([images.paths[i] for i in picks], np.asarray(images.labels)[picks])
