"""The training-health report: what a finished run's figures say about why it did or did not
learn, each finding with its numbers and a suggestion.

Warnings are problems (accuracy near chance, a loss that does not fall or that diverges,
weights that barely move or thrash, overfitting, too few images, heavy imbalance, identical
files across splits, fine-tuning that made things worse or was thrown away, with its likely
cause); notes are for reading (the pairs of classes most confused). A healthy run gives no
warning.

Suggestions name settings with `setting_name` when the finding is made, so one run's log, HTML
report and metrics JSON agree: config paths (`training.weight_decay`), or the command line's
flags (`--weight_decay`) when it installed them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from retrain.bottlenecks.stage import Bottlenecks
from retrain.data import scan
from retrain.errors import setting_name
from retrain.heads.head import Head
from retrain.reporting.audit import identical_pairs
from retrain.results import RunResult

# Per-step update / weight ratio: about 1e-3 is the usual healthy size.
BARELY_MOVING = 1e-6
THRASHING = 5e-2
FEW_IMAGES = 20  # training images of a class
IMBALANCE = 10.0  # largest / smallest class
OVERFIT_GAP = 0.25  # training accuracy above validation accuracy
OVERCONFIDENT = 5.0  # validation loss over training loss
CONFUSED_SHARE = 0.2  # of a class's test images predicted as one other class
# A share differs between splits when a two-proportion z-test gives p under this, Bonferroni
# corrected for the labels and the two comparisons (training against validation and test).
SHIFT_ALPHA = 0.01
SHIFTS_SHOWN = 3  # the worst labels named in the shift warning


@dataclass(frozen=True)
class Finding:
    """One thing the run's figures say."""

    code: str
    severity: str  # "warning" or "note"
    message: str
    suggestion: str
    numbers: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The finding for --metrics_json."""
        return asdict(self)


def diagnose(
    result: RunResult,
    train_counts: np.ndarray,
    duplicates_across_splits: int,
    learning_rate: float,
) -> list[Finding]:
    """The findings of a finished run: `train_counts` are the training images per class,
    `duplicates_across_splits` the pairs of identical files in different splits. For
    multi-label runs, the counts are positives per label, and the single-label findings
    (chance, confusions) are left out. With `result.split_counts`, also the shares that
    shift between splits and the labels without an AUC in a split."""
    findings: list[Finding] = []
    if result.split_counts:
        kind = "label" if result.head.head.multi_label else "class"
        findings += _share_shift(result.labels, result.split_counts, kind)
        findings += _undefined_auc(result.labels, result.split_counts, kind)
    history = result.head.history
    findings += _accuracy(result)
    findings += _loss(history, learning_rate)
    findings += _updates(history, learning_rate)
    findings += _overfitting(history)
    findings += _data(result.labels, train_counts, duplicates_across_splits)
    findings += _fine_tuning(result)
    findings += _confusions(result)
    return findings


def _accuracy(result: RunResult) -> list[Finding]:
    test = result.test
    if test is None or not test.count or not hasattr(test, "confusion_matrix"):
        return []  # chance is a single-label notion
    chance = 1.0 / len(result.labels)
    if test.accuracy >= chance + 0.15:
        return []
    return [
        Finding(
            "accuracy_near_chance",
            "warning",
            f"test accuracy {test.accuracy:.1%} is near chance ({chance:.1%} for "
            f"{len(result.labels)} classes): the model has learnt next to nothing",
            f"check that each folder holds its class (retrain {setting_name('audit')}), and that "
            "the loss falls (see the other findings)",
            {"test_accuracy": test.accuracy, "chance": chance, "n": test.count},
        )
    ]


def _quarters(history: list[dict], key: str) -> tuple[float, float] | None:
    values = [r[key] for r in history if key in r]
    if len(values) < 8:
        return None
    quarter = len(values) // 4
    return float(np.mean(values[:quarter])), float(np.mean(values[-quarter:]))


def _loss(history: list[dict], learning_rate: float) -> list[Finding]:
    ends = _quarters(history, "cross_entropy")
    if ends is None:
        return []
    first, last = ends
    numbers = {"first_quarter_loss": first, "last_quarter_loss": last}
    if not np.isfinite(last) or last > 2 * first:
        return [
            Finding(
                "loss_diverging",
                "warning",
                f"the training loss grew from {first:.3g} to {last:.3g}: training diverges",
                f"lower the learning rate ({learning_rate:g}), e.g. tenfold",
                numbers,
            )
        ]
    if last > 0.9 * first:
        return [
            Finding(
                "loss_not_decreasing",
                "warning",
                f"the training loss barely fell ({first:.3g} to {last:.3g})",
                f"the learning rate ({learning_rate:g}) may be too high (it overshoots) or too "
                f"low; or the labels carry no signal (retrain {setting_name('audit')})",
                numbers,
            )
        ]
    return []


def _updates(history: list[dict], learning_rate: float) -> list[Finding]:
    ratios = [r["update_ratio"] for r in history if "update_ratio" in r]
    if not ratios:
        return []
    ratio = float(np.median(ratios[-max(1, len(ratios) // 4) :]))
    numbers = {"update_to_weight_ratio": ratio}
    # A layer that fits its training data (the loss near 0) rests: that is no stall.
    settled = history[-1].get("cross_entropy", 1.0) < 0.05
    if ratio < BARELY_MOVING and not settled:
        return [
            Finding(
                "weights_barely_moving",
                "warning",
                f"each step moves the weights by {ratio:.1e} of their size: they barely move",
                f"raise the learning rate ({learning_rate:g})",
                numbers,
            )
        ]
    if ratio > THRASHING:
        return [
            Finding(
                "weights_moving_too_much",
                "warning",
                f"each step moves the weights by {ratio:.1e} of their size (about 1e-3 is "
                "usual): they thrash instead of settling",
                f"lower the learning rate ({learning_rate:g})",
                numbers,
            )
        ]
    return []


def _overfitting(history: list[dict]) -> list[Finding]:
    return _accuracy_gap(history) + _overconfidence(history)


def _overconfidence(history: list[dict]) -> list[Finding]:
    train = _quarters(history, "cross_entropy")
    validation = _quarters(history, "validation_cross_entropy")
    if train is None or validation is None:
        return []
    if validation[1] <= OVERCONFIDENT * max(train[1], 0.1) or validation[1] < 2.0:
        return []
    return [
        Finding(
            "overconfident",
            "warning",
            f"the validation loss ({validation[1]:.3g}) is far above the training loss "
            f"({train[1]:.3g}): the layer is sure of wrong answers, its weights grown too large",
            f"lower the learning rate, or add {setting_name('training.weight_decay')} or "
            f"{setting_name('training.label_smoothing')}",
            {"train_loss": train[1], "validation_loss": validation[1]},
        )
    ]


def _accuracy_gap(history: list[dict]) -> list[Finding]:
    train = _quarters(history, "train_accuracy")
    validation = _quarters(history, "validation_accuracy")
    if train is None or validation is None or train[1] - validation[1] <= OVERFIT_GAP:
        return []
    return [
        Finding(
            "overfitting",
            "warning",
            f"training accuracy {train[1]:.1%} is far above validation accuracy "
            f"{validation[1]:.1%}: the layer memorises the training images",
            f"add images, distortions ({setting_name('distortions.copies')}), "
            f"{setting_name('training.dropout_rate')} or {setting_name('training.weight_decay')}, "
            "or train fewer steps",
            {"train_accuracy": train[1], "validation_accuracy": validation[1]},
        )
    ]


def _data(labels: list[str], counts: np.ndarray, duplicates: int) -> list[Finding]:
    findings = []
    few = {labels[i]: int(n) for i, n in enumerate(counts) if n < FEW_IMAGES}
    if few:
        findings.append(
            Finding(
                "few_images",
                "warning",
                f"{len(few)} class(es) have fewer than {FEW_IMAGES} training images: "
                + ", ".join(f"{name} ({n})" for name, n in few.items()),
                "add photos of those classes; their accuracy is measured on very few images",
                {"training_images": few},
            )
        )
    if counts.min() > 0 and counts.max() / counts.min() >= IMBALANCE:
        findings.append(
            Finding(
                "class_imbalance",
                "warning",
                f"the largest class has {counts.max() / counts.min():.0f}x the training images "
                f"of the smallest ({labels[int(counts.argmax())]} {counts.max()}, "
                f"{labels[int(counts.argmin())]} {counts.min()})",
                "add photos of the small classes; class-folder runs already draw batches class "
                f"by class ({setting_name('training.sampling')} auto); "
                f"{setting_name('training.class_weights')} balanced also weighs the loss",
                {"largest": int(counts.max()), "smallest": int(counts.min())},
            )
        )
    if duplicates:
        findings.append(
            Finding(
                "duplicates_across_splits",
                "warning",
                f"{duplicates} pair(s) of identical files sit in different splits: validation "
                "and test accuracy are inflated",
                f"remove the copies (retrain {setting_name('audit')} lists them)",
                {"pairs": duplicates},
            )
        )
    return findings


def _fine_tuning(result: RunResult) -> list[Finding]:
    tuned = result.fine_tune
    if tuned is None:
        return []
    discarded = tuned.discarded
    if discarded is not None:
        return [
            Finding(
                "fine_tuning_discarded",
                "warning",
                discarded.message,
                discarded.suggestion,
                {"cause": discarded.cause, **discarded.numbers},
            )
        ]
    if tuned.before is None or tuned.after is None:
        return []
    if tuned.after.accuracy >= tuned.before.accuracy - 0.02:
        return []
    return [
        Finding(
            "fine_tuning_hurt",
            "warning",
            f"fine-tuning lowered test accuracy from {tuned.before.accuracy:.1%} (the new "
            f"layer alone) to {tuned.after.accuracy:.1%} at a learning rate of "
            f"{tuned.settings.learning_rate:g}",
            f"lower {setting_name('fine_tuning.learning_rate')} (e.g. tenfold) or fine-tune fewer "
            "steps",
            {
                "before": tuned.before.accuracy,
                "after": tuned.after.accuracy,
                "learning_rate": tuned.settings.learning_rate,
            },
        )
    ]


def _confusions(result: RunResult) -> list[Finding]:
    test = result.test
    if test is None or not test.count or not hasattr(test, "confusion_matrix"):
        return []
    confusion = test.confusion_matrix()
    support = confusion.sum(axis=1)
    pairs = [
        (int(confusion[i, j]), result.labels[i], result.labels[j], confusion[i, j] / support[i])
        for i in range(len(confusion))
        for j in range(len(confusion))
        if i != j
        and support[i]
        and confusion[i, j] >= 2
        and confusion[i, j] / support[i] >= CONFUSED_SHARE
    ]
    if not pairs:
        return []
    pairs.sort(reverse=True)
    return [
        Finding(
            "confused_classes",
            "note",
            "most confused: "
            + "; ".join(
                f"{a} taken for {b} {n} times ({share:.0%})" for n, a, b, share in pairs[:3]
            ),
            "look at those photos "
            f"({setting_name('evaluation.print_misclassified_test_images')}); more or clearer "
            "examples of both classes help",
            {"pairs": [[a, b, n] for n, a, b, _ in pairs[:3]]},
        )
    ]


def split_counts(b: Bottlenecks, head: Head) -> dict[str, dict]:
    """{split: {"images": n, "positives": [per class (label)]}} of the splits that hold
    images: what the shares and the shift test are computed from."""
    counts = {}
    for split in scan.SPLITS:
        labels = b.labels[b.in_split(split)]
        if len(labels):
            counts[split] = {"images": len(labels), "positives": head.positives(labels).tolist()}
    return counts


def two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test that k1/n1 and k2/n2 are draws
    of one share; 1.0 where a side is empty or the pooled share is 0 or 1."""
    if not n1 or not n2:
        return 1.0
    pooled = (k1 + k2) / (n1 + n2)
    if pooled <= 0.0 or pooled >= 1.0:
        return 1.0
    z = (k1 / n1 - k2 / n2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return math.erfc(abs(z) / math.sqrt(2))


def share_shifts(labels: list[str], counts: dict[str, dict]) -> list[dict]:
    """The labels whose share of validation or test images differs from their share of
    training images by more than chance allows (`two_proportion_p` under SHIFT_ALPHA,
    Bonferroni corrected), the smallest p first: {label, split, training, share, p_value}."""
    training = counts.get("training")
    others = [s for s in ("validation", "testing") if s in counts]
    if training is None or not others:
        return []
    level = SHIFT_ALPHA / (len(labels) * len(others))
    shifts = []
    for split in others:
        for j, name in enumerate(labels):
            k1, n1 = training["positives"][j], training["images"]
            k2, n2 = counts[split]["positives"][j], counts[split]["images"]
            p = two_proportion_p(k1, n1, k2, n2)
            if p < level:
                shifts.append(
                    {"label": name, "split": split, "training": k1 / n1, "share": k2 / n2}
                    | {"p_value": p}
                )
    return sorted(shifts, key=lambda r: (r["p_value"], -abs(r["share"] - r["training"])))


_PLURAL = {"class": "class(es)", "label": "label(s)"}


def _share_shift(labels: list[str], counts: dict[str, dict], kind: str) -> list[Finding]:
    shifts = share_shifts(labels, counts)
    if not shifts:
        return []
    named = "; ".join(
        f"{r['label']} {r['training']:.2%} of training, {r['share']:.2%} of {r['split']} "
        f"(p={r['p_value']:.1e})"
        for r in shifts[:SHIFTS_SHOWN]
    )
    return [
        Finding(
            "label_share_shift",
            "warning",
            f"{len({r['label'] for r in shifts})} {_PLURAL[kind]} make up a share of validation "
            f"or test images that differs from their training share more than chance allows "
            f"(two-proportion z-test, p < {SHIFT_ALPHA:g} over all labels): {named}",
            "the splits come from different mixes, so validation and test figures measure "
            "another population than training; draw the splits from one pool, or read each "
            "label's figures with its shares (metrics JSON: label_summary)",
            {"shifts": shifts},
        )
    ]


def _undefined_auc(labels: list[str], counts: dict[str, dict], kind: str) -> list[Finding]:
    """Labels without positives or negatives in a split (a warning: their thresholds and
    figures there mean nothing); for classes, a note: small sets often leave a class without
    validation or test images."""
    nothing = "no positives" if kind == "label" else "no images"
    missing = [
        (name, split, why)
        for split, c in counts.items()
        for name, k in zip(labels, c["positives"])
        for why in ((nothing,) if k == 0 else ("no negatives",) if k == c["images"] else ())
    ]
    if not missing:
        return []
    return [
        Finding(
            "labels_without_auc",
            "warning" if kind == "label" else "note",
            f"{len(missing)} {_PLURAL[kind]} have {nothing} or no negatives in a split, so "
            "their ROC AUC and AP there are undefined and left out of the means: "
            + ", ".join(f"{name} ({why} in {split})" for name, split, why in missing),
            "add images of them to that split (for no negatives: images without them); until "
            "then, their figures there say nothing",
            {"labels": [{"label": n, "split": s, "reason": w} for n, s, w in missing]},
        )
    ]


def cross_split_duplicates(b: Bottlenecks) -> int:
    """Pairs of files with the same bytes in different splits (the health report's
    `duplicates_across_splits` warning is the run's hint at them)."""
    pairs = identical_pairs(b.locations)
    return int(sum(b.split_codes[i] != b.split_codes[j] for i, j in pairs))


def diagnose_run(result: RunResult, b: Bottlenecks, learning_rate: float) -> list[Finding]:
    """`diagnose` a finished run, its training images per class (positives per label) and
    its duplicates across splits taken from its bottlenecks."""
    head = result.head.head
    if not result.split_counts:
        result = replace(result, split_counts=split_counts(b, head))
    counts = head.positives(b.labels[b.in_split("training")])
    return diagnose(result, counts, cross_split_duplicates(b), learning_rate)
