"""Loading an exported classifier and running it on batches of images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class ModelLoadError(Exception):
    """The model file cannot be used; the message says why."""


class FrozenGraphClassifier:
    """A frozen GraphDef run the TF1 way: import_graph_def + Session, like label_image.py."""

    def __init__(self, path: str | os.PathLike, input_layer: str, output_layer: str):
        import tensorflow as tf
        from google.protobuf.message import DecodeError

        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise ModelLoadError(f"cannot read {path}: {err.strerror}") from None
        graph_def = tf.compat.v1.GraphDef()
        try:
            graph_def.ParseFromString(data)
        except (DecodeError, RuntimeWarning, ValueError):
            raise ModelLoadError(f"{path} is not a TensorFlow GraphDef (.pb) file") from None
        names = {node.name for node in graph_def.node}
        if not names:
            raise ModelLoadError(f"{path} is not a TensorFlow GraphDef (.pb) file")
        for flag, name in (("--input_layer", input_layer), ("--output_layer", output_layer)):
            if name not in names:
                raise ModelLoadError(f"{flag}: no node named {name!r} in {path}")
        self.graph = tf.Graph()
        with self.graph.as_default():
            try:
                tf.compat.v1.import_graph_def(graph_def, name="")
            except (ValueError, tf.errors.OpError) as err:
                raise ModelLoadError(f"cannot load {path}: {str(err).splitlines()[0]}") from None
        self.input = self.graph.get_tensor_by_name(f"{input_layer}:0")
        self.output = self.graph.get_tensor_by_name(f"{output_layer}:0")
        self.session = tf.compat.v1.Session(graph=self.graph)

    def input_size(self) -> tuple[int | None, int | None]:
        """(height, width) of the input placeholder, None where not fixed."""
        shape = self.input.shape
        if shape.rank != 4:
            return None, None
        return shape[1], shape[2]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Scores [n, classes] for a float32 batch [n, h, w, 3]; an empty batch is not run
        (TensorFlow's oneDNN kernels fail on zero images on some CPUs)."""
        if len(batch) == 0:
            return np.zeros((0, self.output.shape[-1] or 0), np.float32)
        return self.session.run(self.output, {self.input: batch})
