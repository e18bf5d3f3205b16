"""The output layer on top of the module's features, owned by one abstraction: the Head.

Every stage that touches the new layer asks its Head: head training (loss, its gradient and the
metrics), evaluation, fine-tuning and export (the op at the end of every exported graph). So a
new kind of output, such as a sigmoid head for multi-label data with 0/1 label vectors, is a
new Head, not a change to those stages. The layer itself is dense, `logits = x @ W + b`; its
parameters travel as NumPy arrays (`weights` [dim, outputs], `biases` [outputs]).

Labels are arrays whose form the head defines (`label_array`, `label_spec`): class indices for
the softmax head. Stages pass them through untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import tensorflow as tf

from retrain.evaluate import Evaluation, evaluate_chunks


class Head(Protocol):
    """What a kind of output layer must say; see the module docstring."""

    @property
    def num_outputs(self) -> int:
        """Width of the layer: classes, or labels of a multi-label head."""

    def label_array(self, labels: np.ndarray) -> np.ndarray:
        """Labels as the head trains on them (dtype and shape)."""

    def label_spec(self, batch: int | None) -> tf.TensorSpec:
        """The TensorSpec of a batch of `batch` labels."""

    def probabilities(self, logits: tf.Tensor) -> tf.Tensor:
        """Scores [n, outputs] of logits [n, outputs]."""

    def targets(self, labels: tf.Tensor, smoothing: float = 0.0) -> tf.Tensor:
        """Float [n, outputs] such that the gradient of the mean loss with respect to the logits
        is (probabilities - targets) / n; `smoothing` moves them that far towards uniform."""

    def losses(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """Loss per example [n]."""

    def hits(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """Per example [n], 1.0 where the prediction is right, else 0.0."""

    def output(self, logits: tf.Tensor, name: str) -> tf.Tensor:
        """The exported graph's output op, named `name`."""

    def evaluate(
        self,
        weights: np.ndarray,
        biases: np.ndarray,
        chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    ) -> Evaluation:
        """The layer's evaluation on a split given as consecutive (features, labels) pieces."""


@dataclass(frozen=True)
class SoftmaxHead:
    """retrain.py's layer: one class per image, a softmax over the classes, cross-entropy."""

    num_classes: int

    @property
    def num_outputs(self) -> int:
        return self.num_classes

    def label_array(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels).astype(np.int32)

    def label_spec(self, batch: int | None) -> tf.TensorSpec:
        return tf.TensorSpec([batch], tf.int32)

    def probabilities(self, logits: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(logits)

    def targets(self, labels: tf.Tensor, smoothing: float = 0.0) -> tf.Tensor:
        one_hot = tf.one_hot(labels, self.num_classes)
        if not smoothing:
            return one_hot
        return one_hot * (1.0 - smoothing) + smoothing / self.num_classes

    def losses(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)

    def hits(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        predicted = tf.argmax(logits, axis=1, output_type=labels.dtype)
        return tf.cast(tf.equal(predicted, labels), tf.float32)

    def output(self, logits: tf.Tensor, name: str) -> tf.Tensor:
        return tf.nn.softmax(logits, name=name)

    def evaluate(
        self,
        weights: np.ndarray,
        biases: np.ndarray,
        chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    ) -> Evaluation:
        return evaluate_chunks(weights, biases, chunks, self.num_classes)


def metrics(head: Head, logits: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(accuracy, mean loss) of `logits` against `labels`."""
    return tf.reduce_mean(head.hits(logits, labels)), tf.reduce_mean(head.losses(logits, labels))


class DenseLayer(tf.Module):
    """The new layer's variables: logits = x @ weights + biases (retrain.py's
    final_training_ops), initialised as retrain.py did (truncated normal, stddev 0.001)."""

    def __init__(self, feature_dim: int, outputs: int, seed: int = 0):
        super().__init__(name="final_retrain_ops")
        init = tf.random.stateless_truncated_normal(
            [feature_dim, outputs], seed=[seed, 1], stddev=0.001
        )
        self.weights = tf.Variable(init, name="final_weights")
        self.biases = tf.Variable(tf.zeros([outputs]), name="final_biases")

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(x, self.weights) + self.biases
