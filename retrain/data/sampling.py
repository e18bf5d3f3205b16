"""Imbalanced classes: which training examples a batch draws, and how much each one weighs.

`uniform` draws every example equally often, so a class with few images is seen rarely.
`class_balanced` is retrain.py's way: a class uniformly, then one of its images, so every class
is seen equally often. `balanced` class weights scale each example's loss by
n / (classes * n_class) instead (scikit-learn's and Keras' "balanced"), which keeps the draw
uniform. Both take class indices (the softmax head's labels).
"""

from __future__ import annotations

import numpy as np


def class_counts(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Examples per class, [num_classes]."""
    return np.bincount(np.asarray(classes, np.int64), minlength=num_classes)


def draw_cdf(classes: np.ndarray, num_classes: int, sampling: str) -> np.ndarray | None:
    """The cumulative drawing probability of each example (float64 [n], ending at 1) for
    `sampling` ("class_balanced" or "uniform"), or None for uniform draws."""
    if sampling == "uniform":
        return None
    counts = class_counts(classes, num_classes)
    present = np.count_nonzero(counts)
    weights = 1.0 / (present * counts[np.asarray(classes, np.int64)])
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def draw(rng: np.random.Generator, n: int, size: int, cdf: np.ndarray | None) -> np.ndarray:
    """`size` example indices in [0, n), with replacement, uniformly or by `cdf`."""
    if cdf is None:
        return rng.integers(0, n, size)
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), n - 1)


def alias_table(cdf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table of the distribution whose cumulative probabilities are `cdf`:
    (keep [n] float32, alias [n] int32). Draw index i uniformly and u in [0, 1): the example
    is i if u < keep[i], else alias[i]; two lookups a draw, where a search of the cdf is
    log(n) steps (and XLA on a CPU compares against all n)."""
    n = len(cdf)
    scaled = np.diff(cdf, prepend=0.0) * n
    keep, alias = np.ones(n), np.arange(n)
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        low, high = small.pop(), large.pop()
        keep[low], alias[low] = scaled[low], high
        scaled[high] -= 1.0 - scaled[low]
        (small if scaled[high] < 1.0 else large).append(high)
    return keep.astype(np.float32), alias.astype(np.int32)


def class_weights(classes: np.ndarray, num_classes: int, mode: str) -> np.ndarray | None:
    """float32 [num_classes] loss weight of each class for `mode` (config.CLASS_WEIGHTS):
    n / (classes present * n_class) for "balanced" (0 for a class without examples), None for
    "none"."""
    if mode == "none":
        return None
    counts = class_counts(classes, num_classes)
    present = np.count_nonzero(counts)
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, len(classes) / (present * counts), 0.0)
    return weights.astype(np.float32)


def random_picks(n: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of `count` of `n` rows drawn at random without replacement (seeded), or
    of all of them when count >= n: the one subset rule of every split."""
    if count >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False))
