"""Turning decoded pixels into a module's input: the one resize used everywhere.

Extraction, the exported graphs' clients and label-image all resize the same way, so features
at training time match those at inference time.
"""

from __future__ import annotations

import tensorflow as tf

# Part of the bottleneck cache key: change it whenever decoding or resizing changes.
PREPROCESSING_ID = "pillow-draft-rgb8/tf-resize-bilinear/scale-1-255/v1"


def to_module_input(image_uint8: tf.Tensor, input_size: tuple[int, int]) -> tf.Tensor:
    """Resize uint8 [..., h, w, 3] pixels bilinearly to `input_size`, as float32 in [0, 1]."""
    # ResizeBilinear reads uint8 itself, with the same float arithmetic as on a float32 copy
    # (bit for bit, so cached vectors stay valid): no full-size float32 copy, 4 bytes a pixel
    # of the original (1 GB for a 90-megapixel image) per image being decoded in parallel.
    image = tf.image.resize(image_uint8, input_size, method="bilinear")
    return image / 255.0
