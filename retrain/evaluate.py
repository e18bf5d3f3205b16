"""Measuring a trained layer: accuracy, cross-entropy and which images it gets wrong."""

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
    """Accuracy and cross-entropy of one split, with the per-image predictions."""

    accuracy: float
    cross_entropy: float
    predictions: np.ndarray
    per_class_accuracy: list[float | None]

    @property
    def count(self) -> int:
        return len(self.predictions)


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
    predictions, picked, labels = [], [], []
    for x, y in chunks:
        probabilities = predict_probabilities(weights, biases, x)
        predictions.append(probabilities.argmax(axis=1))
        picked.append(probabilities[np.arange(len(y)), y])
        labels.append(y)
    predictions_all = np.concatenate(predictions) if predictions else np.zeros(0, np.int64)
    picked_all = np.concatenate(picked) if picked else np.zeros(0)
    y_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    n = len(y_all)
    cross_entropy = float(-np.mean(np.log(np.maximum(picked_all, 1e-12)))) if n else 0.0
    accuracy = float(np.mean(predictions_all == y_all)) if n else 0.0
    per_class = []
    for label in range(num_classes):
        mask = y_all == label
        per_class.append(float(np.mean(predictions_all[mask] == label)) if mask.any() else None)
    return Evaluation(accuracy, cross_entropy, predictions_all, per_class)
