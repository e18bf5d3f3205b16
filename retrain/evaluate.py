"""Measuring a trained layer: accuracy with its interval, cross-entropy, per-class precision,
recall, F1 and ROC AUC, the confusion matrix, and which images it gets wrong."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def predict_probabilities(weights: np.ndarray, biases: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Class probabilities [n, classes] of the softmax layer on features x [n, dim]."""
    return softmax(x.astype(np.float64) @ weights + biases)


@dataclass
class Evaluation:
    """One split's evaluation: accuracy and cross-entropy, with every image's label, predicted
    class and class probabilities, from which the per-class figures are derived."""

    accuracy: float
    cross_entropy: float
    predictions: np.ndarray  # [n] predicted class
    per_class_accuracy: list[float | None]  # recall of each class (None: no image of it)
    labels: np.ndarray | None = None  # [n] true class
    probabilities: np.ndarray | None = None  # [n, classes]

    @property
    def count(self) -> int:
        return len(self.predictions)

    def confusion_matrix(self) -> np.ndarray:
        """int64 [classes, classes]: row = true class, column = predicted class."""
        k = len(self.per_class_accuracy)
        return np.bincount(self.labels * k + self.predictions, minlength=k * k).reshape(k, k)

    def report(self, names: list[str]) -> dict:
        """The split's figures for --metrics_json: N, accuracy with its 95% Wilson interval,
        top-5 accuracy (more than 5 classes), the confusion matrix, and per class precision,
        recall, F1, support and one-vs-rest ROC AUC with their macro means."""
        confusion = self.confusion_matrix()
        support = confusion.sum(axis=1)
        predicted = confusion.sum(axis=0)
        hits = np.diag(confusion)
        per_class = {}
        for i, name in enumerate(names):
            # A class never predicted has precision 0 (as scikit-learn counts it); a class
            # without test images has no recall, and no F1.
            precision = float(hits[i] / predicted[i]) if predicted[i] else 0.0
            recall = float(hits[i] / support[i]) if support[i] else None
            f1 = None
            if recall is not None:
                f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            per_class[name] = {
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "support": int(support[i]),
                "roc_auc": roc_auc(self.probabilities[:, i], self.labels == i),
            }
        report = {
            "n": self.count,
            "accuracy": self.accuracy,
            "accuracy_interval_95": list(wilson_interval(int(hits.sum()), self.count)),
            "per_class": per_class,
            "macro_f1": _mean(v["f1"] for v in per_class.values()),
            "macro_roc_auc": _mean(v["roc_auc"] for v in per_class.values()),
            "confusion_matrix": confusion.tolist(),
        }
        if len(names) > 5:
            report["top5_accuracy"] = top_k_accuracy(self.probabilities, self.labels, 5)
        return report


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for the boolean `positive` (the Mann-Whitney U
    statistic, ties counted half); None without a positive or a negative."""
    positives = int(np.count_nonzero(positive))
    negatives = len(positive) - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = _average_ranks(np.asarray(scores, np.float64))
    u = ranks[positive].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def top_k_accuracy(probabilities: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of images whose true class is among the `k` most probable."""
    if not len(labels):
        return 0.0
    top = np.argpartition(-probabilities, min(k, probabilities.shape[1]) - 1, axis=1)[:, :k]
    return float(np.mean((top == labels[:, None]).any(axis=1)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    return ranks


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def evaluate(
    weights: np.ndarray, biases: np.ndarray, x: np.ndarray, y: np.ndarray, num_classes: int
) -> Evaluation:
    """Evaluate the layer on all of (x, y)."""
    return evaluate_chunks(weights, biases, [(x, y)], num_classes)


def evaluate_chunks(
    weights: np.ndarray,
    biases: np.ndarray,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
) -> Evaluation:
    """Evaluate the layer on a split given as consecutive (x, y) pieces (any size of split)."""
    probabilities, labels = [], []
    for x, y in chunks:
        probabilities.append(predict_probabilities(weights, biases, x).astype(np.float32))
        labels.append(np.asarray(y, np.int64))
    p = np.concatenate(probabilities) if probabilities else np.zeros((0, num_classes), np.float32)
    y_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    predictions = p.argmax(axis=1)
    n = len(y_all)
    picked = p[np.arange(n), y_all].astype(np.float64)
    cross_entropy = float(-np.mean(np.log(np.maximum(picked, 1e-12)))) if n else 0.0
    accuracy = float(np.mean(predictions == y_all)) if n else 0.0
    per_class = []
    for label in range(num_classes):
        mask = y_all == label
        per_class.append(float(np.mean(predictions[mask] == label)) if mask.any() else None)
    return Evaluation(accuracy, cross_entropy, predictions, per_class, y_all, p)
