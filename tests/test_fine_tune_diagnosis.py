"""Why fine-tuning was thrown away (retrain.training.fine_tune_diagnosis), read from a run's
history, and the health finding that reports it (retrain.reporting.health)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from retrain.config import FineTuningConfig
from retrain.heads.evaluation import Evaluation
from retrain.reporting import health
from retrain.training.fine_tune_diagnosis import why_discarded
from retrain.training.fine_tune_loop import FineTuneResult
from retrain.training.lr_find import RateSearch

HEAD = Evaluation(0.85, 0.4, np.zeros(200, np.int64), [0.85], np.zeros(200, np.int64))


def _history(losses, accuracies, validation_losses):
    """Records every 10 steps: training loss, validation accuracy and loss."""
    return [
        {"step": 10 * (i + 1), "loss": loss, "validation_accuracy": a, "validation_loss": v}
        for i, (loss, a, v) in enumerate(zip(losses, accuracies, validation_losses, strict=True))
    ]


RISING = _history([0.5, 2.0, 9.0, 40.0, 80.0, 90.0], [0.6, 0.3] + [0.2] * 4, [3.0] * 6)
EXPLODED = _history([0.4, float("nan"), float("nan")], [0.85, 0.2, 0.2], [0.4, 9.0, 9.0])
OVERFIT = _history(
    [0.35, 0.3, 0.2, 0.1, 0.05, 0.02], [0.85, 0.84, 0.8, 0.78, 0.77, 0.76], [0.6] * 6
)
# Training loss falling, validation two points down (within noise at N=200), its loss falling.
WITHIN = _history([0.15, 0.1, 0.06], [0.82, 0.78, 0.83], [0.39, 0.38, 0.36])
FLAT = _history([0.4, 0.39, 0.4, 0.38, 0.39, 0.4], [0.85, 0.86, 0.85, 0.84, 0.86, 0.85], [0.4] * 6)


@pytest.mark.parametrize(
    "history, cause",
    [
        (RISING, "rate_too_high"),
        (EXPLODED, "rate_too_high"),
        (OVERFIT, "overfitting"),
        (FLAT, "validation_flat"),
        (WITHIN, "validation_flat"),
        ([], "validation_flat"),
    ],
)
def test_the_cause_is_read_from_the_history(history, cause):
    assert why_discarded(history, HEAD, 0.01).cause == cause


def test_rate_too_high_says_what_the_loss_did_and_suggests_a_rate():
    rising = why_discarded(RISING, HEAD, 1.0)
    assert "went from 1.25 to 85 " in rising.message and "learning rate of 1" in rising.message
    assert "too high" in rising.message and rising.numbers["learning_rate"] == 1.0
    assert "tenfold, to 0.1" in rising.suggestion and "auto" in rising.suggestion
    assert "NaN" not in rising.message
    exploded = why_discarded(EXPLODED, HEAD, 1.0)
    assert "became nan at step 20" in exploded.message
    # With the finder's suggestion: it is named; when the run used it, a tenth is suggested.
    assert "finder suggested 0.003" in why_discarded(RISING, HEAD, 1.0, 0.003).suggestion
    assert "try a tenth of it (0.0003)" in why_discarded(RISING, HEAD, 0.003, 0.003).suggestion


def test_overfitting_and_flat_validation_name_their_remedies():
    overfit = why_discarded(OVERFIT, HEAD, 0.01)
    assert "training loss fell" in overfit.message and "overfit" in overfit.message
    assert "fine_tuning.steps" in overfit.suggestion
    flat = why_discarded(FLAT, HEAD, 0.0001)
    assert "within noise" in flat.message and "84.0%-86.0% vs 85.0% at N=200" in flat.message
    assert "fine_tuning.steps" in flat.suggestion and "validation_percentage" in flat.suggestion


def _tuned(history, best_step, rate=1.0, search=None):
    result = FineTuneResult(
        module_object=None,
        weights=np.zeros((2, 2)),
        biases=np.zeros(2),
        input_size=(224, 224),
        settings=FineTuningConfig(steps=60, learning_rate=rate),
        replicas=1,
        seconds=1.0,
        steps_per_second=60.0,
        history=history,
        before=HEAD,
        after=HEAD,
        best_step=best_step,
        validation_before=HEAD,
        validation_best=HEAD,
    )
    result.rate_search = search
    return result


def test_health_warns_when_fine_tuning_was_thrown_away_and_says_why():
    search = RateSearch([1e-4, 1e-3], [0.5, 0.4], [0.5, 0.4], 0.002, 1.0)
    tuned = _tuned(RISING, 0, rate=0.002, search=search)
    (finding,) = health._fine_tuning(SimpleNamespace(fine_tune=tuned))
    assert finding.code == "fine_tuning_discarded" and finding.severity == "warning"
    assert finding.numbers["cause"] == "rate_too_high" and "0.0002" in finding.suggestion
    metrics = tuned.metrics()
    assert metrics["discarded"]["cause"] == "rate_too_high" and metrics["kept"] == "head alone"
    # A kept fine-tuned step, or no validation to judge by: nothing to explain.
    assert health._fine_tuning(SimpleNamespace(fine_tune=_tuned(RISING, 30))) == []
    unguarded = _tuned(RISING, None)
    assert unguarded.discarded is None and unguarded.metrics()["discarded"] is None
