"""Measuring a trained layer: accuracy with its interval, cross-entropy, per-class precision,
recall, F1 and ROC AUC, the confusion matrix, and which images it gets wrong.

`Evaluation` is a single-label (softmax) layer's; `MultiLabelEvaluation` a multi-label (sigmoid)
layer's, where each label is a yes/no decision at its own threshold (chosen on the validation
split by `choose_thresholds`). Both offer `report` (for --metrics_json), `summary_lines` (for the
log), `mistakes` (for --print_misclassified_test_images) and `scalars` (for TensorBoard).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

WORST_LABELS_SHOWN = 5  # per-label lines in a multi-label evaluation's log summary


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

    @property
    def hits(self) -> np.ndarray:
        """bool [n]: whether each image's predicted class is its true class."""
        return self.predictions == self.labels

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
            "macro_roc_auc_classes": _covered(v["roc_auc"] for v in per_class.values()),
            "undefined_roc_auc": undefined_auc(
                self.labels[:, None] == np.arange(len(names)), names
            ),
            "confusion_matrix": confusion.tolist(),
        }
        if len(names) > 5:
            report["top5_accuracy"] = top_k_accuracy(self.probabilities, self.labels, 5)
        return report

    def summary_lines(self, names: list[str], split: str = "test") -> list[str]:
        """The log's lines: the accuracy's interval, macro F1 and ROC AUC, the weakest classes."""
        report = self.report(names)
        low, high = report["accuracy_interval_95"]
        auc = report["macro_roc_auc"]
        lowest = lowest_recalls(report["per_class"])
        worst = ", ".join(f"{name} {100 * recall:.0f}%" for name, recall, _ in lowest)
        covered = _coverage(report["macro_roc_auc_classes"], len(names), "classes")
        return [
            f"{split.capitalize()} accuracy 95% interval {100 * low:.1f}%-{100 * high:.1f}% "
            f"(N={report['n']}); macro F1 {report['macro_f1'] or 0.0:.3f}, macro ROC AUC "
            + ("n/a" if auc is None else f"{auc:.3f}")
            + covered,
            f"Lowest recall: {worst}",
            *_undefined_lines(report["undefined_roc_auc"], split),
        ]

    def mistakes(self, names: list[str]) -> Iterator[tuple[int, str, str, float]]:
        """(row, predicted class, true class, its probability) of every image predicted wrong."""
        scores = self.probabilities.max(axis=1)
        for i in np.flatnonzero(self.predictions != self.labels):
            yield int(i), names[self.predictions[i]], names[self.labels[i]], float(scores[i])

    def scalars(self, names: list[str]) -> dict[str, float]:
        """Figures for TensorBoard beyond training's: none, so a single-label run's logs stay
        retrain.py's."""
        return {}


def lowest_recalls(per_class: dict[str, dict], count: int = 3) -> list[tuple[str, float, int]]:
    """(name, recall, support) of the `count` classes (or labels) of a report's per-class
    figures with the lowest recall, lowest first; those without test images are left out."""
    recalls = sorted(
        (v["recall"], name, v["support"]) for name, v in per_class.items() if v["support"]
    )
    return [(name, recall, support) for recall, name, support in recalls[:count]]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval holds p; saying so keeps rounding from putting 1.0 above it at p = 1.
    return float(max(0.0, min(p, centre - half))), float(min(1.0, max(p, centre + half)))


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


def _covered(values) -> int:
    """How many of `values` a macro mean takes in: those that are defined."""
    return sum(v is not None for v in values)


def undefined_auc(truth: np.ndarray, names: list[str]) -> dict[str, str]:
    """{name: "no positives" or "no negatives"} of the classes (labels) of the boolean
    `truth` [n, labels] whose ROC AUC (and average precision) is undefined on these images;
    {} without images, where nothing is measured at all."""
    if not len(truth):
        return {}
    positives = truth.sum(axis=0)
    undefined = {}
    for j, name in enumerate(names):
        if positives[j] == 0:
            undefined[name] = "no positives"
        elif positives[j] == len(truth):
            undefined[name] = "no negatives"
    return undefined


def _coverage(covered: int, total: int, kind: str) -> str:
    """ " (over 17 of 19 labels)" where a macro mean leaves some out, else ""."""
    return f" (over {covered} of {total} {kind})" if covered < total else ""


def _undefined_lines(undefined: dict[str, str], split: str) -> list[str]:
    """One log line naming the classes (labels) without an AUC on `split`, if any."""
    if not undefined:
        return []
    named = ", ".join(f"{name} ({why})" for name, why in undefined.items())
    return [f"ROC AUC and AP undefined on {split}, left out of the means: {named}"]


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


# ----------------------------------------------------------------------------- multi-label


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function, without overflow."""
    return np.exp(-np.logaddexp(0.0, -logits))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the precision-recall curve as scikit-learn's average_precision_score sums
    it: the precision at each distinct score, weighted by the recall it adds (tied scores are
    one step); None without a positive."""
    positives = int(np.count_nonzero(positive))
    if positives == 0:
        return None
    hits, ranks = _cumulative_hits(scores, positive)
    precision, recall = hits / ranks, hits / positives
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The threshold t (scores >= t are positive) with the highest F1 on (scores, positive),
    halfway between the last score taken and the next; 0.5 without a positive. Of equal F1s,
    the highest threshold wins."""
    positives = int(np.count_nonzero(positive))
    if positives == 0:
        return 0.5
    hits, ranks = _cumulative_hits(scores, positive)
    best = int(np.argmax(2 * hits / (ranks + positives)))
    ordered = np.sort(np.asarray(scores, np.float64))[::-1]
    taken = int(ranks[best])
    if taken == len(ordered):
        return float(ordered[-1])
    return float((ordered[taken - 1] + ordered[taken]) / 2)


def choose_thresholds(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float64 [labels]: each label's `best_f1_threshold` on (probabilities, labels) [n, labels]."""
    return np.array(
        [best_f1_threshold(probabilities[:, j], labels[:, j] > 0) for j in range(labels.shape[1])]
    )


def _cumulative_hits(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each distinct score, highest first: positives and images at or above it."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    ordered = np.asarray(scores)[order]
    hits = np.cumsum(np.asarray(positive, bool)[order])
    last_of_tie = np.r_[ordered[1:] != ordered[:-1], True]
    return hits[last_of_tie].astype(np.float64), np.flatnonzero(last_of_tie) + 1.0


def _tag(name: str) -> str:
    """A label as a TensorBoard tag part."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name)


@dataclass
class MultiLabelEvaluation:
    """One split's evaluation of a multi-label layer: every image's label probabilities and
    true 0/1 labels, and the thresholds that turn the probabilities into decisions.

    `accuracy` is the exact-match ratio (images whose every label is decided right), which is
    what `test_accuracy` and --assert_accuracy_at_least mean for a multi-label run;
    `per_class_accuracy` is each label's share of right decisions; `cross_entropy` the mean
    over images of the summed sigmoid cross-entropy of their labels.
    """

    cross_entropy: float
    probabilities: np.ndarray  # float32 [n, labels]
    labels: np.ndarray  # uint8 [n, labels], 1 where the label applies
    thresholds: np.ndarray = field(default=None)  # float64 [labels]; None: 0.5 each

    def __post_init__(self):
        if self.thresholds is None:
            self.thresholds = np.full(self.labels.shape[1], 0.5)
        self.thresholds = np.asarray(self.thresholds, np.float64)

    @property
    def count(self) -> int:
        return len(self.labels)

    @property
    def predictions(self) -> np.ndarray:
        """bool [n, labels]: probability >= the label's threshold."""
        return self.probabilities >= self.thresholds

    @property
    def accuracy(self) -> float:
        """The exact-match ratio."""
        return float(np.mean(self._right().all(axis=1))) if self.count else 0.0

    @property
    def hits(self) -> np.ndarray:
        """bool [n]: whether each image's every label is decided right (the exact match)."""
        return self._right().all(axis=1)

    @property
    def per_class_accuracy(self) -> list[float | None]:
        """Per label, the share of images whose decision for it is right (None: no images)."""
        if not self.count:
            return [None] * self.labels.shape[1]
        return [float(v) for v in self._right().mean(axis=0)]

    def _right(self) -> np.ndarray:
        return self.predictions == (self.labels > 0)

    def report(self, names: list[str]) -> dict:
        """The split's figures for --metrics_json: N, the exact-match ratio (also as `accuracy`,
        with its 95% Wilson interval), per label precision, recall, F1 (at its threshold),
        support, ROC AUC and average precision, and macro F1, micro F1, mean ROC AUC and mean
        average precision."""
        truth, predicted = self.labels > 0, self.predictions
        tp = (truth & predicted).sum(axis=0)
        fp = (~truth & predicted).sum(axis=0)
        fn = (truth & ~predicted).sum(axis=0)
        per_label = {}
        for j, name in enumerate(names):
            precision = float(tp[j] / (tp[j] + fp[j])) if tp[j] + fp[j] else 0.0
            recall = float(tp[j] / (tp[j] + fn[j])) if tp[j] + fn[j] else None
            f1 = None
            if recall is not None:
                f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            per_label[name] = {
                "threshold": float(self.thresholds[j]),
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "support": int(tp[j] + fn[j]),
                "roc_auc": roc_auc(self.probabilities[:, j], truth[:, j]),
                "average_precision": average_precision(self.probabilities[:, j], truth[:, j]),
            }
        undefined = undefined_auc(truth, names)
        for name in undefined:  # without negatives, AP is 1 whatever the scores: no figure
            per_label[name]["average_precision"] = None
        errors = int(fp.sum() + fn.sum())
        exact = int(self._right().all(axis=1).sum())
        return {
            "n": self.count,
            "exact_match": self.accuracy,
            "accuracy": self.accuracy,
            "accuracy_interval_95": list(wilson_interval(exact, self.count)),
            "cross_entropy": self.cross_entropy,
            "per_label": per_label,
            "macro_f1": _mean(v["f1"] for v in per_label.values()),
            "micro_f1": float(2 * tp.sum() / (2 * tp.sum() + errors)) if tp.sum() else 0.0,
            "mean_roc_auc": _mean(v["roc_auc"] for v in per_label.values()),
            "mean_average_precision": _mean(v["average_precision"] for v in per_label.values()),
            "mean_roc_auc_labels": _covered(v["roc_auc"] for v in per_label.values()),
            "mean_average_precision_labels": _covered(
                v["average_precision"] for v in per_label.values()
            ),
            "undefined_roc_auc": undefined,
        }

    def summary_lines(self, names: list[str], split: str = "test") -> list[str]:
        """The log's lines: exact match with its interval, the F1s and mean ROC AUC (with how
        many labels it covers), the labels without an AUC, then one line for each of the
        WORST_LABELS_SHOWN labels of lowest ROC AUC (the metrics JSON has them all)."""
        report = self.report(names)
        low, high = report["accuracy_interval_95"]
        covered = _coverage(report["mean_roc_auc_labels"], len(names), "labels")
        lines = [
            f"{split.capitalize()} exact match {100 * report['exact_match']:.1f}% "
            f"(95% interval {100 * low:.1f}%-{100 * high:.1f}%, N={report['n']}); "
            f"macro F1 {_show(report['macro_f1'])}, micro F1 {_show(report['micro_f1'])}, "
            f"mean ROC AUC {_show(report['mean_roc_auc'])}{covered}",
            *_undefined_lines(report["undefined_roc_auc"], split),
        ]
        worst = worst_labels(report["per_label"], WORST_LABELS_SHOWN)
        if len(worst) < len(names):
            lines.append(f"The {len(worst)} labels of lowest ROC AUC of {len(names)}:")
        for name in worst:
            v = report["per_label"][name]
            lines.append(
                f"  {name}: threshold {v['threshold']:.3f}, precision {_show(v['precision'])}, "
                f"recall {_show(v['recall'])}, F1 {_show(v['f1'])}, ROC AUC "
                f"{_show(v['roc_auc'])}, AP {_show(v['average_precision'])} (N+={v['support']})"
            )
        return lines

    def mistakes(self, names: list[str]) -> Iterator[tuple[int, str, str, float]]:
        """(row, labels predicted, true labels, highest probability) of every image with a
        wrong decision; labels joined by ';', '(none)' for none."""
        predicted, truth = self.predictions, self.labels > 0
        scores = self.probabilities.max(axis=1)
        for i in np.flatnonzero(~self._right().all(axis=1)):
            yield int(i), _joined(names, predicted[i]), _joined(names, truth[i]), float(scores[i])

    def scalars(self, names: list[str]) -> dict[str, float]:
        """The report's figures as TensorBoard tags: exact_match, macro_f1, micro_f1,
        mean_roc_auc, mean_average_precision, and per label f1/, roc_auc/,
        average_precision/ and threshold/<label>."""
        report = self.report(names)
        keys = ("exact_match", "macro_f1", "micro_f1", "mean_roc_auc", "mean_average_precision")
        scalars = {key: report[key] for key in keys}
        for name, v in report["per_label"].items():
            for key in ("f1", "roc_auc", "average_precision", "threshold"):
                scalars[f"{key}/{_tag(name)}"] = v[key]
        return {tag: float(value) for tag, value in scalars.items() if value is not None}


def worst_labels(per_label: dict[str, dict], count: int) -> list[str]:
    """The `count` labels of a report's per-label figures with the lowest ROC AUC (then the
    lowest F1), lowest first; labels without an AUC come after those with one."""

    def key(name: str) -> tuple:
        v = per_label[name]
        auc, f1 = v["roc_auc"], v["f1"]
        return (auc is None, auc or 0.0, f1 is None, f1 or 0.0, name)

    return sorted(per_label, key=key)[:count]


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _joined(names: list[str], on: np.ndarray) -> str:
    return ";".join(name for name, yes in zip(names, on) if yes) or "(none)"


def evaluate_multilabel_chunks(
    weights: np.ndarray,
    biases: np.ndarray,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    num_labels: int,
    thresholds: np.ndarray | None = None,
) -> MultiLabelEvaluation:
    """Evaluate a sigmoid layer on a split given as consecutive (x, 0/1 labels [n, labels])
    pieces, deciding at `thresholds` (None: 0.5 for every label)."""
    empty = np.zeros((0, num_labels))
    probabilities, labels, losses = [empty.astype(np.float32)], [empty.astype(np.uint8)], [empty]
    for x, y in chunks:
        logits = x.astype(np.float64) @ weights + biases
        y = np.asarray(y).astype(np.uint8)
        probabilities.append(sigmoid(logits).astype(np.float32))
        labels.append(y)
        losses.append(np.logaddexp(0.0, logits) - y * logits)
    loss = np.concatenate(losses).sum(axis=1)
    return MultiLabelEvaluation(
        float(loss.mean()) if len(loss) else 0.0,
        np.concatenate(probabilities),
        np.concatenate(labels),
        thresholds,
    )
