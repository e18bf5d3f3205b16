"""Training the new layer (its Head: softmax, or sigmoid) on cached bottleneck vectors.

Mirrors retrain.py: plain gradient descent on mini-batches drawn at random (with replacement)
from the training split, evaluated every `eval_step_interval` steps on that batch and on a random
validation batch. The steps between two evaluations run inside one tf.function, so the Python
overhead is paid once per evaluation, not once per step. The loops are tf.while_loops written
out, traced without AutoGraph: converting this module's source took 1.6 s of every run's 4-5 s
of training (clothing_dev, 2 cores), for the same graph.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Union

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from retrain.bottlenecks.splits import FeatureSplit, Split
from retrain.config import HeadTrainingConfig
from retrain.data import sampling
from retrain.errors import RetrainError, StorageError, first_line
from retrain.heads.head import DenseLayer, Head, metrics
from retrain.training.optim import Plateau, current_learning_rate, make_optimizer
from retrain.utils.atomic import writing
from retrain.utils.interrupt import check as check_interrupt

if TYPE_CHECKING:
    from retrain.bottlenecks.distort import DistortedStream

log = logging.getLogger(__name__)

# What training draws its batches from: vectors in memory, in the cache, or made on the fly.
TrainingSource = Union[Split, FeatureSplit, "DistortedStream"]

# Steps per graph call: long enough to amortise the call, short enough for live logs.
MAX_STEPS_PER_CALL = 500
# The layer's histograms are written at the first evaluation at or past every this many steps:
# at every evaluation (10 steps) they took 0.7 s of a default run's 4 s of training.
HISTOGRAM_EVERY = 100
# Checkpoints are <checkpoint_dir>/ckpt-<step>.* (TensorFlow's default name, as before).
CHECKPOINT_NAME = "ckpt"


class TrainingDiverged(RetrainError):
    """The loss became NaN or infinite: the run stops at once, saying why."""


@dataclass
class TrainResult:
    """The trained layer (its head, weights and biases) and what training measured."""

    head: Head
    weights: np.ndarray
    biases: np.ndarray
    seconds: float
    history: list[dict] = field(default_factory=list)
    resumed_from_step: int = 0


class HeadTrainer(tf.Module):
    """Holds the layer, the random stream and the step counter: everything a checkpoint needs."""

    def __init__(self, train: TrainingSource, head: Head, config: HeadTrainingConfig):
        super().__init__()
        self.config = config
        self.spec = head  # what the outputs mean: labels, loss, gradient (retrain.heads.head)
        # Named `head` for the checkpoints' sake: they store its variables as head/weights.
        self.head = DenseLayer(train.feature_dim, head.num_outputs, config.random_seed)
        self.rng = tf.random.Generator.from_seed(config.random_seed)
        self.step = tf.Variable(0, dtype=tf.int64, name="global_step")
        # The last evaluation round's metrics, so a run resumed at the end can still report them.
        self.last_metrics = tf.Variable(tf.fill([4], np.nan), name="last_metrics")
        self.optimizer = make_optimizer(
            config.optimizer,
            config.learning_rate,
            config.lr_schedule,
            config.how_many_training_steps,
            config.weight_decay,
        )
        self.optimizer.exclude_from_weight_decay(var_list=[self.head.biases])
        self.optimizer.build([self.head.weights, self.head.biases])
        self.plateau = None
        if config.lr_schedule == "plateau":
            self.plateau = Plateau(self.optimizer, config.plateau_factor, config.plateau_patience)
        self._n = len(train)
        cdf = head.draw_cdf(train.y, config.sampling)
        weights = head.class_weights(train.y, config.class_weights)
        self._class_weights = None if weights is None else tf.constant(weights)
        self._streamed = not isinstance(train, Split)
        if self._streamed:
            # Batches come through tf.data (from the cache, or computed on the fly); the holder
            # keeps the iterator out of checkpoints (a generator's position cannot be saved).
            batches = _streamed_batches(train, head, config, cdf)
            self._source = SimpleNamespace(batches=iter(batches))
        else:
            self._x = tf.constant(train.x)
            self._y = tf.constant(head.label_array(train.y))
            self._alias = None
            if cdf is not None:
                self._alias = tuple(tf.constant(a) for a in sampling.alias_table(cdf))
        # XLA compiles the whole step loop when batches are drawn in-graph from memory.
        self.run_steps = tf.function(
            self._run_steps, jit_compile=not self._streamed, autograph=False
        )

    def _next_batch(self) -> tuple[tf.Tensor, tf.Tensor]:
        if self._streamed:
            return next(self._source.batches)
        size = self.config.train_batch_size
        picks = self.rng.uniform([size], 0, self._n, dtype=tf.int32)
        if self._alias is not None:
            keep, alias = self._alias
            stay = self.rng.uniform([size]) < tf.gather(keep, picks)
            picks = tf.where(stay, picks, tf.gather(alias, picks))
        return tf.gather(self._x, picks), tf.gather(self._y, picks)

    def _run_steps(self, count: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Take `count` optimizer steps; return accuracy and mean loss on the last batch.

        The gradient of the head's mean loss is written out, x^T (probabilities - targets) / n
        (with dropout on x and smoothed targets when configured): a handful of ops per step,
        so the loop compiles and runs fast.
        """
        size = self.config.train_batch_size
        x = tf.zeros([size, self.head.weights.shape[0]])
        y = tf.zeros(self.spec.label_spec(size).shape, self.spec.label_spec(size).dtype)

        def step(i: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, ...]:
            x, y = self._next_batch()
            self._apply_step(x, y)
            return i + 1, x, y

        _, x, y = tf.while_loop(lambda i, x, y: i < count, step, (tf.constant(0), x, y))
        self.step.assign_add(tf.cast(count, tf.int64))
        return metrics(self.spec, self.head(x), y)

    def _apply_step(self, x: tf.Tensor, y: tf.Tensor) -> None:
        """One optimizer step on the batch (x, y)."""
        config = self.config
        inputs = x
        if config.dropout_rate:
            keep = self.rng.uniform(tf.shape(x)) >= config.dropout_rate
            inputs = tf.where(keep, x / (1.0 - config.dropout_rate), 0.0)
        targets = self.spec.targets(y, config.label_smoothing)
        error = (self.spec.probabilities(self.head(inputs)) - targets) / config.train_batch_size
        if self._class_weights is not None:
            error *= self.spec.example_weights(y, self._class_weights)
        gradients = [tf.matmul(inputs, error, transpose_a=True), tf.reduce_sum(error, 0)]
        self.optimizer.apply_gradients(zip(gradients, [self.head.weights, self.head.biases]))

    @tf.function(autograph=False)
    def run_intervals(self, intervals, steps_per_interval, val_x, val_y, val_size, summaries):
        """Run `intervals` rounds of (train, evaluate, write summaries) in one graph call.

        Returns float32 [intervals, 6]: train accuracy, train cross-entropy, validation
        accuracy, validation cross-entropy (NaN without a validation split), the size of one
        step's update of the weights relative to the weights (see `_update_ratio`), and the
        learning rate at the end of the interval.
        """

        def one_interval(i: tf.Tensor, records: tf.TensorArray) -> tuple:
            row = self._interval(steps_per_interval, val_x, val_y, val_size, summaries)
            return i + 1, records.write(i, row)

        _, records = tf.while_loop(
            lambda i, records: i < intervals,
            one_interval,
            (tf.constant(0), tf.TensorArray(tf.float32, size=intervals)),
        )
        stacked = records.stack()
        self.last_metrics.assign(stacked[-1, :4])
        return stacked

    def _interval(self, steps, val_x, val_y, val_size, summaries) -> tf.Tensor:
        """Train `steps` steps, evaluate, write the summaries; the round's row (run_intervals)."""
        before = tf.identity(self.head.weights)
        biases_before = tf.identity(self.head.biases)
        train_accuracy, train_entropy = self.run_steps(steps)
        update_ratio = _update_ratio(before, self.head.weights, steps)
        val_accuracy, val_entropy = tf.constant(np.nan, tf.float32), tf.constant(np.nan)
        if val_x is not None:
            val_accuracy, val_entropy = self.evaluate_sample(val_x, val_y, val_size)
        if self.plateau is not None:
            self.plateau.update(val_entropy if val_x is not None else train_entropy)
        if summaries is not None:
            ratios = (update_ratio, _update_ratio(biases_before, self.head.biases, steps))
            validation = (val_accuracy, val_entropy) if val_x is not None else None
            self._write_summaries(
                summaries, steps, (train_accuracy, train_entropy), validation, ratios
            )
        return tf.stack(
            [
                train_accuracy,
                train_entropy,
                val_accuracy,
                val_entropy,
                update_ratio,
                current_learning_rate(self.optimizer),
            ]
        )

    def _write_summaries(self, summaries, steps, train, validation, ratios) -> None:
        """One evaluation's scalars: `train` and `validation` (None: no validation split) as
        (accuracy, cross-entropy), `ratios` as the weights' and biases' update ratios; and the
        layer's histograms when the interval of `steps` reached a multiple of HISTOGRAM_EVERY."""
        # "/" restarts the name scope, so tags read `accuracy`, not `while/accuracy`.
        with summaries.train.as_default(step=self.step), tf.name_scope("/"):
            tf.summary.scalar("accuracy", train[0])
            tf.summary.scalar("cross_entropy", train[1])
            tf.summary.scalar("learning_rate", current_learning_rate(self.optimizer))
            tf.summary.scalar("update_to_weight_ratio/weights", ratios[0])
            tf.summary.scalar("update_to_weight_ratio/biases", ratios[1])
            with tf.summary.record_if(_crossed(self.step, steps, HISTOGRAM_EVERY)):
                tf.summary.histogram("final_weights", self.head.weights)
                tf.summary.histogram("final_biases", self.head.biases)
        if validation is not None:
            with summaries.validation.as_default(step=self.step), tf.name_scope("/"):
                tf.summary.scalar("accuracy", validation[0])
                tf.summary.scalar("cross_entropy", validation[1])

    def evaluate_sample(self, x: tf.Tensor, y: tf.Tensor, size: tf.Tensor):
        """Accuracy and cross-entropy on `size` random rows of (x, y), or all rows if size < 0."""

        def sample() -> tuple[tf.Tensor, tf.Tensor]:
            picks = self.rng.uniform([size], 0, tf.shape(y)[0], dtype=tf.int32)
            return tf.gather(x, picks), tf.gather(y, picks)

        x, y = tf.cond(size >= 0, sample, lambda: (x, y))
        return metrics(self.spec, self.head(x), y)


class Summaries:
    """TensorBoard writers for the train/ and validation/ runs (retrain.py's layout)."""

    def __init__(self, summaries_dir: str | Path):
        self.root = Path(summaries_dir).expanduser()
        self.train = tf.summary.create_file_writer(str(self.root / "train"))
        self.validation = tf.summary.create_file_writer(str(self.root / "validation"))

    def writing(self) -> contextlib.AbstractContextManager:
        """Around what writes summaries: a failure of the storage is a StorageError."""
        return writing(self.root, "TensorBoard summaries")

    def close(self) -> None:
        with self.writing():
            self.train.close()
            self.validation.close()


@dataclass(frozen=True)
class StepCallback:
    """`call(step, weights, biases)` after each graph call of training, which cuts its calls
    short so that one ends at the latest every `every` steps (0: no such cut). Intermediate
    graphs are written so."""

    call: Callable[[int, np.ndarray, np.ndarray], None]
    every: int = 0


def train_head(
    train: TrainingSource,
    validation: Split | None,
    head: Head,
    config: HeadTrainingConfig,
    summaries: Summaries | None = None,
    on_step: StepCallback | None = None,
    keep_checkpoints: bool = False,
) -> TrainResult:
    """Train the new layer for `head` (see retrain.heads.head); optionally checkpoint, resume, and
    report progress.

    Training runs in graph calls of up to MAX_STEPS_PER_CALL steps, cut short at checkpoint
    and `on_step` boundaries (see StepCallback). With `keep_checkpoints` (in a cluster, the
    chief's), training saves checkpoints in `config.checkpoint_path` if set, every
    `config.checkpoint_every` steps and at the end, and resumes from the latest if
    `config.resume`.
    """
    trainer = HeadTrainer(train, head, config)
    checkpoint_dir = config.checkpoint_path if keep_checkpoints else None
    manager, resumed = _checkpoints(trainer, checkpoint_dir, config.resume and keep_checkpoints)
    val_x, val_y = _validation_tensors(validation, head)
    val_size = tf.constant(config.validation_batch_size, tf.int32)
    total = config.how_many_training_steps
    interval = max(1, config.eval_step_interval)
    validation_n = len(validation) if validation is not None else 0
    events = [MAX_STEPS_PER_CALL]
    if manager is not None:
        events.append(config.checkpoint_every)
    if on_step is not None and on_step.every:
        events.append(on_step.every)
    history = []
    start = time.perf_counter()
    step = resumed
    last_saved = resumed
    bar = _progress_bar(total, resumed)
    while step < total:
        check_interrupt()
        to_event = min(every - step % every for every in events)
        count = min(interval, total - step)
        rounds = max(1, min(to_event, total - step) // count)
        with summaries.writing() if summaries else contextlib.nullcontext():
            records = trainer.run_intervals(
                tf.constant(rounds), tf.constant(count), val_x, val_y, val_size, summaries
            ).numpy()
        for row in records:
            step += count
            history.append(_record(step, row, val_x is not None))
            _log_record(history[-1], validation_n, config.validation_batch_size, bar is None)
            if bar is not None:
                bar.update(count)
                bar.set_postfix_str(_postfix(history[-1]), refresh=False)
            _check_finite(row[1], step, config)
        if on_step is not None:
            on_step.call(step, trainer.head.weights.numpy(), trainer.head.biases.numpy())
        if manager is not None and (step - last_saved >= config.checkpoint_every or step == total):
            save_checkpoint(manager, trainer, step)
            last_saved = step
    if bar is not None:
        bar.close()
    if not history and resumed:  # resumed after the last step: report where it ended
        history.append(_record(step, trainer.last_metrics.numpy(), val_x is not None))
    return TrainResult(
        head=head,
        weights=trainer.head.weights.numpy(),
        biases=trainer.head.biases.numpy(),
        seconds=time.perf_counter() - start,
        history=history,
        resumed_from_step=resumed,
    )


def _checkpoints(
    trainer: HeadTrainer, checkpoint_dir: str | Path | None, resume: bool
) -> tuple[tf.train.CheckpointManager | None, int]:
    """The manager of `trainer`'s checkpoints in `checkpoint_dir` (None: no checkpoints), and
    the step training resumes from: that of the latest checkpoint, restored, if `resume` and
    there is one; else 0."""
    if checkpoint_dir is None:
        return None, 0
    checkpoint = tf.train.Checkpoint(trainer=trainer)
    manager = tf.train.CheckpointManager(
        checkpoint, str(checkpoint_dir), max_to_keep=2, checkpoint_name=CHECKPOINT_NAME
    )
    if not (resume and manager.latest_checkpoint):
        return manager, 0
    try:
        checkpoint.restore(manager.latest_checkpoint).expect_partial()
    except (ValueError, AssertionError, tf.errors.OpError) as err:
        raise RetrainError(
            f"{{0}}: the checkpoint in {checkpoint_dir} does not fit this "
            f"run ({first_line(err)}); use another folder or drop {{1}}",
            "training.checkpoint_path",
            "training.resume",
        ) from None
    resumed = int(trainer.step.numpy())
    log.info("Resumed training from step %d (%s)", resumed, manager.latest_checkpoint)
    return manager, resumed


def _validation_tensors(
    validation: Split | None, head: Head
) -> tuple[tf.Tensor, tf.Tensor] | tuple[None, None]:
    """The validation split's vectors and labels (as `head` takes them) as constants, or
    (None, None) without validation images."""
    if validation is not None and len(validation):
        return tf.constant(validation.x), tf.constant(head.label_array(validation.y))
    return None, None


def _check_finite(loss: float, step: int, config: HeadTrainingConfig) -> None:
    """Raise TrainingDiverged if the training loss at `step` is NaN or infinite."""
    if not np.isfinite(loss):
        raise TrainingDiverged(
            f"training diverged: the loss became {loss} at step {step} with a "
            f"learning rate of {config.learning_rate:g}; lower {{0}} (e.g. to "
            f"{config.learning_rate / 10:g})",
            "training.learning_rate",
        )


def save_checkpoint(manager: tf.train.CheckpointManager, trainer: HeadTrainer, step: int) -> None:
    """Save `trainer` as checkpoint `step`. A failure of the storage is a StorageError, and
    what it left of this checkpoint is removed: the last complete one stays the latest."""
    folder = Path(manager.directory)
    variables = {id(v): v for v in (*trainer.variables, *trainer.optimizer.variables)}
    size = sum(int(np.prod(v.shape)) * v.dtype.size for v in variables.values())
    try:
        with writing(folder, "checkpoint", size):
            manager.save(checkpoint_number=step)
    except StorageError:
        for partial in folder.glob(f"{CHECKPOINT_NAME}-{step}[._]*"):
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)
        raise


def _streamed_batches(
    train: FeatureSplit | DistortedStream,
    head: Head,
    config: HeadTrainingConfig,
    cdf: np.ndarray | None,
) -> tf.data.Dataset:
    """Random training batches (drawn by `cdf`, see retrain.data.sampling) that do not come from
    memory, prefetched while a step runs: read from the cache, or made afresh by a stream of
    distorted images."""
    size, seed = config.train_batch_size, config.random_seed
    if not isinstance(train, FeatureSplit):
        return train.dataset(size, seed, head, cdf, batches=config.how_many_training_steps)
    return tf.data.Dataset.from_generator(
        lambda: ((x, head.label_array(y)) for x, y in train.random_batches(size, seed, cdf)),
        output_signature=(
            tf.TensorSpec([size, train.feature_dim], tf.float32),
            head.label_spec(size),
        ),
    ).prefetch(8)


def _update_ratio(before: tf.Tensor, after: tf.Tensor, steps: tf.Tensor) -> tf.Tensor:
    """||after - before|| / ||after|| per step: how far a step moves the weights, relative to
    their size (about 1e-3 is healthy; far less, they barely move; far more, they thrash)."""
    moved = tf.norm(after - before) / tf.maximum(tf.norm(after), 1e-12)
    return moved / tf.cast(steps, tf.float32)


def _crossed(step: tf.Tensor, steps: tf.Tensor, every: int) -> tf.Tensor:
    """Whether the last `steps` steps, ending at `step`, reached a multiple of `every`."""
    steps = tf.cast(steps, step.dtype)
    return (step - steps) // every < step // every


def _record(step: int, row: np.ndarray, has_validation: bool) -> dict:
    """One evaluation round as a dict, from [train acc, train xent, val acc, val xent,
    update ratio, learning rate] (the last two missing for a round restored from a
    checkpoint)."""
    record = {"step": step, "train_accuracy": float(row[0]), "cross_entropy": float(row[1])}
    if has_validation:
        record["validation_accuracy"] = float(row[2])
        record["validation_cross_entropy"] = float(row[3])
    if len(row) > 5:
        record["update_ratio"] = float(row[4])
        record["learning_rate"] = float(row[5])
    return record


def _progress_bar(total: int, done: int) -> tqdm | None:
    """A tqdm bar with live accuracy when stderr is a terminal and the log is not at DEBUG
    (the per-interval lines then go to DEBUG); None otherwise: logs keep retrain.py's lines."""
    if not sys.stderr.isatty() or log.isEnabledFor(logging.DEBUG):
        return None
    return tqdm(total=total, initial=done, unit="step", desc="Training", dynamic_ncols=True)


def _postfix(record: dict) -> str:
    text = f"train {100 * record['train_accuracy']:.1f}%"
    if "validation_accuracy" in record:
        text += f", validation {100 * record['validation_accuracy']:.1f}%"
    return text


def _log_record(
    record: dict, validation_size: int, validation_batch_size: int, info: bool = True
) -> None:
    """retrain.py's three lines per evaluation round, at INFO (`info`) or DEBUG."""
    level = logging.INFO if info else logging.DEBUG
    step = record["step"]
    log.log(level, "Step %d: Train accuracy = %.1f%%", step, 100 * record["train_accuracy"])
    log.log(level, "Step %d: Cross entropy = %f", step, record["cross_entropy"])
    if "validation_accuracy" in record:
        n = validation_size if validation_batch_size < 0 else validation_batch_size
        log.log(
            level,
            "Step %d: Validation accuracy = %.1f%% (N=%d)",
            step,
            100 * record["validation_accuracy"],
            n,
        )
