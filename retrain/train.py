"""Training the new softmax layer on cached bottleneck vectors.

Mirrors retrain.py: plain gradient descent on mini-batches drawn at random (with replacement)
from the training split, evaluated every `eval_step_interval` steps on that batch and on a random
validation batch. The steps between two evaluations run inside one tf.function, so the Python
overhead is paid once per evaluation, not once per step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import tensorflow as tf

from retrain.errors import RetrainError, first_line
from retrain.features import FeatureSplit, Split
from retrain.interrupt import check as check_interrupt

log = logging.getLogger(__name__)

# Steps per graph call: long enough to amortise the call, short enough for live logs.
MAX_STEPS_PER_CALL = 500


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters, with retrain.py's defaults."""

    how_many_training_steps: int = 4000
    learning_rate: float = 0.01
    train_batch_size: int = 100
    eval_step_interval: int = 10
    validation_batch_size: int = 100
    seed: int = 0
    checkpoint_every: int = 500


@dataclass
class TrainResult:
    """The trained layer and what training measured."""

    weights: np.ndarray
    biases: np.ndarray
    seconds: float
    history: list[dict] = field(default_factory=list)
    resumed_from_step: int = 0


class SoftmaxHead(tf.Module):
    """The new layer: logits = x @ weights + biases (retrain.py's final_training_ops)."""

    def __init__(self, feature_dim: int, num_classes: int, seed: int = 0):
        super().__init__(name="final_retrain_ops")
        init = tf.random.stateless_truncated_normal(
            [feature_dim, num_classes], seed=[seed, 1], stddev=0.001
        )
        self.weights = tf.Variable(init, name="final_weights")
        self.biases = tf.Variable(tf.zeros([num_classes]), name="final_biases")

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(x, self.weights) + self.biases


def _metrics(logits: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(accuracy, mean cross-entropy) of logits against integer labels."""
    cross_entropy = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )
    correct = tf.equal(tf.argmax(logits, axis=1, output_type=labels.dtype), labels)
    return tf.reduce_mean(tf.cast(correct, tf.float32)), cross_entropy


class HeadTrainer(tf.Module):
    """Holds the layer, the random stream and the step counter: everything a checkpoint needs."""

    def __init__(self, train: Split | FeatureSplit, num_classes: int, config: TrainConfig):
        super().__init__()
        self.config = config
        self.head = SoftmaxHead(train.feature_dim, num_classes, config.seed)
        self.rng = tf.random.Generator.from_seed(config.seed)
        self.step = tf.Variable(0, dtype=tf.int64, name="global_step")
        # The last evaluation round's metrics, so a run resumed at the end can still report them.
        self.last_metrics = tf.Variable(tf.fill([4], np.nan), name="last_metrics")
        self._n = len(train)
        self._streamed = isinstance(train, FeatureSplit)
        if self._streamed:
            # Batches come from the cache through tf.data; the holder keeps the iterator out of
            # checkpoints (a generator's position cannot be saved).
            self._source = SimpleNamespace(batches=iter(_batch_dataset(train, config)))
        else:
            self._x = tf.constant(train.x)
            self._y = tf.constant(train.y.astype(np.int32))
        # XLA compiles the whole step loop when batches are drawn in-graph from memory.
        self.run_steps = tf.function(self._run_steps, jit_compile=not self._streamed)

    def _next_batch(self) -> tuple[tf.Tensor, tf.Tensor]:
        if self._streamed:
            return next(self._source.batches)
        picks = self.rng.uniform([self.config.train_batch_size], 0, self._n, dtype=tf.int32)
        return tf.gather(self._x, picks), tf.gather(self._y, picks)

    def _run_steps(self, count: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Take `count` gradient steps; return accuracy and cross-entropy on the last batch.

        The gradient of the mean softmax cross-entropy is written out (x^T (p - y) / n): a
        handful of ops per step, so the loop compiles and runs fast.
        """
        lr = tf.constant(self.config.learning_rate, tf.float32)
        size = self.config.train_batch_size
        num_classes = self.head.biases.shape[0]
        x = tf.zeros([size, self.head.weights.shape[0]])
        y = tf.zeros([size], tf.int32)
        for _ in tf.range(count):
            x, y = self._next_batch()
            error = tf.nn.softmax(self.head(x)) - tf.one_hot(y, num_classes)
            self.head.weights.assign_sub(lr / size * tf.matmul(x, error, transpose_a=True))
            self.head.biases.assign_sub(lr / size * tf.reduce_sum(error, axis=0))
        self.step.assign_add(tf.cast(count, tf.int64))
        return _metrics(self.head(x), y)

    @tf.function
    def run_intervals(self, intervals, steps_per_interval, val_x, val_y, val_size, summaries):
        """Run `intervals` rounds of (train, evaluate, write summaries) in one graph call.

        Returns float32 [intervals, 4]: train accuracy, train cross-entropy, validation
        accuracy, validation cross-entropy (NaN without a validation split).
        """
        records = tf.TensorArray(tf.float32, size=intervals)
        for i in tf.range(intervals):
            train_accuracy, train_entropy = self.run_steps(steps_per_interval)
            val_accuracy, val_entropy = tf.constant(np.nan, tf.float32), tf.constant(np.nan)
            if val_x is not None:
                val_accuracy, val_entropy = self.evaluate_sample(val_x, val_y, val_size)
            if summaries is not None:
                # "/" restarts the name scope, so tags read `accuracy`, not `while/accuracy`.
                with summaries.train.as_default(step=self.step), tf.name_scope("/"):
                    tf.summary.scalar("accuracy", train_accuracy)
                    tf.summary.scalar("cross_entropy", train_entropy)
                    tf.summary.histogram("final_weights", self.head.weights)
                    tf.summary.histogram("final_biases", self.head.biases)
                if val_x is not None:
                    with summaries.validation.as_default(step=self.step), tf.name_scope("/"):
                        tf.summary.scalar("accuracy", val_accuracy)
                        tf.summary.scalar("cross_entropy", val_entropy)
            records = records.write(
                i, tf.stack([train_accuracy, train_entropy, val_accuracy, val_entropy])
            )
        stacked = records.stack()
        self.last_metrics.assign(stacked[-1])
        return stacked

    def evaluate_sample(self, x: tf.Tensor, y: tf.Tensor, size: tf.Tensor):
        """Accuracy and cross-entropy on `size` random rows of (x, y), or all rows if size < 0."""
        n = tf.shape(y)[0]
        if size >= 0:
            picks = self.rng.uniform([size], 0, n, dtype=tf.int32)
            x = tf.gather(x, picks)
            y = tf.gather(y, picks)
        return _metrics(self.head(x), y)


class Summaries:
    """TensorBoard writers for the train/ and validation/ runs (retrain.py's layout)."""

    def __init__(self, summaries_dir: str | Path):
        root = Path(summaries_dir).expanduser()
        self.train = tf.summary.create_file_writer(str(root / "train"))
        self.validation = tf.summary.create_file_writer(str(root / "validation"))

    def close(self) -> None:
        self.train.close()
        self.validation.close()


def train_head(
    train: Split | FeatureSplit,
    validation: Split | None,
    num_classes: int,
    config: TrainConfig,
    summaries: Summaries | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    callback_every: int = 0,
) -> TrainResult:
    """Train the softmax layer; optionally checkpoint, resume, and report progress.

    Training runs in graph calls of up to MAX_STEPS_PER_CALL steps, cut short at checkpoint
    and callback boundaries. `on_step(step, weights, biases)` is called after each call, at
    the latest every `callback_every` steps (used for intermediate graphs).
    """
    trainer = HeadTrainer(train, num_classes, config)
    manager = None
    resumed = 0
    if checkpoint_dir is not None:
        checkpoint = tf.train.Checkpoint(trainer=trainer)
        manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir), max_to_keep=2)
        if resume and manager.latest_checkpoint:
            try:
                checkpoint.restore(manager.latest_checkpoint).expect_partial()
            except (ValueError, AssertionError, tf.errors.OpError) as err:
                raise RetrainError(
                    f"--checkpoint_path: the checkpoint in {checkpoint_dir} does not fit this "
                    f"run ({first_line(err)}); use another folder or drop --resume"
                ) from None
            resumed = int(trainer.step.numpy())
            log.info("Resumed training from step %d (%s)", resumed, manager.latest_checkpoint)
    if validation is not None and len(validation):
        val_x = tf.constant(validation.x)
        val_y = tf.constant(validation.y.astype(np.int32))
    else:
        val_x = val_y = None
    val_size = tf.constant(config.validation_batch_size, tf.int32)
    total = config.how_many_training_steps
    interval = max(1, config.eval_step_interval)
    validation_n = len(validation) if validation is not None else 0
    events = [MAX_STEPS_PER_CALL]
    if manager is not None:
        events.append(config.checkpoint_every)
    if on_step is not None and callback_every:
        events.append(callback_every)
    history = []
    start = time.perf_counter()
    step = resumed
    last_saved = resumed
    while step < total:
        check_interrupt()
        to_event = min(every - step % every for every in events)
        count = min(interval, total - step)
        rounds = max(1, min(to_event, total - step) // count)
        records = trainer.run_intervals(
            tf.constant(rounds), tf.constant(count), val_x, val_y, val_size, summaries
        ).numpy()
        for row in records:
            step += count
            history.append(_record(step, row, val_x is not None))
            _log_record(history[-1], validation_n, config.validation_batch_size)
        if on_step is not None:
            on_step(step, trainer.head.weights.numpy(), trainer.head.biases.numpy())
        if manager is not None and (step - last_saved >= config.checkpoint_every or step == total):
            manager.save(checkpoint_number=step)
            last_saved = step
    if not history and resumed:  # resumed after the last step: report where it ended
        history.append(_record(step, trainer.last_metrics.numpy(), val_x is not None))
    return TrainResult(
        weights=trainer.head.weights.numpy(),
        biases=trainer.head.biases.numpy(),
        seconds=time.perf_counter() - start,
        history=history,
        resumed_from_step=resumed,
    )


def _batch_dataset(train: FeatureSplit, config: TrainConfig) -> tf.data.Dataset:
    """Random training batches read from the cache, prefetched while the step runs."""
    size, dim = config.train_batch_size, train.cache.feature_dim
    return tf.data.Dataset.from_generator(
        lambda: train.random_batches(size, config.seed),
        output_signature=(
            tf.TensorSpec([size, dim], tf.float32),
            tf.TensorSpec([size], tf.int32),
        ),
    ).prefetch(8)


def _record(step: int, row: np.ndarray, has_validation: bool) -> dict:
    """One evaluation round as a dict, from [train acc, train xent, val acc, val xent]."""
    record = {"step": step, "train_accuracy": float(row[0]), "cross_entropy": float(row[1])}
    if has_validation:
        record["validation_accuracy"] = float(row[2])
        record["validation_cross_entropy"] = float(row[3])
    return record


def _log_record(record: dict, validation_size: int, validation_batch_size: int) -> None:
    step = record["step"]
    log.info("Step %d: Train accuracy = %.1f%%", step, 100 * record["train_accuracy"])
    log.info("Step %d: Cross entropy = %f", step, record["cross_entropy"])
    if "validation_accuracy" in record:
        n = validation_size if validation_batch_size < 0 else validation_batch_size
        log.info(
            "Step %d: Validation accuracy = %.1f%% (N=%d)",
            step,
            100 * record["validation_accuracy"],
            n,
        )
