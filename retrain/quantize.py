"""Quantizing the TFLite export with the TFLite converter.

`none` keeps float32; `dynamic` stores int8 weights (activations stay float); `float16` stores
float16 weights; `int8` makes weights and activations int8, with the activations' ranges
calibrated on a representative dataset: a fixed, seeded pick of training images, decoded and
resized exactly as for extraction. Input and output stay float32 unless int8 I/O is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from retrain import extract
from retrain.features import random_picks

# Images the int8 ranges are calibrated on: the converter's guidance is "a few hundred".
CALIBRATION_IMAGES = 300


def calibration_paths(
    paths: Sequence[str], count: int = CALIBRATION_IMAGES, seed: int = 0
) -> list[str]:
    """A seeded random `count` of `paths` (all of them if fewer), in their order: the same
    images for the same training split and seed."""
    return [paths[i] for i in random_picks(len(paths), count, seed)]


def representative_dataset(
    paths: Sequence[str], input_size: tuple[int, int], max_pixels: int
) -> Callable[[], Iterator[list[np.ndarray]]]:
    """The converter's representative dataset: each image of `paths` that decodes, as a float32
    batch [1, h, w, 3] in [0, 1], resized as extraction resizes."""

    def images() -> Iterator[list[np.ndarray]]:
        batches = extract.decoded_batches(list(paths), input_size, 1, {}, max_pixels)
        for _, pixels, ok in batches:
            if bool(ok.numpy()[0]):
                yield [pixels.numpy()]

    return images


def configure(
    converter: tf.lite.TFLiteConverter,
    mode: str,
    representative: Callable[[], Iterator[list[np.ndarray]]] | None = None,
    int8_io: bool = False,
) -> None:
    """Set `converter` up for quantization `mode` (one of config.QUANTIZATIONS); `int8` needs
    `representative` (see representative_dataset) and with `int8_io` takes and gives int8
    tensors. Raises ValueError for an unknown mode or int8 without a representative dataset."""
    if mode == "none":
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "dynamic":
        return
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
        return
    if mode != "int8":
        raise ValueError(f"unknown quantization {mode!r}")
    if representative is None:
        raise ValueError("int8 quantization needs a representative dataset")
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
