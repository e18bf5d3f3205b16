"""Measuring a trained layer: accuracy, cross-entropy and which images it gets wrong."""

from __future__ import annotations

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
    probabilities = predict_probabilities(weights, biases, x)
    predictions = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(y)), y]
    cross_entropy = float(-np.mean(np.log(np.maximum(picked, 1e-12)))) if len(y) else 0.0
    accuracy = float(np.mean(predictions == y)) if len(y) else 0.0
    per_class = []
    for label in range(num_classes):
        mask = y == label
        per_class.append(float(np.mean(predictions[mask] == label)) if mask.any() else None)
    return Evaluation(accuracy, cross_entropy, predictions, per_class)
