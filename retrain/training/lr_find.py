"""The learning-rate finder (`--lr_find`, `--learning_rate auto`): a range test on the cached
bottlenecks, as Leslie Smith proposed ("Cyclical Learning Rates", 2015) and fastai's
`lr_find` made popular.

The new layer is trained from its usual start for a few hundred steps while the rate grows
geometrically from tiny to huge; the loss of each step's batch, smoothed, falls once the rate
is large enough to learn and shoots up once it is too large. The suggestion is the rate of
the lowest smoothed loss divided by ten, safely below where training starts to fail and far
above where it barely moves, or the rate where the loss fell fastest if that is smaller (see
`suggest`). It takes seconds, since every step is a small matrix product.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from retrain.bottlenecks.stage import Bottlenecks
from retrain.config import HeadTrainingConfig
from retrain.errors import RetrainError, setting_name
from retrain.heads.head import Head
from retrain.training.head import HeadTrainer, TrainingSource
from retrain.utils.interrupt import check as check_interrupt

log = logging.getLogger("retrain")

MIN_RATE = 1e-6
MAX_RATE = 10.0
STEPS = 200
SMOOTHING = 0.9  # of the loss's exponential moving average (debiased, as fastai does)
DIVERGED = 4.0  # stop once the smoothed loss is this many times its minimum
RISEN = 1.1  # "edge" rule: the rates before the loss rose 10% above its start are safe
SKIP_START = 10  # points of warm-up that never count as the lowest loss (fastai's skip_start)


@dataclass(frozen=True)
class RateSearch:
    """What the range test measured: each step's rate, raw and smoothed loss, and the
    suggested rate (see `suggest`)."""

    rates: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    seconds: float

    @property
    def lowest(self) -> int:
        """The step at which the smoothed loss was lowest."""
        return int(np.argmin(self.smoothed))

    @property
    def best_rate(self) -> float:
        """The rate at which the smoothed loss was lowest."""
        return self.rates[self.lowest]

    def metrics(self) -> dict:
        """The search for --metrics_json."""
        return {
            "suggested_learning_rate": self.suggestion,
            "lowest_loss_rate": self.best_rate,
            "steps": len(self.rates),
            "seconds": round(self.seconds, 3),
            "rates": self.rates,
            "smoothed_losses": self.smoothed,
        }

    def text_plot(self, rows: int = 13, width: int = 40) -> list[str]:
        """Loss against rate as lines of text, one per decade or so, for the log."""
        lowest = self.lowest
        spread = np.linspace(0, len(self.rates) - 1, rows).round().astype(int)
        picks = np.unique(np.append(spread, lowest))
        low, high = min(self.smoothed), max(self.smoothed[i] for i in picks)
        lines = []
        for i in picks:
            share = (self.smoothed[i] - low) / (high - low) if high > low else 0.0
            mark = f"  <- lowest loss; suggested rate {self.suggestion:g}" if i == lowest else ""
            bar = "#" * max(1, round(share * width))
            lines.append(f"rate {self.rates[i]:9.2e}  loss {self.smoothed[i]:8.4f}  {bar}{mark}")
        return lines


def search_learning_rate(
    train: TrainingSource,
    head: Head,
    config: HeadTrainingConfig,
    steps: int = STEPS,
    min_rate: float = MIN_RATE,
    max_rate: float = MAX_RATE,
) -> RateSearch:
    """Run the range test for the new layer with `config`'s optimizer, batch size, sampling
    and regularisation (at a constant rate, whatever its schedule) on `train`; returns what it
    measured (see `range_test`)."""
    settings = dataclasses.replace(
        config,
        learning_rate=min_rate,
        lr_schedule="constant",
        how_many_training_steps=steps,
    )
    trainer = HeadTrainer(train, head, settings)

    def step_at(rate: float) -> float:
        trainer.optimizer.learning_rate.assign(rate)
        return float(trainer.run_steps(tf.constant(1))[1])

    return range_test(step_at, steps, min_rate, max_rate, "training.learning_rate")


def range_test(
    step_at: Callable[[float], float],
    steps: int,
    min_rate: float,
    max_rate: float,
    rate_field: str,
    rule: str = "valley",
) -> RateSearch:
    """The range test around any training: `step_at(rate)` takes one step at `rate` and
    returns its batch's loss; the rate grows geometrically from `min_rate` to `max_rate` over
    `steps` steps, stopping early once the loss has clearly diverged; `rule` says how the
    suggestion is read off (see `suggest`). Raises RetrainError (naming config field
    `rate_field`) if the first step's loss is not a number."""
    growth = (max_rate / min_rate) ** (1 / max(1, steps - 1))
    rates, losses, smoothed = [], [], []
    average, best = 0.0, math.inf
    start = time.perf_counter()
    for step in range(steps):
        check_interrupt()
        rate = min_rate * growth**step
        loss = step_at(rate)
        if not math.isfinite(loss):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        debiased = average / (1 - SMOOTHING ** (step + 1))
        rates.append(rate)
        losses.append(loss)
        smoothed.append(debiased)
        best = min(best, debiased)
        if step > 10 and debiased > DIVERGED * best:
            break
    if not smoothed:
        raise RetrainError(
            f"the learning-rate finder's first step, at {min_rate:g}, gave a loss that is not "
            "a number; check the data (retrain {1}) or set {0}",
            rate_field,
            "audit",
        )
    return RateSearch(
        rates=rates,
        losses=losses,
        smoothed=smoothed,
        suggestion=float(f"{suggest(rates, smoothed, rule):.2g}"),
        seconds=time.perf_counter() - start,
    )


def suggest(rates: list[float], smoothed: list[float], rule: str = "valley") -> float:
    """The suggested rate of a range test (the first SKIP_START points, still warming the
    average up, never count as the lowest).

    "valley" (the new layer, trained from scratch): the smaller of a tenth of the lowest
    loss's rate and the rate where the loss fell fastest per decade. The first is fastai's
    rule when the loss turned up within the range; the second guards a small set the layer
    memorises, whose loss never turns up. "edge" (fine-tuning a layer that already fits its
    images, whose loss hardly falls): a tenth of the largest rate before the loss rose RISEN
    times above where it started (its median over the first quarter of the rates).
    """
    skip = min(SKIP_START, len(smoothed) // 10)
    if rule == "edge":
        start = float(np.median(smoothed[: max(1, len(smoothed) // 4)]))  # robust to noise
        rising = [i for i in range(skip, len(smoothed)) if smoothed[i] > RISEN * start]
        edge = rising[0] - 1 if rising else len(rates) - 1
        return rates[max(edge, 0)] / 10
    lowest = skip + int(np.argmin(smoothed[skip:]))
    if lowest == 0:
        return rates[0] / 10
    slopes = np.diff(smoothed[: lowest + 1]) / np.diff(np.log10(rates[: lowest + 1]))
    steepest = rates[int(np.argmin(slopes)) + 1]
    return min(rates[lowest] / 10, steepest)


def search_on_bottlenecks(b: Bottlenecks, head: Head, settings: HeadTrainingConfig) -> RateSearch:
    """The new layer's range test on the training split's cached vectors, logged."""
    train = b.training()
    search = search_learning_rate(train.load() if train.fits_in_memory() else train, head, settings)
    log.info(
        "Learning-rate finder: %d steps in %.1f s; the loss was lowest at %.2g, suggested "
        "learning rate %g (%s %s)",
        len(search.rates),
        search.seconds,
        search.best_rate,
        search.suggestion,
        setting_name("training.optimizer"),
        settings.optimizer,
    )
    return search
