"""Bilinear resizing in NumPy, equal to tf.image.resize(method="bilinear", antialias=False).

For clients that must start fast without importing TensorFlow (label-image on a .tflite).
"""

from __future__ import annotations

import numpy as np


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (low, high) and the weight of `high`, with half-pixel centres."""
    scale = in_size / out_size
    centres = (np.arange(out_size) + 0.5) * scale - 0.5
    centres = np.clip(centres, 0, None)
    low = np.floor(centres).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    low = np.minimum(low, in_size - 1)
    return low, high, (centres - low).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an [h, w, c] image to `size` (height, width); returns float32."""
    image = np.asarray(image, dtype=np.float32)
    top, bottom, wy = _axis_weights(image.shape[0], size[0])
    left, right, wx = _axis_weights(image.shape[1], size[1])
    rows = image[top] * (1 - wy)[:, None, None] + image[bottom] * wy[:, None, None]
    return rows[:, left] * (1 - wx)[None, :, None] + rows[:, right] * wx[None, :, None]
