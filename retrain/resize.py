"""Bilinear resizing in NumPy, equal to tf.image.resize(method="bilinear", antialias=False).

For clients that must start fast without importing TensorFlow (label-image on a .tflite).
"""

from __future__ import annotations

import numpy as np


def resize_bilinear(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize pixels [h, w, c] to `size` (height, width) as float32, computed the way
    ``tf.image.resize(method="bilinear")`` does (half-pixel centres, no antialiasing), so a
    TFLite model sees what retrain's extraction fed the module, without importing TensorFlow."""
    image = np.asarray(pixels, np.float32)
    rows_lo, rows_hi, row_frac = _interpolation(image.shape[0], size[0])
    cols_lo, cols_hi, col_frac = _interpolation(image.shape[1], size[1])
    col_frac = col_frac[None, :, None]
    top, bottom = image[rows_lo], image[rows_hi]
    top = top[:, cols_lo] + (top[:, cols_hi] - top[:, cols_lo]) * col_frac
    bottom = bottom[:, cols_lo] + (bottom[:, cols_hi] - bottom[:, cols_lo]) * col_frac
    return top + (bottom - top) * row_frac[:, None, None]


def _interpolation(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's source indices (lower, upper) and weights of the upper, in float32."""
    scale = np.float32(size_in) / np.float32(size_out)
    centres = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centres)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(centres), size_in - 1).astype(np.intp)
    return lower, upper, (centres - floor).astype(np.float32)
