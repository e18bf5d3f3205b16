"""The check of every exported model: each file written (frozen graph, SavedModel, TFLite) is
loaded back as a client would load it and run on the test split's image files, decoded once
and shared by all of them.

Each gets its accuracy and its top-1 agreement with the float model (retrain's own evaluation
of the test split, which the exported float models must reproduce), so a quantization or an
export that breaks the model shows at once, in the log and in --metrics_json.

The .tflite (the one export that quantization changes) runs on the whole test split. The frozen
graph and the SavedModel compute in float what the evaluation computed, and TensorFlow runs them
several times slower than LiteRT: they run on a seeded subset of at most FLOAT_CHECK_IMAGES test
images, enough for a broken export to show in its scores. An export whose scores match the float
model's to SCORE_TOLERANCE on every image it ran reproduces it (`reproduces_float_model`): its
accuracy on the whole split is the run's own test accuracy, so a threshold on accuracy needs
only that figure, not the subset's noisier one.

With the optional `mediapipe` package installed, the .tflite also runs through MediaPipe Tasks'
ImageClassifier on the whole test split (format "mediapipe", see retrain.export.mediapipe_check):
what a phone or a browser would make of the file, its metadata and its label names included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import tensorflow as tf

from retrain.bottlenecks import extract
from retrain.data.sampling import random_picks
from retrain.errors import RetrainError
from retrain.export import mediapipe_check
from retrain.export.loading import (
    FROZEN_GRAPH,
    SAVED_MODEL,
    TFLITE,
    Classifier,
    ModelLoadError,
    open_model,
)
from retrain.heads.head import AnyEvaluation, Head
from retrain.utils.interrupt import check as check_interrupt

log = logging.getLogger("retrain")

# The export settings whose files are models, and each one's format.
MODEL_OUTPUTS = {
    "output_graph": FROZEN_GRAPH,
    "saved_model_dir": SAVED_MODEL,
    "output_tflite": TFLITE,
}
# Images per batch: on a CPU, TensorFlow runs Lite0 on 4 as fast as on 32 (about 0.03 s of CPU
# an image either way), and the smaller the batch, the lower the check's peak: 256 clothing
# photos peaked 60-80 MB lower in batches of 4 than of 8, and 450 MB lower than of 32.
BATCH_SIZE = 4
# Test images the TensorFlow formats run on, at most: about 0.03 s of CPU each for Lite0 here,
# and one image off by more than SCORE_TOLERANCE is enough to show a broken export.
FLOAT_CHECK_IMAGES = 64
SCORE_TOLERANCE = 1e-4  # an export's largest score difference that still reproduces the model


@dataclass(frozen=True)
class ExportCheck:
    """One exported model's figures on the test split."""

    format: str  # FROZEN_GRAPH, SAVED_MODEL or TFLITE
    path: str
    quantization: str  # "none" but for a quantized .tflite
    images: int  # test images run
    accuracy: float  # as the run's test_accuracy counts it
    agreement: float  # share of images whose top label is the float model's
    max_score_difference: float  # largest |score - float model's score|
    seconds: float  # loading and running this model (decoding is shared, not counted)

    @property
    def reproduces_float_model(self) -> bool:
        """Whether this export computed the float model's scores (to SCORE_TOLERANCE on every
        image it ran), so that its accuracy on the whole test split is the run's own."""
        return self.max_score_difference <= SCORE_TOLERANCE

    def as_dict(self) -> dict:
        """The figures for --metrics_json."""
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def check_exports(
    outputs: dict[str, str],
    paths: Sequence[str],
    evaluation: AnyEvaluation | None,
    head: Head,
    input_size: tuple[int, int],
    max_pixels: int,
    quantization: str = "none",
    final_tensor_name: str | None = None,
) -> list[ExportCheck]:
    """Run each model of `outputs` ({export setting: path}, as export_classifier returns it)
    on the test images `paths`, which `evaluation` (the run's evaluation of the float model:
    its probabilities, labels and a multi-label head's thresholds, row for row) measured;
    `head`, the float model's, says how an image counts as right (`Head.accuracy`).
    Images that no longer decode are left out. Returns one ExportCheck per model, in the order
    of `outputs`, each logged; none without models or test images. `final_tensor_name` is
    the frozen graph's output node (as exported), when it is not the default."""
    if not any(setting in MODEL_OUTPUTS for setting in outputs):
        return []
    if evaluation is None or not len(paths):
        log.info("Export check: no test images, the exported models are not checked")
        return []
    if len(evaluation.probabilities) != len(paths):  # a test image stopped decoding meanwhile
        log.warning("Export check: the test images changed during the run; not checked")
        return []
    reference = _Reference(
        evaluation.probabilities,
        np.asarray(evaluation.labels),
        getattr(evaluation, "thresholds", None),
        head,
    )
    checks = _run_checks(
        outputs, paths, reference, input_size, max_pixels, quantization, final_tensor_name
    )
    if "output_tflite" in outputs and mediapipe_check.available():
        checks += _mediapipe_checks(
            outputs["output_tflite"], paths, reference, input_size, max_pixels, quantization
        )
    _log_checks(checks, evaluation.accuracy)
    for c in checks:
        if c.format == mediapipe_check.MEDIAPIPE:
            mediapipe_check.warn_below_floor(c.quantization, c.agreement, c.path)
    return checks


def _mediapipe_checks(
    path: str,
    paths: Sequence[str],
    reference: _Reference,
    input_size: tuple[int, int],
    max_pixels: int,
    quantization: str,
) -> list[ExportCheck]:
    """The .tflite at `path` run through MediaPipe's ImageClassifier, on images resized as
    retrain resizes them and on whole images (none if it cannot be run)."""
    run = mediapipe_check.timed_scores(path, paths, max_pixels, input_size)
    if run is None or not len(run[1]):
        return []
    scores, rows, seconds = run
    return [
        _figures(variant, path, quantization, got, rows, reference, seconds / len(scores))
        for variant, got in scores.items()
    ]


@dataclass(frozen=True, eq=False)
class _Reference:
    """What the exported models are measured against, row for row of the test images: the
    float model's `scores`, the `labels`, the `thresholds` a multi-label head decided at
    (None: the argmax decides), and the `head`, which says how an image counts as right."""

    scores: np.ndarray
    labels: np.ndarray
    thresholds: Sequence[float] | None
    head: Head


def _run_checks(
    outputs: dict[str, str],
    paths: Sequence[str],
    reference: _Reference,
    input_size: tuple[int, int],
    max_pixels: int,
    quantization: str,
    final_tensor_name: str | None,
) -> list[ExportCheck]:
    """Load each model of `outputs`, run it on the test images `paths` and measure it."""
    models = {setting: path for setting, path in outputs.items() if setting in MODEL_OUTPUTS}
    loaded: dict[str, Classifier] = {}
    seconds = dict.fromkeys(models, 0.0)
    for setting, path in models.items():
        start = time.perf_counter()
        try:
            graph_output = final_tensor_name if setting == "output_graph" else None
            loaded[setting] = open_model(path, output_layer=graph_output)
        except ModelLoadError as err:
            raise RetrainError(f"the exported model cannot be loaded back: {err}") from None
        seconds[setting] += time.perf_counter() - start
    scores, rows = _predict(loaded, paths, input_size, max_pixels, seconds)
    return [
        _figures(
            MODEL_OUTPUTS[setting],
            path,
            quantization if setting == "output_tflite" else "none",
            np.concatenate(scores[setting]),
            np.concatenate(rows[setting]),
            reference,
            seconds[setting],
        )
        for setting, path in models.items()
        if rows[setting]
    ]


def _predict(
    loaded: dict[str, Classifier],
    paths: Sequence[str],
    input_size: tuple[int, int],
    max_pixels: int,
    seconds: dict[str, float],
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
    """Each model's scores of the test images it runs on (a .tflite all of them, the others a
    seeded subset of FLOAT_CHECK_IMAGES), each decoded once, and those images' rows, in
    pieces; each model's seconds of running are added to `seconds`."""
    subset = np.zeros(len(paths), bool)
    subset[random_picks(len(paths), FLOAT_CHECK_IMAGES, seed=0)] = True
    # Only the subset is decoded when no .tflite needs the rest.
    wanted = subset | any(model.format == TFLITE for model in loaded.values())
    scores: dict[str, list[np.ndarray]] = {setting: [] for setting in loaded}
    rows: dict[str, list[np.ndarray]] = {setting: [] for setting in loaded}
    to_decode = tf.data.Dataset.from_tensor_slices(np.flatnonzero(wanted).astype(np.int64))
    for positions, images, ok in extract.decoded_batches(
        list(paths), input_size, BATCH_SIZE, {}, max_pixels, to_decode
    ):
        check_interrupt()
        ok, positions, images = ok.numpy(), positions.numpy(), images.numpy()
        for setting, model in loaded.items():
            use = ok if model.format == TFLITE else ok & subset[positions]
            if not use.any():
                continue
            start = time.perf_counter()
            scores[setting].append(model.predict(images[use]))
            seconds[setting] += time.perf_counter() - start
            rows[setting].append(positions[use])
    return scores, rows


def _figures(
    kind: str,
    path: str,
    quantization: str,
    got: np.ndarray,
    picked: np.ndarray,
    reference: _Reference,
    seconds: float,
) -> ExportCheck:
    """One model's ExportCheck from its scores `got` of the test images at rows `picked`."""
    want = reference.scores[picked]
    return ExportCheck(
        format=kind,
        path=path,
        quantization=quantization,
        images=len(picked),
        accuracy=reference.head.accuracy(got, reference.labels[picked], reference.thresholds),
        agreement=float(np.mean(got.argmax(1) == want.argmax(1))),
        max_score_difference=float(np.abs(got - want).max(initial=0.0)),
        seconds=seconds,
    )


def _log_checks(checks: list[ExportCheck], float_accuracy: float) -> None:
    for c in checks:
        kind = c.format if c.quantization == "none" else f"{c.format} ({c.quantization})"
        log.info(
            "Export check: %s %s: accuracy %.1f%%%s, top-1 agrees with the float model on "
            "%.1f%% of %d test images (scores within %.2g); %.1f s",
            kind,
            c.path,
            100 * c.accuracy,
            f" (float model {100 * float_accuracy:.1f}%)",
            100 * c.agreement,
            c.images,
            c.max_score_difference,
            c.seconds,
        )
