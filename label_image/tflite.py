"""Running an exported TFLite classifier (``.tflite``) with ai-edge-litert, without TensorFlow.

Importing this module, loading a model and classifying never import TensorFlow, which keeps
label-image's cold start short.
"""

from __future__ import annotations

import os

import numpy as np

from label_image.models import ModelLoadError
from retrain.errors import first_line
from retrain.tflite_model import SignatureError, TFLiteModel, is_tflite_file


class TFLiteClassifier:
    """A float32 TFLite model mapping images ``[n, h, w, 3]`` to scores ``[n, classes]``.

    Raises ModelLoadError (one line) for a missing, unreadable or unusable file. Calls from
    several threads are run one at a time.
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError:
            raise ModelLoadError(
                f"{path}: .tflite models need the ai-edge-litert package "
                "(pip install ai-edge-litert)"
            ) from None
        try:
            is_tflite = is_tflite_file(path)
        except OSError as err:
            raise ModelLoadError(f"cannot read {path}: {err.strerror or err}") from None
        if not is_tflite:
            raise ModelLoadError(f"{path} is not a TFLite (.tflite) model file")
        try:
            self._model = TFLiteModel(path, num_threads)
        except SignatureError as err:
            raise ModelLoadError(_signature_problem(path, err)) from None
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"cannot load {path}: {first_line(err)}") from None
        self.path = self._model.path
        self._shape = list(self._model.input_signature)

    def input_size(self) -> tuple[int | None, int | None]:
        """(height, width) of the model's input, None where not fixed."""
        height, width = self._shape[1], self._shape[2]
        return (height if height > 0 else None, width if width > 0 else None)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Scores [n, classes] for a float32 batch [n, h, w, 3]."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"expected a batch [n, h, w, 3], got shape {list(batch.shape)}")
        if len(batch) and (
            batch.shape[3] != 3
            or any(
                want > 0 and got != want for want, got in zip(self._shape[1:3], batch.shape[1:3])
            )
        ):
            raise ValueError(
                f"expected a batch [n, {self._shape[1]}, {self._shape[2]}, 3], "
                f"got shape {list(batch.shape)}"
            )
        return self._model.run(batch)


def _signature_problem(path: str | os.PathLike, err: SignatureError) -> str:
    """label-image's wording of a model whose inputs or outputs it cannot use."""
    if err.part == "count":
        return (
            f"{path}: expected one input and one output, "
            f"found {len(err.inputs)} and {len(err.outputs)}"
        )
    if err.part == "input":
        (tensor,) = err.inputs
        shape = [int(d) for d in tensor["shape_signature"]]
        return (
            f"{path}: input is {np.dtype(tensor['dtype']).name} "
            f"{shape}, not float32 images [n, h, w, 3]"
        )
    (tensor,) = err.outputs
    return f"{path}: output shape {list(tensor['shape'])} is not [n, k]"
