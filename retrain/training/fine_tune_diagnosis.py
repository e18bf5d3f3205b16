"""Why fine-tuning was thrown away: when no fine-tuned step beat the head alone beyond noise,
the likely cause read from the run's own history (the training loss at each logged step, the
validation figures at each evaluation) against the head alone's validation figures.

Three causes, checked in this order:

- `rate_too_high`: the training loss became NaN or infinite, rose (its last third above 1.5x
  its first), or ended far above the head alone's loss (3x its validation cross-entropy): the
  steps overshoot.
- `overfitting`: the training loss fell while validation got worse than the head alone over
  the last third of the evaluations: its accuracy below the 95% Wilson interval of the head
  alone's, or its cross-entropy 20% higher.
- `validation_flat`: neither: validation stayed within noise of the head alone, so the steps
  were too few or too small (or validation too small to show a gain).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from retrain.errors import setting_name
from retrain.heads.evaluation import Evaluation, wilson_interval

RISING = 1.5  # last third of the training loss over its first third
EXPLODED = 3.0  # last third of the training loss over the head alone's validation loss
WORSE_LOSS = 1.2  # validation loss over the head alone's: worse
MIN_LOSS = 0.05  # the head alone's loss counts as at least this (a perfect fit is near 0)
THROWN_AWAY = "fine-tuning was thrown away (the head alone is kept)"


@dataclass(frozen=True)
class Discard:
    """Why the fine-tuned steps were thrown away: a cause (see the module's docstring), what
    the run showed, what to change, and the figures."""

    cause: str
    message: str
    suggestion: str
    numbers: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """For --metrics_json."""
        return {
            "cause": self.cause,
            "message": self.message,
            "suggestion": self.suggestion,
            "numbers": self.numbers,
        }


def _thirds(values: Sequence[float]) -> tuple[float, float]:
    """The means of the first and the last third of `values` (at least one value each)."""
    third = max(1, len(values) // 3)
    return float(np.mean(values[:third])), float(np.mean(values[-third:]))


def why_discarded(
    history: Sequence[dict],
    head_alone: Evaluation,
    learning_rate: float,
    suggested_rate: float | None = None,
) -> Discard:
    """The likely cause that no fine-tuned step of `history` (records with "step", "loss"
    and, at evaluations, "validation_accuracy" and "validation_loss") beat `head_alone` (the
    head alone's validation evaluation), at `learning_rate`; `suggested_rate` is the
    learning-rate finder's suggestion when the run has one."""
    losses = [float(r["loss"]) for r in history if "loss" in r]
    judged = [r for r in history if "validation_accuracy" in r]
    if not losses:
        return _flat(head_alone, judged, 0)
    first, last = _thirds(losses)
    reference = max(head_alone.cross_entropy, MIN_LOSS)
    numbers = {"first_third_loss": first, "last_third_loss": last, "head_alone_loss": reference}
    broken = next((r["step"] for r in history if not math.isfinite(r.get("loss", 0.0))), None)
    if broken is not None or last > RISING * first or last > EXPLODED * reference:
        if broken is not None:
            seen = f"the training loss became {last:g} at step {broken}"
        else:
            seen = f"the training loss went from {first:.3g} to {last:.3g}"
        return Discard(
            "rate_too_high",
            f"{THROWN_AWAY}: {seen} (the head alone's validation loss: {reference:.3g}) at a "
            f"learning rate of {learning_rate:g}: the rate is too high",
            _lower_rate(learning_rate, suggested_rate),
            {**numbers, "learning_rate": learning_rate, "suggested_rate": suggested_rate},
        )
    overfit = _overfitting(judged, head_alone, numbers) if judged and last < first else None
    return overfit or _flat(head_alone, judged, int(history[-1]["step"]))


def _overfitting(judged: Sequence[dict], head_alone: Evaluation, numbers: dict) -> Discard | None:
    """`overfitting` if validation over the last third of the evaluations `judged` is worse
    than `head_alone` beyond noise (the training loss fell: see `numbers`), else None."""
    accuracy = _thirds([r["validation_accuracy"] for r in judged])[1]
    loss = _thirds([r["validation_loss"] for r in judged])[1]
    right = round(head_alone.accuracy * head_alone.count)
    floor = wilson_interval(right, head_alone.count)[0]  # below it: worse beyond noise
    reference = numbers["head_alone_loss"]
    if accuracy >= floor and loss <= WORSE_LOSS * reference:
        return None
    return Discard(
        "overfitting",
        f"{THROWN_AWAY}: the training loss fell ({numbers['first_third_loss']:.3g} to "
        f"{numbers['last_third_loss']:.3g}) while validation got worse than the head alone "
        f"(accuracy {100 * accuracy:.1f}% vs {100 * head_alone.accuracy:.1f}%, loss "
        f"{loss:.3g} vs {reference:.3g}): the fine-tuned blocks overfit",
        f"fine-tune fewer steps ({setting_name('fine_tuning.steps')}) or fewer blocks "
        f"({setting_name('fine_tuning.from_block')}), add distorted copies "
        f"({setting_name('distortions.copies')}), or lower "
        f"{setting_name('fine_tuning.learning_rate')}",
        {**numbers, "validation_accuracy": accuracy, "validation_loss": loss},
    )


def _lower_rate(rate: float, suggested: float | None) -> str:
    name = setting_name("fine_tuning.learning_rate")
    if suggested is None:
        return (
            f"lower {name} (e.g. tenfold, to {rate / 10:g}), or set it to auto: the "
            "learning-rate finder suggests one from a short range test"
        )
    if not math.isclose(suggested, rate):
        return f"lower {name}: the learning-rate finder suggested {suggested:g}"
    return (
        f"lower {name}: this run used the learning-rate finder's suggestion ({suggested:g}); "
        f"try a tenth of it ({suggested / 10:g})"
    )


def _flat(head_alone: Evaluation, judged: Sequence[dict], steps: int) -> Discard:
    accuracies = [r["validation_accuracy"] for r in judged] or [head_alone.accuracy]
    low, high = min(accuracies), max(accuracies)
    return Discard(
        "validation_flat",
        f"{THROWN_AWAY}: over {steps} steps validation stayed within noise of the head alone "
        f"({100 * low:.1f}%-{100 * high:.1f}% vs {100 * head_alone.accuracy:.1f}% at "
        f"N={head_alone.count})",
        f"fine-tune more steps ({setting_name('fine_tuning.steps')}) or at a higher rate "
        f"({setting_name('fine_tuning.learning_rate')}, or auto); with few validation images "
        f"only a large gain shows beyond noise (raise "
        f"{setting_name('data.validation_percentage')} or add photos)",
        {"validation_low": low, "validation_high": high, "head_alone": head_alone.accuracy},
    )
