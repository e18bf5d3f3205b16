"""The evaluation stage on cached vectors: the trained layer judged on the test split (all of
it, or the configured random subset) and tuned and judged on the validation split, each logged
as retrain.py did."""

from __future__ import annotations

import logging

from retrain.bottlenecks.splits import FeatureSplit
from retrain.bottlenecks.stage import Bottlenecks
from retrain.config import RetrainConfig
from retrain.data import scan
from retrain.data.sampling import random_picks
from retrain.heads.head import AnyEvaluation
from retrain.training.head import TrainResult

log = logging.getLogger("retrain")


def testing_split(config: RetrainConfig, b: Bottlenecks) -> tuple[FeatureSplit, scan.PathList]:
    """The test split as evaluated (all of it, or its configured random subset: the same draw
    as fine-tuning's), with its image files in the same order."""
    test, paths = b.split("testing"), b.paths_of("testing")
    size = config.evaluation.test_batch_size
    if 0 < size < len(test):
        picks = random_picks(len(test), size, config.training.random_seed)
        test = FeatureSplit(test.cache, test.locations[picks], test.y[picks])
        paths = paths.take(picks)
    return test, paths


def evaluate_test(
    test: FeatureSplit, trained: TrainResult, labels: list[str]
) -> dict[str, AnyEvaluation]:
    """{"testing": the trained layer's evaluation on `test`}, logged; {} without test images."""
    if not len(test):
        return {}
    result = trained.head.evaluate(
        trained.weights, trained.biases, ((c.x, c.y) for c in test.chunks())
    )
    log.info("Final test accuracy = %.1f%% (N=%d)", 100 * result.accuracy, len(test))
    log_evaluation(result, labels)
    return {"testing": result}


def log_evaluation(result: AnyEvaluation, labels: list[str], split: str = "test") -> None:
    """The evaluation's summary (see heads.evaluation.Evaluation.summary_lines)."""
    for line in result.summary_lines(labels, split):
        log.info("%s", line)


def calibrate(b: Bottlenecks, trained: TrainResult, labels: list[str]) -> dict[str, AnyEvaluation]:
    """Let the trained head tune its decisions on the validation split (a sigmoid head's
    thresholds; `trained.head` becomes the tuned head), and evaluate it there. Returns
    {"validation": its evaluation}, logged, or {} without validation images."""
    validation = b.split("validation")
    if not len(validation):
        return {}
    trained.head, validated = trained.head.calibrate(
        trained.weights, trained.biases, ((c.x, c.y) for c in validation.chunks())
    )
    if validated is None:
        validated = trained.head.evaluate(
            trained.weights, trained.biases, ((c.x, c.y) for c in validation.chunks())
        )
    log_evaluation(validated, labels, "validation")
    return {"validation": validated}
