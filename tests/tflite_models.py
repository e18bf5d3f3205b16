"""Tiny TFLite models converted on the fly, for the tests of the LiteRT wrappers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf


class TinyClassifier(tf.Module):
    """Mean colour -> 4 softmax scores, on non-square 12x10 images."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = tf.constant(rng.normal(size=(3, 4)).astype(np.float32))
        self.b = tf.constant(rng.normal(size=(4,)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 12, 10, 3], tf.float32)])
    def __call__(self, images):
        return tf.nn.softmax(tf.reduce_mean(images, axis=[1, 2]) @ self.w + self.b)


def write_tflite(path: Path, function, trackable=None) -> Path:
    """Convert the tf.function ``function`` (with an input signature) to ``path``."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], trackable
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(converter.convert())
    return path


def write_tiny_classifier(path: Path) -> tuple[Path, TinyClassifier]:
    """A TinyClassifier converted to ``path``, and the model itself for reference scores."""
    model = TinyClassifier()
    return write_tflite(path, model.__call__, model), model
