"""Running an exported TFLite classifier (``.tflite``) with ai-edge-litert, without TensorFlow.

Importing this module, loading a model and classifying never import TensorFlow, which keeps
label-image's cold start short.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from label_image.models import ModelLoadError
from retrain.errors import first_line
from retrain.runtime import quiet_stderr, usable_cpus

_TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4..8 of every .tflite file


class TFLiteClassifier:
    """A float32 TFLite model mapping images ``[n, h, w, 3]`` to scores ``[n, classes]``.

    Raises ModelLoadError (one line) for a missing, unreadable or unusable file. Not safe to
    call from several threads at once.
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ModelLoadError(
                f"{path}: .tflite models need the ai-edge-litert package "
                "(pip install ai-edge-litert)"
            ) from None
        try:
            with open(path, "rb") as handle:
                header = handle.read(8)
        except OSError as err:
            raise ModelLoadError(f"cannot read {path}: {err.strerror or err}") from None
        if header[4:8] != _TFLITE_IDENTIFIER:
            raise ModelLoadError(f"{path} is not a TFLite (.tflite) model file")
        try:
            self.interpreter = Interpreter(
                model_path=os.fspath(path), num_threads=num_threads or usable_cpus()
            )
            inputs = self.interpreter.get_input_details()
            outputs = self.interpreter.get_output_details()
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"cannot load {path}: {first_line(err)}") from None
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelLoadError(
                f"{path}: expected one input and one output, found {len(inputs)} and {len(outputs)}"
            )
        (tensor_in,), (tensor_out,) = inputs, outputs
        self._shape = [int(d) for d in tensor_in["shape_signature"]]
        if tensor_in["dtype"] != np.float32 or len(self._shape) != 4 or self._shape[3] != 3:
            raise ModelLoadError(
                f"{path}: input is {np.dtype(tensor_in['dtype']).name} "
                f"{self._shape}, not float32 images [n, h, w, 3]"
            )
        if len(tensor_out["shape"]) != 2:
            raise ModelLoadError(f"{path}: output shape {list(tensor_out['shape'])} is not [n, k]")
        self.path = Path(path)
        self._input, self._output = tensor_in["index"], tensor_out["index"]
        self._allocated: list[int] | None = None
        try:
            with quiet_stderr():  # LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate"
                self._allocate([int(d) for d in tensor_in["shape"]])
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"cannot load {path}: {first_line(err)}") from None

    def input_size(self) -> tuple[int | None, int | None]:
        """(height, width) of the model's input, None where not fixed."""
        height, width = self._shape[1], self._shape[2]
        return (height if height > 0 else None, width if width > 0 else None)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Scores [n, classes] for a float32 batch [n, h, w, 3]."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"expected a batch [n, h, w, 3], got shape {list(batch.shape)}")
        if len(batch) == 0:
            classes = int(self.interpreter.get_output_details()[0]["shape"][1])
            return np.zeros((0, classes), np.float32)
        if batch.shape[3] != 3 or any(
            want > 0 and got != want for want, got in zip(self._shape[1:3], batch.shape[1:3])
        ):
            raise ValueError(
                f"expected a batch [n, {self._shape[1]}, {self._shape[2]}, 3], "
                f"got shape {list(batch.shape)}"
            )
        self._allocate(list(batch.shape))
        self.interpreter.set_tensor(self._input, batch)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output)

    def _allocate(self, shape: list[int]) -> None:
        if shape != self._allocated:
            self.interpreter.resize_tensor_input(self._input, shape)
            self.interpreter.allocate_tensors()
            self._allocated = shape
