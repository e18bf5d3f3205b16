"""Bilinear resizing in NumPy, equal to tf.image.resize(method="bilinear", antialias=False).

For clients that must start fast without importing TensorFlow (label-image on a .tflite).
"""

from __future__ import annotations

import numpy as np


def resize_bilinear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize pixels [h, w, c] to `size` (height, width) as float32, computed the way
    ``tf.image.resize(method="bilinear")`` does (half-pixel centres, no antialiasing), so a
    TFLite model sees what retrain's extraction fed the module, without importing TensorFlow."""
    pixels = np.asarray(pixels)
    height, width, channels = pixels.shape
    rows_lo, rows_hi, row_frac = _interpolation(height, size[0])
    cols_lo, cols_hi, col_frac = _interpolation(width, size[1])
    flat = pixels.reshape(height * width, channels)

    def corner(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        # Gather only the pixels used, then convert: far cheaper than converting the whole image.
        picks = (rows[:, None] * width + cols[None, :]).ravel()
        return flat.take(picks, axis=0).reshape(size[0], size[1] * channels).astype(np.float32)

    top, top_right = corner(rows_lo, cols_lo), corner(rows_lo, cols_hi)
    bottom, bottom_right = corner(rows_hi, cols_lo), corner(rows_hi, cols_hi)
    # Weights spelled out per value of an output row (width x channels): broadcast over a last
    # axis of 3, NumPy would loop 3 values at a time, several times slower.
    col_frac = np.repeat(col_frac, channels)
    row_frac = row_frac[:, None]
    # The same operations in the same order as TensorFlow's kernel, in place.
    top_right -= top
    top_right *= col_frac
    top += top_right
    bottom_right -= bottom
    bottom_right *= col_frac
    bottom += bottom_right
    bottom -= top
    bottom *= row_frac
    top += bottom
    return top.reshape(size[0], size[1], channels)


def _interpolation(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's source indices (lower, upper) and weights of the upper, in float32."""
    scale = np.float32(size_in) / np.float32(size_out)
    centres = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centres)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(centres), size_in - 1).astype(np.intp)
    return lower, upper, (centres - floor).astype(np.float32)
