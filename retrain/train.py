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

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)


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
class Split:
    """Feature vectors [n, dim] and integer labels [n] of one split."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


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

    def __init__(self, train: Split, num_classes: int, config: TrainConfig):
        super().__init__()
        self.config = config
        self.head = SoftmaxHead(train.x.shape[1], num_classes, config.seed)
        self.rng = tf.random.Generator.from_seed(config.seed)
        self.step = tf.Variable(0, dtype=tf.int64, name="global_step")
        self._x = tf.constant(train.x)
        self._y = tf.constant(train.y.astype(np.int32))
        self._n = len(train)

    @tf.function
    def run_steps(self, count: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Take `count` gradient steps; return accuracy and cross-entropy on the last batch."""
        accuracy = tf.constant(0.0)
        cross_entropy = tf.constant(0.0)
        lr = tf.constant(self.config.learning_rate, tf.float32)
        for _ in tf.range(count):
            picks = self.rng.uniform([self.config.train_batch_size], 0, self._n, dtype=tf.int32)
            x = tf.gather(self._x, picks)
            y = tf.gather(self._y, picks)
            with tf.GradientTape() as tape:
                logits = self.head(x)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                )
            grads = tape.gradient(loss, [self.head.weights, self.head.biases])
            self.head.weights.assign_sub(lr * grads[0])
            self.head.biases.assign_sub(lr * grads[1])
            accuracy, cross_entropy = _metrics(self.head(x), y)
        self.step.assign_add(tf.cast(count, tf.int64))
        return accuracy, cross_entropy

    @tf.function
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

    def write(self, step: int, trainer: HeadTrainer, train_metrics, validation_metrics) -> None:
        with self.train.as_default(step=step):
            tf.summary.scalar("accuracy", train_metrics[0])
            tf.summary.scalar("cross_entropy", train_metrics[1])
            tf.summary.histogram("final_weights", trainer.head.weights)
            tf.summary.histogram("final_biases", trainer.head.biases)
        if validation_metrics is not None:
            with self.validation.as_default(step=step):
                tf.summary.scalar("accuracy", validation_metrics[0])
                tf.summary.scalar("cross_entropy", validation_metrics[1])

    def close(self) -> None:
        self.train.close()
        self.validation.close()


def train_head(
    train: Split,
    validation: Split | None,
    num_classes: int,
    config: TrainConfig,
    summaries: Summaries | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> TrainResult:
    """Train the softmax layer; optionally checkpoint, resume, and report every step interval.

    `on_step(step, weights, biases)` is called after each evaluation (used for intermediate
    graphs).
    """
    trainer = HeadTrainer(train, num_classes, config)
    manager = None
    resumed = 0
    if checkpoint_dir is not None:
        checkpoint = tf.train.Checkpoint(trainer=trainer)
        manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir), max_to_keep=2)
        if resume and manager.latest_checkpoint:
            checkpoint.restore(manager.latest_checkpoint).expect_partial()
            resumed = int(trainer.step.numpy())
            log.info("Resumed training from step %d (%s)", resumed, manager.latest_checkpoint)
    if validation is not None and len(validation):
        val_x = tf.constant(validation.x)
        val_y = tf.constant(validation.y.astype(np.int32))
    else:
        val_x = val_y = None
    total = config.how_many_training_steps
    interval = max(1, config.eval_step_interval)
    history = []
    start = time.perf_counter()
    step = resumed
    last_saved = resumed
    while step < total:
        count = min(interval - step % interval, total - step)
        train_metrics = trainer.run_steps(tf.constant(count, tf.int32))
        step += count
        validation_metrics = None
        if val_x is not None:
            validation_metrics = trainer.evaluate_sample(
                val_x, val_y, tf.constant(config.validation_batch_size, tf.int32)
            )
        record = {
            "step": step,
            "train_accuracy": float(train_metrics[0]),
            "cross_entropy": float(train_metrics[1]),
        }
        if validation_metrics is not None:
            record["validation_accuracy"] = float(validation_metrics[0])
            record["validation_cross_entropy"] = float(validation_metrics[1])
        history.append(record)
        _log_record(
            record, len(validation) if validation is not None else 0, config.validation_batch_size
        )
        if summaries is not None:
            summaries.write(step, trainer, train_metrics, validation_metrics)
        if on_step is not None:
            on_step(step, trainer.head.weights.numpy(), trainer.head.biases.numpy())
        if manager is not None and (step - last_saved >= config.checkpoint_every or step == total):
            manager.save(checkpoint_number=step)
            last_saved = step
    return TrainResult(
        weights=trainer.head.weights.numpy(),
        biases=trainer.head.biases.numpy(),
        seconds=time.perf_counter() - start,
        history=history,
        resumed_from_step=resumed,
    )


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
