"""Safe fine-tuning: watch validation as it goes, keep the best network seen, stop early.

Fine-tuning must never export a network worse than the one it started from: the pretrained
module with the new layer trained on bottlenecks ("the head alone"). So the head alone is
evaluated on the validation images first, as step 0, and is the first candidate. A fine-tuned
state replaces the kept candidate only when it scores better on the same images (accuracy
first, then cross-entropy) *and* beats the head alone beyond noise: the 95% interval of its
paired gain over the head alone (`paired_gain`, from the images only one of the two gets
right) lies above zero. Picking the best of many noisy evaluations otherwise keeps whichever
step was lucky on a few hundred images. The kept variables are put back when the steps end.
Fine-tuning stops once `patience` evaluations in a row did not improve on the best seen.

The validation images (all of them from cached activations; for the whole network at most
VALIDATION_IMAGES, a seeded subset) are decoded once and kept as uint8 pixels (the rounding is
a fraction of one grey level, far below what moves a prediction), so an evaluation is one
forward pass over them, with no decoding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrain.bottlenecks import extract
from retrain.heads.evaluation import Evaluation, wilson_interval
from retrain.heads.head import Head
from retrain.training.optim import Plateau

log = logging.getLogger(__name__)

# Whole-network fine-tuning watches at most this many validation images (decoded once, kept in
# memory: 77 MB at 224x224). One evaluation is a forward pass over them, about as costly as a
# training step of a sixth as many images (docs/fine-tuning.md); 512 holds all of validation
# for a few thousand photos, and the noise rule guards the pick when there are fewer.
VALIDATION_IMAGES = 512
# The smallest fall of validation cross-entropy that counts as better (the plateau's too).
MIN_DELTA = 1e-4
# --fine_tune_lr_schedule=plateau with validation images: the rate is lowered after this many
# evaluations without improvement, before early stopping's default patience runs out.
VALIDATION_PLATEAU_PATIENCE = 3


@dataclass(frozen=True)
class DecodedImages:
    """Images decoded once, as the module takes them but stored as uint8, with their labels."""

    pixels: np.ndarray  # uint8 [n, height, width, 3]
    labels: np.ndarray  # [n], in the head's form

    def __len__(self) -> int:
        return len(self.pixels)

    @classmethod
    def decode(
        cls,
        paths: Sequence[str | Path],
        labels: np.ndarray,
        input_size: tuple[int, int],
        max_pixels: int,
        batch_size: int = 32,
    ) -> DecodedImages:
        """Decode `paths` (with `labels`) to the module's input; files that no longer decode
        are left out."""
        labels = np.asarray(labels)
        pixels, kept = [], []
        for positions, batch, ok in extract.decoded_batches(
            paths, input_size, batch_size, {}, max_pixels
        ):
            keep = ok.numpy()
            pixels.append(np.round(batch.numpy()[keep] * 255).astype(np.uint8))
            kept.append(positions.numpy()[keep])
        if not pixels:
            return cls(np.zeros([0, *input_size, 3], np.uint8), labels[:0])
        return cls(np.concatenate(pixels), labels[np.concatenate(kept)])

    def evaluate(
        self,
        extractor: Callable[[np.ndarray], Any],
        head: Head,
        weights: np.ndarray,
        biases: np.ndarray,
        batch_size: int,
    ) -> Evaluation:
        """The evaluation of module (`extractor`: float pixels in [0, 1] -> features) + layer
        (`weights`, `biases`) + `head` on these images, in batches of `batch_size`."""
        chunks = []
        for start in range(0, len(self), batch_size):
            pixels = self.pixels[start : start + batch_size].astype(np.float32) / 255
            chunks.append((np.asarray(extractor(pixels)), self.labels[start : start + batch_size]))
        return head.evaluate(weights, biases, chunks)


@dataclass(frozen=True)
class Gain:
    """A candidate's accuracy over a reference's on the same images: the difference in
    points of accuracy (a share), its 95% interval, the images only the candidate gets right
    (`wins`) and only the reference does (`losses`), out of `count`."""

    points: float
    low: float
    high: float
    wins: int
    losses: int
    count: int

    @property
    def beyond_noise(self) -> bool:
        """Whether the whole interval lies above zero."""
        return self.low > 0

    def describe(self) -> str:
        """'+3.1 points, 95% interval +1.2 to +5.0 at N=459'."""
        return (
            f"{100 * self.points:+.1f} points, 95% interval {100 * self.low:+.1f} to "
            f"{100 * self.high:+.1f} at N={self.count}"
        )

    def as_dict(self) -> dict:
        """The gain for --metrics_json."""
        return {
            "points": self.points,
            "interval_95": [self.low, self.high],
            "wins": self.wins,
            "losses": self.losses,
            "n": self.count,
            "beyond_noise": self.beyond_noise,
        }


def paired_gain(candidate: Evaluation, reference: Evaluation) -> Gain:
    """The gain of `candidate` over `reference`, evaluated on the same images in the same
    order. Only the images on which they disagree carry information (McNemar): the Wilson
    interval of the candidate's share of them, scaled by their number over all images, is
    the interval of the gain."""
    mine, theirs = np.asarray(candidate.hits), np.asarray(reference.hits)
    wins = int(np.count_nonzero(mine & ~theirs))
    losses = int(np.count_nonzero(theirs & ~mine))
    count, split = len(mine), wins + losses
    low, high = wilson_interval(wins, split)
    scale = split / count if count else 0.0
    return Gain(
        (wins - losses) / count if count else 0.0,
        scale * (2 * low - 1) + 0.0,  # + 0.0: no "-0.0" in the log
        scale * (2 * high - 1) + 0.0,
        wins,
        losses,
        count,
    )


def better(candidate: Evaluation, best: Evaluation) -> bool:
    """Whether `candidate` beats `best`: higher accuracy, or the same and a cross-entropy lower
    by more than MIN_DELTA. A diverged network (cross-entropy not finite) never does."""
    if not np.isfinite(candidate.cross_entropy):
        return False
    if candidate.accuracy != best.accuracy:
        return candidate.accuracy > best.accuracy
    return candidate.cross_entropy < best.cross_entropy - MIN_DELTA


class KeepBest:
    """Validation of a network as it trains: keeps the values of `variables` at the best
    evaluation that beats the head alone beyond noise (step 0, the head alone before any step,
    is the first candidate; see the module's docstring), lowers the rate on a plateau of
    validation cross-entropy (`plateau`, if given) and says when to stop (after `patience`
    evaluations in a row without a better one than the best seen, noise or not; 0: never).
    Neither the plateau nor the patience counts evaluations before step `judged_from` (any of
    them can still be kept).

    `evaluate()` evaluates the network as its variables are now. Every worker of a multi-worker
    run makes the same evaluations (all-gathered features), so all stop at the same step.
    """

    def __init__(
        self,
        evaluate: Callable[[], Evaluation],
        variables: Sequence[Any],
        patience: int,
        plateau: Plateau | None = None,
        judged_from: int = 0,
    ) -> None:
        self._evaluate = evaluate
        self._variables = list(variables)
        self.patience = patience
        self.judged_from = judged_from
        self.plateau = plateau
        self.seconds = 0.0  # spent evaluating
        self.waited = 0  # evaluations since the last improvement
        self.head_alone = self._timed_evaluation()
        self.best_step, self.best = 0, self.head_alone  # kept
        self.top_step, self.top = 0, self.head_alone  # the best seen, noise or not
        self._best_values = self._values()

    @property
    def stop(self) -> bool:
        """Whether patience ran out."""
        return 0 < self.patience <= self.waited

    def check(self, step: int) -> Evaluation:
        """Evaluate the network after `step` steps, keep it if it is the best so far, feed the
        plateau; returns the evaluation."""
        evaluation = self._timed_evaluation()
        if self.plateau is not None and step >= self.judged_from:
            self.plateau.update(evaluation.cross_entropy)
        if better(evaluation, self.top):
            self.top_step, self.top, self.waited = step, evaluation, 0
        elif step >= self.judged_from:
            self.waited += 1
        if better(evaluation, self.best) and paired_gain(evaluation, self.head_alone).beyond_noise:
            self.best_step, self.best = step, evaluation
            self._best_values = self._values()
        return evaluation

    @property
    def gain(self) -> Gain:
        """The kept network's gain over the head alone (the best seen's when that is the head
        alone: how close a fine-tuned step came)."""
        kept = self.best if self.best_step else self.top
        return paired_gain(kept, self.head_alone)

    def restore(self) -> None:
        """Put the best candidate's values back into the variables."""
        for variable, value in zip(self._variables, self._best_values, strict=True):
            variable.assign(value)

    def _values(self) -> list[np.ndarray]:
        return [np.array(v.numpy()) for v in self._variables]

    def _timed_evaluation(self) -> Evaluation:
        start = time.perf_counter()
        evaluation = self._evaluate()
        self.seconds += time.perf_counter() - start
        return evaluation

    def explain(self, steps_run: int) -> str:
        """One line saying which network is kept and how sure the pick is."""
        head = _figures(self.head_alone)
        if self.best_step:
            return (
                f"kept step {self.best_step} of {steps_run}: validation "
                f"{100 * self.best.accuracy:.1f}% vs the head alone "
                f"{100 * self.head_alone.accuracy:.1f}% ({self.gain.describe()}: outside noise; "
                f"{_figures(self.best)})"
            )
        if self.top_step:
            return (
                "kept the head alone (the pretrained module with the new layer): no fine-tuned "
                f"step beat it beyond noise (the best, step {self.top_step}: validation "
                f"{100 * self.top.accuracy:.1f}% vs {100 * self.head_alone.accuracy:.1f}%, "
                f"{self.gain.describe()}; the head alone: {head})"
            )
        return (
            "kept the head alone (the pretrained module with the new layer): no fine-tuned "
            f"step beat its validation figures ({head})"
        )


def _figures(evaluation: Evaluation) -> str:
    return (
        f"accuracy {100 * evaluation.accuracy:.1f}%, cross-entropy {evaluation.cross_entropy:.4f}, "
        f"N={evaluation.count}"
    )
