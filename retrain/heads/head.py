"""The output layer on top of the module's features, owned by one abstraction: the Head.

Every stage that touches the new layer asks its Head: head training (loss, its gradient and the
metrics), evaluation, fine-tuning and export (the op at the end of every exported graph). So a
new kind of output, such as a sigmoid head for multi-label data with 0/1 label vectors, is a
new Head, not a change to those stages. The layer itself is dense, `logits = x @ W + b`; its
parameters travel as NumPy arrays (`weights` [dim, outputs], `biases` [outputs]).

Labels are arrays whose form the head defines (`label_array`, `label_spec`): class indices for
the softmax head, 0/1 rows [n, labels] for the sigmoid head. Stages pass them through untouched.
After training, `calibrate` lets a head tune its decisions on the validation split (the sigmoid
head's per-label thresholds, which `thresholds` then gives to the exports).

Code outside the heads asks its Head, never the label array's shape, what labels mean: which
outputs an example has (`positives`, `membership`), how a label reads (`label_text`), how
scores are judged against labels (`accuracy`). `make_head` picks the head for an image set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np
import tensorflow as tf

from retrain.data import sampling
from retrain.heads.evaluation import (
    Evaluation,
    MultiLabelEvaluation,
    choose_thresholds,
    evaluate_chunks,
    evaluate_multilabel_chunks,
)

if TYPE_CHECKING:
    from retrain.data.scan import ImageSet

# What a head's `evaluate` gives.
AnyEvaluation = Evaluation | MultiLabelEvaluation
Chunks = Iterable[tuple[np.ndarray, np.ndarray]]


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

    def evaluate(self, weights: np.ndarray, biases: np.ndarray, chunks: Chunks) -> AnyEvaluation:
        """The layer's evaluation on a split given as consecutive (features, labels) pieces."""

    def class_weights(self, labels: np.ndarray, mode: str) -> np.ndarray | None:
        """float32 loss weights for `mode` (config.CLASS_WEIGHTS) computed from the training
        labels, in the form `example_weights` takes; None for "none"."""

    def draw_cdf(self, labels: np.ndarray, mode: str) -> np.ndarray | None:
        """The cumulative probability with which batches draw each training example for
        `mode` (config.SAMPLINGS), or None for uniform draws."""

    def example_weights(self, labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """Each example's (or each output's) weight in the loss, [n, 1] or [n, outputs], from
        `class_weights`' array: the trainer multiplies the loss gradient by it."""

    @property
    def thresholds(self) -> tuple[float, ...] | None:
        """Per output, the score from which it counts as predicted, if the head decides so (the
        exports write them beside the labels); None for the softmax head's argmax."""

    def calibrate(
        self, weights: np.ndarray, biases: np.ndarray, validation: Chunks
    ) -> tuple[Head, AnyEvaluation | None]:
        """The head with its decisions tuned on the validation split, and the evaluation it
        was tuned on; a head with nothing to tune returns itself and None, reading nothing."""

    # What the labels say, in NumPy: every question about a label array's form is asked here.

    @property
    def multi_label(self) -> bool:
        """True when an image may have any number of labels (0/1 rows [n, outputs]); False
        for one class index per image [n]."""

    @property
    def output_noun(self) -> str:
        """What one output stands for, as messages name it: "class" or "label"."""

    def positives(self, labels: np.ndarray) -> np.ndarray:
        """int64 [outputs]: how many of the examples `labels` each output applies to (images
        per class; positives per label)."""

    def membership(self, labels: np.ndarray) -> np.ndarray:
        """float32 [n, outputs]: 1 where an example belongs to the class (has the label),
        else 0."""

    def label_text(self, label: np.ndarray | int, names: list[str], separator: str = ",") -> str:
        """One example's label as the names it stands for (`names`, one per output): a class
        name, or the names of the labels that apply joined by `separator`."""

    def accuracy(
        self, scores: np.ndarray, labels: np.ndarray, thresholds: Sequence[float] | None = None
    ) -> float:
        """The share of examples right given their scores [n, outputs] (0.0 for none): the top
        class is the label, or every label is decided right (score >= its threshold;
        `thresholds` default to the head's own)."""


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

    def evaluate(self, weights: np.ndarray, biases: np.ndarray, chunks: Chunks) -> Evaluation:
        return evaluate_chunks(weights, biases, chunks, self.num_classes)

    def class_weights(self, labels: np.ndarray, mode: str) -> np.ndarray | None:
        """[classes]: see sampling.class_weights."""
        return sampling.class_weights(labels, self.num_classes, mode)

    def draw_cdf(self, labels: np.ndarray, mode: str) -> np.ndarray | None:
        """How batches draw examples (config.SAMPLINGS; "auto" is retrain.py's
        class_balanced): see sampling.draw_cdf."""
        mode = "class_balanced" if mode == "auto" else mode
        return sampling.draw_cdf(labels, self.num_classes, mode)

    def example_weights(self, labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        return tf.gather(weights, labels)[:, None]

    @property
    def thresholds(self) -> None:
        return None

    def calibrate(
        self, weights: np.ndarray, biases: np.ndarray, validation: Chunks
    ) -> tuple[SoftmaxHead, None]:
        return self, None

    @property
    def multi_label(self) -> bool:
        """False: one class index per image."""
        return False

    @property
    def output_noun(self) -> str:
        """ "class"."""
        return "class"

    def positives(self, labels: np.ndarray) -> np.ndarray:
        """Images per class, [classes] (see sampling.class_counts)."""
        return sampling.class_counts(labels, self.num_classes)

    def membership(self, labels: np.ndarray) -> np.ndarray:
        """The class indices one-hot, float32 [n, classes]."""
        return np.eye(self.num_classes, dtype=np.float32)[labels]

    def label_text(self, label: np.ndarray | int, names: list[str], separator: str = ",") -> str:
        """The class's name (`separator` joins nothing here)."""
        return names[int(label)]

    def accuracy(
        self, scores: np.ndarray, labels: np.ndarray, thresholds: Sequence[float] | None = None
    ) -> float:
        """The share of images whose top-scoring class is their label (`thresholds` are not
        used: the argmax decides)."""
        if not len(scores):
            return 0.0
        return float(np.mean(scores.argmax(1) == labels))


@dataclass(frozen=True)
class SigmoidHead:
    """Multi-label: each image has 0/1 per label, each output is an independent probability
    (a sigmoid), and the loss is the sigmoid cross-entropy summed over the labels.

    `hits` (training's accuracy) is the exact match at 0.5: every label right. A label is
    predicted from its threshold on (`thresholds`, chosen by `calibrate` on the validation
    split to maximise that label's F1; 0.5 before that or without a validation positive).
    """

    num_labels: int
    label_thresholds: tuple[float, ...] | None = None

    @property
    def num_outputs(self) -> int:
        return self.num_labels

    def label_array(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels).astype(np.float32).reshape(-1, self.num_labels)

    def label_spec(self, batch: int | None) -> tf.TensorSpec:
        return tf.TensorSpec([batch, self.num_labels], tf.float32)

    def probabilities(self, logits: tf.Tensor) -> tf.Tensor:
        return tf.nn.sigmoid(logits)

    def targets(self, labels: tf.Tensor, smoothing: float = 0.0) -> tf.Tensor:
        """Labels moved `smoothing` of the way towards 0.5: y * (1 - s) + s / 2."""
        if not smoothing:
            return labels
        return labels * (1.0 - smoothing) + smoothing / 2

    def losses(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        entropy = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
        return tf.reduce_sum(entropy, axis=1)

    def hits(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        right = tf.equal(logits >= 0, labels >= 0.5)
        return tf.cast(tf.reduce_all(right, axis=1), tf.float32)

    def output(self, logits: tf.Tensor, name: str) -> tf.Tensor:
        return tf.nn.sigmoid(logits, name=name)

    def evaluate(
        self, weights: np.ndarray, biases: np.ndarray, chunks: Chunks
    ) -> MultiLabelEvaluation:
        thresholds = None if self.label_thresholds is None else np.array(self.label_thresholds)
        return evaluate_multilabel_chunks(weights, biases, chunks, self.num_labels, thresholds)

    def class_weights(self, labels: np.ndarray, mode: str) -> np.ndarray | None:
        """ "balanced": [labels] weights of each label's positives, n_negative / n_positive
        (TensorFlow's and PyTorch's pos_weight; a label's negatives weigh 1, and its positives
        then weigh as much in total). A label without positives or negatives weighs 1."""
        if mode == "none":
            return None
        labels = np.asarray(labels).reshape(-1, self.num_labels)
        positives = labels.sum(axis=0, dtype=np.float64)
        negatives = len(labels) - positives
        with np.errstate(divide="ignore", invalid="ignore"):
            weights = np.where((positives > 0) & (negatives > 0), negatives / positives, 1.0)
        return weights.astype(np.float32)

    def draw_cdf(self, labels: np.ndarray, mode: str) -> None:
        """Uniform draws ("auto"): an image has several labels, so there is no class to
        balance (config validation refuses "class_balanced" with a labels CSV)."""
        return None

    def example_weights(self, labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """[n, labels]: a positive's label weight, 1 for a negative."""
        return 1.0 + (weights - 1.0) * labels

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self.label_thresholds or (0.5,) * self.num_labels

    def calibrate(
        self, weights: np.ndarray, biases: np.ndarray, validation: Chunks
    ) -> tuple[SigmoidHead, MultiLabelEvaluation | None]:
        """Thresholds that maximise each label's F1 on `validation` (see
        evaluate.best_f1_threshold), and the validation evaluation at them (None: no
        validation images, and 0.5 for every label)."""
        untuned = replace(self, label_thresholds=None).evaluate(weights, biases, validation)
        if not untuned.count:
            return replace(self, label_thresholds=None), None
        chosen = choose_thresholds(untuned.probabilities, untuned.labels)
        tuned = replace(self, label_thresholds=tuple(float(t) for t in chosen))
        untuned.thresholds = chosen
        return tuned, untuned

    @property
    def multi_label(self) -> bool:
        """True: 0/1 rows, any number of labels per image."""
        return True

    @property
    def output_noun(self) -> str:
        """ "label"."""
        return "label"

    def positives(self, labels: np.ndarray) -> np.ndarray:
        """Images each label applies to, [labels]: the 0/1 rows summed."""
        return labels.sum(axis=0).astype(np.int64)

    def membership(self, labels: np.ndarray) -> np.ndarray:
        """The 0/1 rows themselves, as float32 [n, labels]."""
        return labels.astype(np.float32)

    def label_text(self, label: np.ndarray | int, names: list[str], separator: str = ",") -> str:
        """The names of the labels whose entry in the 0/1 row `label` is on, joined by
        `separator` ("" for none)."""
        return separator.join(name for name, on in zip(names, label) if on)

    def accuracy(
        self, scores: np.ndarray, labels: np.ndarray, thresholds: Sequence[float] | None = None
    ) -> float:
        """The exact match a multi-label run reports: the share of images with every label
        decided right, a label being predicted where its score >= its threshold (`thresholds`,
        default this head's `thresholds`)."""
        if not len(scores):
            return 0.0
        decided = scores >= np.asarray(thresholds if thresholds is not None else self.thresholds)
        return float(np.mean((decided == labels.astype(bool)).all(axis=1)))


def make_head(image_set: ImageSet) -> Head:
    """The output layer's head for the data: a sigmoid per label for multi-label data (labels
    from a CSV), else retrain.py's softmax over the classes."""
    if image_set.multi_label:
        return SigmoidHead(len(image_set.labels))
    return SoftmaxHead(len(image_set.labels))


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
