"""What `retrain.run` returns: the trained layer, its evaluation, the files written, timings.

`RunResult.metrics()` is the dict that `--metrics_json` holds, built from these fields alone.
Importing this module does not import TensorFlow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from retrain.config.presets import DEFAULT_PRESET
from retrain.utils.atomic import atomic_write_text

if TYPE_CHECKING:
    from retrain.heads.evaluation import Evaluation, MultiLabelEvaluation
    from retrain.training.fine_tune_loop import FineTuneResult
    from retrain.training.head import TrainResult


@dataclass(frozen=True)
class Mistake:
    """A misclassified image: its file, true and predicted label, and the predicted score."""

    path: str
    actual: str
    predicted: str
    score: float


@dataclass(frozen=True)
class Timings:
    """Seconds spent per phase of a run."""

    bottlenecks: float  # lookup, hashing, module loading, backend choice and extraction
    extraction: float  # of those, decoding, the module and cache writes only
    training: float  # the new layer
    total: float  # the whole run, scanning to the last output
    # Every phase of `run` in order (checks, scan, module, bottlenecks, training, ...);
    # what they leave of `total` is Python between them.
    phases: dict[str, float] = field(default_factory=dict)
    startup: float | None = None  # before `run` was called: the command's imports and flags

    def wall(self) -> float:
        """The whole process's time so far: start-up and the run."""
        return (self.startup or 0.0) + self.total

    def by_phase(self) -> dict[str, float]:
        """Seconds per phase, start-up first when known, rounded to ms; they add up to
        `wall()` but for "other", the time between phases."""
        phases = {"startup": self.startup} if self.startup is not None else {}
        phases.update(self.phases)
        phases["other"] = max(self.wall() - sum(phases.values()), 0.0)
        return {name: round(seconds, 3) for name, seconds in phases.items()}


@dataclass
class RunResult:
    """One run's outcome. `evaluations` maps a split ("testing") to the evaluation of the
    model that was exported: the fine-tuned network when fine-tuning ran. A multi-label run
    also has "validation", where its thresholds were chosen (evaluate.MultiLabelEvaluation:
    its `accuracy`, the exact-match ratio, is the metrics' test_accuracy)."""

    labels: list[str]
    head: TrainResult  # the new layer as trained on bottlenecks, with its history
    evaluations: dict[str, Evaluation | MultiLabelEvaluation]
    images: dict[str, int]  # usable images per split
    skipped: list[dict]  # {"file", "reason"} of every image left out
    module: str  # the module handle
    bottlenecks_computed: int  # by this process
    training_steps: int
    timings: Timings
    outputs: dict[str, str] = field(default_factory=dict)  # config setting -> path written
    fine_tune: FineTuneResult | None = None
    cluster: dict[str, Any] | None = None  # a multi-worker run: this worker and the cluster
    distortions: dict[str, Any] | None = None  # how training images were distorted, if at all
    extraction: dict[str, Any] | None = None  # which backend made the vectors, and why
    # What the figures say: retrain.reporting.health.Finding objects (health reads this module).
    health: list[Any] = field(default_factory=list)
    unlisted_images: int | None = None  # multi-label: image files the labels CSV does not list
    # Where the splits came from when not (only) the hash: split -> folder, and the log's line.
    split_folders: dict[str, str] | None = None
    split_note: str | None = None
    test_paths: list[str] = field(default_factory=list)  # the test evaluation's images, in order
    rate_search: Any = None  # retrain.training.lr_find.RateSearch, with --learning_rate auto
    # Each exported model run on the test split: retrain.export.check.ExportCheck objects.
    export_checks: list[Any] = field(default_factory=list)
    # {split: {"images": n, "positives": [per class (label)]}}: each label's share per split.
    split_counts: dict[str, dict] = field(default_factory=dict)
    preset: str = DEFAULT_PRESET  # what the run's settings started from (RetrainConfig.preset)

    @property
    def test(self) -> Evaluation | MultiLabelEvaluation | None:
        """The test split's evaluation, if there was a test split."""
        return self.evaluations.get("testing")

    def misclassified(self, limit: int | None = None) -> list[Mistake]:
        """The test images predicted wrong, the most confident mistakes first (at most
        `limit`); empty without a test evaluation or its image paths."""
        test = self.test
        if test is None or len(self.test_paths) != test.count:
            return []
        mistakes = [
            Mistake(self.test_paths[row], actual, predicted, score)
            for row, predicted, actual, score in test.mistakes(self.labels)
        ]
        mistakes.sort(key=lambda m: -m.score)
        return mistakes[:limit]

    def metrics(self) -> dict[str, Any]:
        """The run's figures, as `--metrics_json` writes them."""
        test, history = self.test, self.head.history
        metrics = {
            "test_accuracy": test.accuracy if test else None,
            "test_cross_entropy": test.cross_entropy if test else None,
            "per_class_test_accuracy": dict(zip(self.labels, test.per_class_accuracy))
            if test
            else None,
            "final_train_accuracy": history[-1]["train_accuracy"] if history else None,
            "final_validation_accuracy": history[-1].get("validation_accuracy")
            if history
            else None,
            "classes": list(self.labels),
            "images": dict(self.images),
            "skipped": list(self.skipped),
            "module": self.module,
            "preset": self.preset,
            "bottlenecks_computed": self.bottlenecks_computed,
            "bottleneck_seconds": round(self.timings.bottlenecks, 3),
            "bottleneck_images_per_second": _per_second(
                self.bottlenecks_computed, self.timings.bottlenecks
            ),
            "extraction_seconds": round(self.timings.extraction, 3),
            "extraction_images_per_second": _per_second(
                self.bottlenecks_computed, self.timings.extraction
            ),
            "training_steps": self.training_steps,
            "resumed_from_step": self.head.resumed_from_step,
            "training_seconds": round(self.timings.training, 3),
            "total_seconds": round(self.timings.total, 3),
            "wall_seconds": round(self.timings.wall(), 3),
            "phase_seconds": self.timings.by_phase(),
            "output_graph": self.outputs.get("output_graph"),
            "output_labels": self.outputs.get("output_labels"),
        }
        if test is not None:
            metrics["test_evaluation"] = test.report(self.labels)
        if "validation" in self.evaluations:
            metrics["validation_evaluation"] = self.evaluations["validation"].report(self.labels)
        if self.unlisted_images is not None:
            metrics["unlisted_images"] = self.unlisted_images
        metrics["splits_from"] = {
            "folders": self.split_folders,
            "note": self.split_note or "each file's split by the hash of its name",
        }
        if self.fine_tune is not None:
            metrics["fine_tune"] = self.fine_tune.metrics()
        if self.cluster is not None:
            metrics["cluster"] = dict(self.cluster)
        if self.distortions is not None:
            metrics["distortions"] = dict(self.distortions)
        if self.extraction is not None:
            metrics["extraction"] = dict(self.extraction)
        if self.rate_search is not None:
            metrics["lr_find"] = {"training": self.rate_search.metrics()}
        if self.export_checks:
            metrics["export_checks"] = [check.as_dict() for check in self.export_checks]
        if self.split_counts:
            metrics["label_summary"] = self.label_summary()
        metrics["health"] = [finding.as_dict() for finding in self.health]
        return metrics

    def label_summary(self) -> dict[str, dict[str, Any]]:
        """Per class (label): its images (positives) and share in each split, and its test
        figures: ROC AUC, AP (multi-label), threshold and F1 at it (None: undefined); {}
        without `split_counts`."""
        test = self.test.report(self.labels) if self.test is not None else {}
        per_label = test.get("per_class") or test.get("per_label") or {}
        summary = {}
        for j, name in enumerate(self.labels):
            row: dict[str, Any] = {}
            for split, counts in self.split_counts.items():
                positives = int(counts["positives"][j])
                row[f"{split}_positives"] = positives
                row[f"{split}_share"] = positives / counts["images"] if counts["images"] else None
            figures = per_label.get(name, {})
            for key in ("roc_auc", "average_precision", "threshold", "f1"):
                if key in figures:
                    row[key] = figures[key]
            if name in test.get("undefined_roc_auc", {}):
                row["undefined_because"] = f"{test['undefined_roc_auc'][name]} in testing"
            summary[name] = row
        return summary


def _per_second(count: int, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 and count else 0.0


def write_json(path: str, data: dict) -> None:
    """Write `data` (NumPy values included) as indented JSON to `path`, atomically: the
    `outputs.metrics_json` file of a run, an audit or a learning-rate search."""
    text = json.dumps(data, indent=2, default=_plain) + "\n"
    atomic_write_text(path, text, "metrics")


def _plain(value: Any) -> Any:
    """A NumPy scalar or array as the Python value json can write."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
