"""Decoding encoded images inside a TensorFlow graph, as close to retrain.data.decode (Pillow) as
TensorFlow's decoders allow: for the SavedModel signature that takes image files' bytes.

A JPEG is decoded at the DCT scale Pillow's draft mode picks (1/2, 1/4 or 1/8 of its size when
that still covers the model's input), which is what extraction and evaluation saw; PNG, GIF
(first frame) and BMP are decoded whole. Then the one resize of retrain.data.preprocess. What
differs from Pillow: EXIF orientation is not applied (a photo stored sideways stays sideways),
transparency is dropped rather than composited on white, and CMYK JPEGs and WebP do not decode.
"""

from __future__ import annotations

import tensorflow as tf

from retrain.data.preprocess import to_module_input

JPEG_MAGIC = b"\xff\xd8\xff"
DCT_SCALES = (8, 4, 2, 1)  # Pillow's draft() tries these, largest first


def decode_to_input(data: tf.Tensor, input_size: tuple[int, int]) -> tf.Tensor:
    """The module input (float32 [h, w, 3] in [0, 1]) of one encoded image (a scalar string:
    JPEG, PNG, GIF or BMP). Raises InvalidArgumentError for bytes that do not decode."""
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), JPEG_MAGIC)
    pixels = tf.cond(
        is_jpeg,
        lambda: _decode_jpeg_draft(data, max(input_size)),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    pixels.set_shape([None, None, 3])
    return to_module_input(pixels, input_size)


def _decode_jpeg_draft(data: tf.Tensor, side: int) -> tf.Tensor:
    """A JPEG decoded at the largest DCT scale 1/r with r <= min(width, height) // side, the
    rule of Pillow's JpegImageFile.draft for a request of (side, side)."""
    shape = tf.io.extract_jpeg_shape(data)
    fits = tf.minimum(shape[0] // side, shape[1] // side)
    branch = tf.reduce_min(
        tf.where(fits >= tf.constant(DCT_SCALES), tf.range(len(DCT_SCALES)), len(DCT_SCALES) - 1)
    )
    return tf.switch_case(
        branch,
        [
            lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE")
            for r in DCT_SCALES
        ],
    )
