"""Bilinear resizing in NumPy, equal to tf.image.resize(method="bilinear", antialias=False).

For clients that must start fast without importing TensorFlow (label-image on a .tflite).
"""

from __future__ import annotations

import numpy as np


def resize_bilinear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize pixels [h, w, c] to `size` (height, width) as float32, computed the way
    ``tf.image.resize(method="bilinear")`` does (half-pixel centres, no antialiasing), so a
    TFLite model sees what retrain's extraction fed the module, without importing TensorFlow.

    Bit-equal to TensorFlow: the same float32 operations in the same order, done separably.
    Each input row used is interpolated across once (TensorFlow's `top` and `bottom` rows are
    such rows), then output rows are interpolated between them.
    """
    pixels = np.asarray(pixels)
    height, width, channels = pixels.shape
    out_height, out_width = size
    rows_lo, rows_hi, row_frac = _interpolation(height, out_height)
    cols_lo, cols_hi, col_frac = _interpolation(width, out_width)
    rows = np.union1d(rows_lo, rows_hi)  # the input rows used, sorted
    source = pixels[rows] if len(rows) < height else pixels
    # Gather only the pixels used, then convert: far cheaper than converting the whole image.
    across, right = (
        source.take(cols, axis=1).reshape(len(rows), -1).astype(np.float32)
        for cols in (cols_lo, cols_hi)
    )
    # Weights spelled out per value of a row (width x channels): broadcast over a last axis
    # of 3, NumPy would loop 3 values at a time, several times slower.
    right -= across
    right *= np.repeat(col_frac, channels)
    across += right
    top = across.take(np.searchsorted(rows, rows_lo), axis=0)
    bottom = across.take(np.searchsorted(rows, rows_hi), axis=0)
    bottom -= top
    bottom *= row_frac[:, None]
    top += bottom
    return top.reshape(out_height, out_width, channels)


def _interpolation(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's source indices (lower, upper) and weights of the upper, in float32."""
    scale = np.float32(size_in) / np.float32(size_out)
    centres = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centres)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(centres), size_in - 1).astype(np.intp)
    return lower, upper, (centres - floor).astype(np.float32)
