"""The training-health report: each finding on figures built to trigger it, none on a healthy
run, and a diverging loss that stops training at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrain.bottlenecks.splits import Split
from retrain.config import FineTuningConfig, HeadTrainingConfig
from retrain.heads.evaluation import evaluate_chunks
from retrain.heads.head import SigmoidHead, SoftmaxHead
from retrain.reporting.health import diagnose
from retrain.results import RunResult, Timings
from retrain.training.head import TrainingDiverged, TrainResult, train_head

LABELS = ["a", "b", "c", "d"]


def history(
    steps=40, loss=(1.4, 0.3), train=(0.5, 0.95), val=(0.5, 0.9), ratio=1e-3, val_loss=(1.4, 0.5)
):
    rows = []
    for i in range(steps):
        t = i / (steps - 1)
        rows.append(
            {
                "step": 10 * (i + 1),
                "cross_entropy": loss[0] + t * (loss[1] - loss[0]),
                "train_accuracy": train[0] + t * (train[1] - train[0]),
                "validation_accuracy": val[0] + t * (val[1] - val[0]),
                "validation_cross_entropy": val_loss[0] + t * (val_loss[1] - val_loss[0]),
                "update_ratio": ratio,
            }
        )
    return rows


def evaluation(accuracy: float, n: int = 200, confuse=None):
    """An evaluation of `n` images of 4 classes, right on `accuracy` of them (mistakes spread,
    or all as `confuse` = (true, predicted))."""
    labels = np.arange(n) % 4
    predicted = labels.copy()
    wrong = np.arange(int(round((1 - accuracy) * n)))
    if confuse:
        wrong = np.flatnonzero(labels == confuse[0])[: len(wrong)]
        predicted[wrong] = confuse[1]
    else:
        predicted[wrong] = (labels[wrong] + 1) % 4
    logits = np.eye(4)[predicted] * 5
    return evaluate_chunks(np.eye(4), np.zeros(4), [(logits, labels)], 4)


def result(hist=None, test=None, fine_tune=None) -> RunResult:
    head = TrainResult(SoftmaxHead(4), np.ones((8, 4)), np.zeros(4), 1.0, hist or history())
    return RunResult(
        labels=LABELS,
        head=head,
        evaluations={"testing": test or evaluation(0.9)},
        images={"training": 400, "validation": 50, "testing": 50},
        skipped=[],
        module="m",
        bottlenecks_computed=0,
        training_steps=400,
        timings=Timings(1, 1, 1, 1),
        fine_tune=fine_tune,
    )


HEALTHY_COUNTS = np.array([100, 90, 120, 80])


def codes(run: RunResult, counts=HEALTHY_COUNTS, duplicates=0) -> set[str]:
    return {f.code for f in diagnose(run, counts, duplicates, 0.01) if f.severity == "warning"}


def test_a_healthy_run_has_no_warning():
    assert codes(result()) == set()


@pytest.mark.parametrize(
    ("run", "code"),
    [
        (result(test=evaluation(0.3)), "accuracy_near_chance"),
        (result(history(loss=(1.4, 1.35))), "loss_not_decreasing"),
        (result(history(loss=(1.4, 9.0))), "loss_diverging"),
        (result(history(ratio=1e-8)), "weights_barely_moving"),
        (result(history(ratio=0.5)), "weights_moving_too_much"),
        (result(history(train=(0.5, 1.0), val=(0.4, 0.5))), "overfitting"),
        (result(history(loss=(1.4, 0.01), val_loss=(1.4, 40.0))), "overconfident"),
    ],
)
def test_each_finding_on_figures_built_for_it(run, code):
    findings = diagnose(run, HEALTHY_COUNTS, 0, 0.01)
    assert code in {f.code for f in findings}
    finding = next(f for f in findings if f.code == code)
    assert finding.suggestion and finding.numbers and finding.as_dict()["code"] == code


def test_data_findings():
    assert "few_images" in codes(result(), counts=np.array([100, 90, 12, 80]))
    assert "class_imbalance" in codes(result(), counts=np.array([500, 90, 40, 80]))
    assert "duplicates_across_splits" in codes(result(), duplicates=3)


def test_settled_weights_are_not_reported_as_stuck():
    assert codes(result(history(loss=(1.0, 0.001), ratio=1e-9))) == set()


def test_fine_tuning_that_hurt_names_its_rate():
    from retrain.training.fine_tune_loop import FineTuneResult

    tuned = FineTuneResult(
        module_object=None,
        weights=np.ones((8, 4)),
        biases=np.zeros(4),
        input_size=(8, 8),
        settings=FineTuningConfig(steps=10, learning_rate=0.5),
        replicas=1,
        seconds=1.0,
        steps_per_second=1.0,
        before=evaluation(0.9),
        after=evaluation(0.4),
    )
    findings = diagnose(result(fine_tune=tuned), HEALTHY_COUNTS, 0, 0.01)
    hurt = next(f for f in findings if f.code == "fine_tuning_hurt")
    assert "0.5" in hurt.message and hurt.numbers["learning_rate"] == 0.5


def test_most_confused_pair_is_a_note():
    findings = diagnose(result(test=evaluation(0.85, confuse=(1, 2))), HEALTHY_COUNTS, 0, 0.01)
    (note,) = [f for f in findings if f.code == "confused_classes"]
    assert note.severity == "note" and "b taken for c" in note.message


def test_a_diverging_loss_stops_training_at_once():
    x = np.full((20, 4), 1e30, np.float32)  # logits overflow: the loss becomes NaN
    y = np.arange(20) % 2
    settings = HeadTrainingConfig(how_many_training_steps=100, learning_rate=1.0)
    with pytest.raises(TrainingDiverged, match="training diverged") as info:
        train_head(Split(x, y), None, SoftmaxHead(2), settings)
    assert "training.learning_rate" in str(info.value)


# ----------------------------------------------------------------------------- shares by split


def shifted_counts() -> dict:
    """The seeds' user's splits, scaled: 'often' on 70.7% of training and 33.3% of validation
    images, 'rare' on 3.98% and 0%, 'steady' alike everywhere, 'always' on every image."""
    return {
        "training": {"images": 10_000, "positives": [7070, 398, 2000, 10_000]},
        "validation": {"images": 1_200, "positives": [400, 0, 236, 1_200]},
        "testing": {"images": 1_200, "positives": [850, 50, 245, 1_200]},
    }


SHIFT_LABELS = ["often", "rare", "steady", "always"]


def test_two_proportion_test_by_hand():
    from retrain.reporting.health import two_proportion_p

    # pooled 0.4, standard error sqrt(0.4 * 0.6 * 0.02) = 0.06928, z = 2.887
    assert two_proportion_p(50, 100, 30, 100) == pytest.approx(0.003892, rel=1e-3)
    assert two_proportion_p(30, 100, 30, 100) == 1.0
    assert two_proportion_p(0, 100, 0, 50) == 1.0 and two_proportion_p(5, 0, 1, 10) == 1.0


def test_share_shifts_name_the_shifted_labels_worst_first():
    from retrain.reporting.health import share_shifts

    shifts = share_shifts(SHIFT_LABELS, shifted_counts())
    assert {(r["label"], r["split"]) for r in shifts} == {
        ("often", "validation"),
        ("rare", "validation"),
    }
    assert shifts[0]["label"] == "often" and shifts[0]["p_value"] < 1e-100
    often = shifts[0]
    assert (often["training"], often["share"]) == (0.707, pytest.approx(1 / 3))


def test_shares_drawn_from_one_pool_give_no_shift():
    from retrain.reporting.health import share_shifts

    rng = np.random.default_rng(0)
    shares = rng.uniform(0.001, 0.5, 19)
    labels = [f"l{j}" for j in range(19)]
    alarms = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        counts = {
            split: {"images": n, "positives": rng.binomial(n, shares).tolist()}
            for split, n in (("training", 8000), ("validation", 1000), ("testing", 1000))
        }
        alarms += bool(share_shifts(labels, counts))
    assert alarms <= 1  # family-wise 1% per run


def test_a_shift_and_labels_without_auc_are_warnings_naming_them():
    run = result()
    run.labels = SHIFT_LABELS
    run.split_counts = shifted_counts()
    found = {f.code: f for f in diagnose(run, np.array([100] * 4), 0, 0.01)}
    shift = found["label_share_shift"]
    assert shift.severity == "warning" and "two-proportion" in shift.message
    assert "often 70.70% of training, 33.33% of validation" in shift.message
    assert "steady" not in shift.message
    assert found["labels_without_auc"].severity == "note"  # classes: small sets lack some
    run.head.head = SigmoidHead(4)
    found = {f.code: f for f in diagnose(run, np.array([100] * 4), 0, 0.01)}
    assert found["labels_without_auc"].severity == "warning"
    missing = found["labels_without_auc"].message
    assert "rare (no positives in validation)" in missing
    assert "always (no negatives in training)" in missing
    assert "always (no negatives in testing)" in missing and "often (" not in missing


def test_split_counts_from_bottlenecks_per_class():
    from types import SimpleNamespace

    from retrain.reporting.health import split_counts

    codes_ = np.array([0, 0, 0, 1, 2, 2])
    b = SimpleNamespace(labels=np.array([0, 1, 1, 1, 0, 2]), split_codes=codes_)
    b.in_split = lambda name: codes_ == ("training", "validation", "testing").index(name)
    assert split_counts(b, SoftmaxHead(3)) == {
        "training": {"images": 3, "positives": [1, 2, 0]},
        "validation": {"images": 1, "positives": [0, 1, 0]},
        "testing": {"images": 2, "positives": [1, 0, 1]},
    }


def test_label_summary_in_the_metrics_and_the_report(tmp_path):
    from retrain.config import RetrainConfig
    from retrain.reporting.html import write_report

    run = result()
    run.split_counts = {
        "training": {"images": 400, "positives": [100, 100, 100, 100]},
        "testing": {"images": 200, "positives": [50, 50, 50, 50]},
    }
    summary = run.metrics()["label_summary"]
    assert summary["a"]["training_positives"] == 100 and summary["a"]["testing_share"] == 0.25
    assert summary["a"]["roc_auc"] == run.test.report(LABELS)["per_class"]["a"]["roc_auc"]
    page = write_report(tmp_path / "r.html", RetrainConfig(image_dir="x"), run)
    text = Path(page).read_text()
    assert "Per class across the splits" in text and "100 (25.00%)" in text
