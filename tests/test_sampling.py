"""Imbalanced classes: class-balanced draws (retrain.py's) and balanced class weights."""

from __future__ import annotations

import numpy as np
import pytest

from retrain.bottlenecks.splits import Split
from retrain.config import HeadTrainingConfig
from retrain.data import sampling
from retrain.heads.head import SoftmaxHead
from retrain.training.head import train_head


def test_class_balanced_draws_each_class_equally_often():
    classes = np.array([0] * 90 + [1] * 9 + [2] * 1)
    cdf = sampling.draw_cdf(classes, 3, "class_balanced")
    picks = sampling.draw(np.random.default_rng(0), len(classes), 30_000, cdf)
    shares = np.bincount(classes[picks], minlength=3) / len(picks)
    np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.02)
    assert sampling.draw_cdf(classes, 3, "uniform") is None
    uniform = sampling.draw(np.random.default_rng(0), len(classes), 30_000, None)
    assert np.bincount(classes[uniform], minlength=3)[2] / 30_000 < 0.02


@pytest.mark.parametrize("classes", [[0] * 90 + [1] * 9 + [2] * 1, [0, 1], [3] * 5 + [0] * 2])
def test_the_alias_table_draws_each_example_as_the_cdf_says(classes):
    classes = np.array(classes)
    cdf = sampling.draw_cdf(classes, 4, "class_balanced")
    keep, alias = sampling.alias_table(cdf)
    n = len(classes)
    implied = keep.astype(np.float64) + np.bincount(alias, weights=1.0 - keep, minlength=n)
    np.testing.assert_allclose(implied / n, np.diff(cdf, prepend=0.0), atol=1e-6)


def test_balanced_weights_mean_one_and_spare_absent_classes():
    classes = np.array([0] * 6 + [1] * 2)
    weights = sampling.class_weights(classes, 3, "balanced")
    np.testing.assert_allclose(weights, [8 / 12, 8 / 4, 0.0])
    assert np.mean(weights[classes]) == pytest.approx(1.0)
    assert sampling.class_weights(classes, 3, "none") is None


def imbalanced(rng, n_major=400, n_minor=20):
    """Two overlapping Gaussian classes, the second 20 times rarer."""
    y = np.array([0] * n_major + [1] * n_minor)
    x = rng.normal(size=(len(y), 8)).astype(np.float32)
    x[y == 1, 0] += 1.5
    return x, y


@pytest.mark.parametrize(
    "options",
    [
        {"sampling": "class_balanced"},
        {},  # auto: class_balanced for class indices
        {"sampling": "uniform", "class_weights": "balanced"},
    ],
)
def test_minority_recall_rises(options):
    rng = np.random.default_rng(0)
    x, y = imbalanced(rng)
    test_x, test_y = imbalanced(rng)
    head = SoftmaxHead(2)

    def minority_recall(**extra):
        settings = HeadTrainingConfig(how_many_training_steps=300, learning_rate=0.1, **extra)
        result = train_head(Split(x, y), None, head, settings)
        evaluation = head.evaluate(result.weights, result.biases, [(test_x, test_y)])
        return evaluation.per_class_accuracy[1]

    assert minority_recall(**options) > minority_recall(sampling="uniform") + 0.3
