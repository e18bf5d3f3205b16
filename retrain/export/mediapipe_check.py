"""The export check's run of a .tflite through MediaPipe Tasks' own ImageClassifier.

MediaPipe Tasks (Android, iOS, web, Python) is where the .tflite goes on a device: its
ImageClassifier reads the file's metadata (normalization, label names) and resizes the image
itself. When the optional `mediapipe` package is installed, the export check runs the .tflite
through it on the test images, decoded as retrain decodes them, and measures, by label name, its
accuracy and top-1 agreement with the float model twice: on images resized as retrain resizes
them (what the file does; the agreement floors apply) and on whole images that MediaPipe
resizes itself (what a phone sees; its resize samples half a pixel off ours). Without
`mediapipe` nothing here runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Sequence

import numpy as np

from retrain.data.decode import ImageDecodeError, decode_image
from retrain.data.resize import resize_bilinear
from retrain.errors import first_line
from retrain.export.tflite_metadata import carried, read_metadata
from retrain.utils.interrupt import check as check_interrupt

log = logging.getLogger("retrain")

# The checks' format names in --metrics_json: MediaPipe on images retrain resized to the input
# size (the file itself: metadata, normalization, quantization, labels), and on whole images,
# resized by MediaPipe (which samples at other points than retrain's resize, see
# docs/deployment.md#mediapipe).
MEDIAPIPE, OWN_RESIZE = "mediapipe", "mediapipe_own_resize"
# Least top-1 agreement with the float model, per quantization: what the TFLite interpreter
# gives on real photos; below it the log warns.
AGREEMENT_FLOORS = {"none": 0.995, "float16": 0.995, "dynamic": 0.97, "int8": 0.97}


def available() -> bool:
    """Whether the `mediapipe` package is installed (it is not imported here)."""
    return importlib.util.find_spec("mediapipe") is not None


class MediaPipeError(Exception):
    """MediaPipe cannot run the model, or returns scores without label names."""


def mediapipe_scores(
    path: str | os.PathLike, images: Sequence[str], max_pixels: int, size: tuple[int, int]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({MEDIAPIPE: scores [n, k], OWN_RESIZE: scores [n, k]}, rows): MediaPipe's
    ImageClassifier's scores of the image files `images` that decode (their rows), by the label
    names of the .tflite at `path`, in the order of its labels. MEDIAPIPE's images are resized
    to the model's input `size` (height, width) as retrain resizes them (MediaPipe's own resize
    is then the identity), OWN_RESIZE's are whole. Raises MediaPipeError when MediaPipe cannot
    load the model or gives a name the model's labels lack."""
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    labels = carried(path).labels or []
    column = {label: i for i, label in enumerate(labels)}
    options = vision.ImageClassifierOptions(
        base_options=BaseOptions(model_asset_path=os.fspath(path)), max_results=-1
    )
    try:
        classifier = vision.ImageClassifier.create_from_options(options)
    except (RuntimeError, ValueError, OSError) as err:
        raise MediaPipeError(first_line(err)) from None
    scores: dict[str, list[np.ndarray]] = {MEDIAPIPE: [], OWN_RESIZE: []}
    rows = []
    with classifier:
        for row, image_path in enumerate(images):
            check_interrupt()
            try:
                pixels = decode_image(image_path, max_pixels=max_pixels)
            except ImageDecodeError:
                continue
            resized = np.round(resize_bilinear(pixels, size)).astype(np.uint8)
            for variant, data in ((MEDIAPIPE, resized), (OWN_RESIZE, pixels)):
                image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(data))
                (head,) = classifier.classify(image).classifications
                scores[variant].append(_by_name(head.categories, column, path))
            rows.append(row)
    shape = (len(rows), len(labels))
    return {k: np.array(v, np.float32).reshape(shape) for k, v in scores.items()}, np.array(rows)


def _by_name(categories, column: dict[str, int], path) -> np.ndarray:
    """One image's scores in the order of the labels, each put where its name says."""
    row = np.zeros(len(column), np.float32)
    for category in categories:
        if category.category_name not in column:
            raise MediaPipeError(
                f"{path}: MediaPipe gives a category named {category.category_name!r}, "
                "which is not one of the model's labels"
            )
        row[column[category.category_name]] = category.score
    return row


def timed_scores(
    path: str, images: Sequence[str], max_pixels: int, size: tuple[int, int]
) -> tuple[dict[str, np.ndarray], np.ndarray, float] | None:
    """mediapipe_scores and the seconds they took; None for a file without metadata (not one
    retrain writes today: MediaPipe refuses it), and None (logged) when MediaPipe cannot run
    the model: an int8-input model, which MediaPipe refuses, or a problem of MediaPipe's,
    which does not fail the run since the model itself was checked."""
    if read_metadata(path) is None:
        return None
    start = time.perf_counter()
    try:
        scores, rows = mediapipe_scores(path, images, max_pixels, size)
    except MediaPipeError as err:
        log.warning("Export check: MediaPipe's ImageClassifier cannot run %s: %s", path, err)
        return None
    return scores, rows, time.perf_counter() - start


def warn_below_floor(quantization: str, agreement: float, path: str) -> None:
    """Warn when MediaPipe's top-1 agreement with the float model is under its floor."""
    floor = AGREEMENT_FLOORS.get(quantization)
    if floor is not None and agreement < floor:
        log.warning(
            "Export check: MediaPipe's top-1 on %s agrees with the float model on %.1f%% of "
            "the test images, under the %.1f%% expected of %s",
            path,
            100 * agreement,
            100 * floor,
            "a float model" if quantization == "none" else f"{quantization} quantization",
        )
