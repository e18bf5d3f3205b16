"""A TFLite image model run with LiteRT (ai-edge-litert): one float32 input ``[n, h, w, 3]``,
one output ``[n, k]``.

Shared by the extraction backend (``retrain.bottlenecks.backends``) and ``retrain.export.loading``
(label-image
and the post-export check), which each check their callers' inputs and word their own errors.
Importing this module, loading a model and running it never import TensorFlow.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from retrain.utils.runtime import quiet_stderr, usable_cpus

__all__ = ["TFLITE_IDENTIFIER", "SignatureError", "TFLiteModel", "is_tflite_file"]

TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4..8 of every .tflite file


def is_tflite_file(path: str | os.PathLike[str]) -> bool:
    """Whether the file carries TFLite's flatbuffer identifier; raises OSError if unreadable."""
    with open(path, "rb") as handle:
        return handle.read(8)[4:8] == TFLITE_IDENTIFIER


class SignatureError(ValueError):
    """The model's inputs and outputs are not what ``TFLiteModel`` runs.

    ``part`` says what is wrong: ``"count"`` (not one input and one output), ``"input"`` (not
    float32 ``[n, h, w, 3]``, nor quantized int8 or uint8 of that shape) or ``"output"`` (not
    ``[n, k]``, or not the required dtype).
    ``inputs`` and ``outputs`` are LiteRT's tensor details, for callers that word it their way.
    """

    def __init__(self, part: str, inputs: list[dict], outputs: list[dict]) -> None:
        super().__init__(_describe(part, inputs, outputs))
        self.part, self.inputs, self.outputs = part, inputs, outputs


def _describe(part: str, inputs: list[dict], outputs: list[dict]) -> str:
    if part == "count":
        return f"expected 1 input and 1 output, got {len(inputs)} and {len(outputs)}"
    (tensor,) = inputs if part == "input" else outputs
    wanted = "[N,H,W,3]" if part == "input" else "[N,D]"
    return f"{part} is {tensor['dtype'].__name__} {list(tensor['shape'])}, not {wanted}"


def _check_signature(inputs: list[dict], outputs: list[dict], output_dtype: Any) -> None:
    if len(inputs) != 1 or len(outputs) != 1:
        raise SignatureError("count", inputs, outputs)
    (tensor_in,), (tensor_out,) = inputs, outputs
    in_shape, out_shape = list(tensor_in["shape"]), list(tensor_out["shape"])
    in_ok = tensor_in["dtype"] == np.float32 or _scale(tensor_in) is not None
    if not in_ok or len(in_shape) != 4 or in_shape[3] != 3:
        raise SignatureError("input", inputs, outputs)
    out_dtype = np.float32 if _scale(tensor_out) is not None else tensor_out["dtype"]
    if (output_dtype is not None and out_dtype != output_dtype) or len(out_shape) != 2:
        raise SignatureError("output", inputs, outputs)


def _scale(tensor: dict) -> tuple[float, int] | None:
    """(scale, zero point) of an int8 or uint8 tensor quantized per tensor, else None."""
    scale, zero_point = tensor.get("quantization", (0.0, 0))
    if tensor["dtype"] not in (np.int8, np.uint8) or not scale:
        return None
    return float(scale), int(zero_point)


class TFLiteModel:
    """A LiteRT interpreter for a float32 image model, run on batches of any length.

    A model with quantized int8 (or uint8) input or output tensors (a full-integer model's
    integer I/O) takes and gives float32 all the same: inputs are quantized and outputs
    dequantized with the tensors' scale and zero point.

    ``batch_size`` images at most per invocation (None: a whole batch in one); the interpreter
    is resized when a batch or its final chunk has another shape, which costs well under 1 ms
    once XNNPACK has packed the weights. Calls are serialised by a lock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_threads: int | None = None,
        batch_size: int | None = None,
        output_dtype: Any = None,
    ) -> None:
        """Load the model at ``path`` on ``num_threads`` threads (default: every CPU this
        process may use) and allocate it for ``batch_size`` images (None: its own batch size).

        ``output_dtype``, if given, is required of the output. Raises ImportError without
        ai-edge-litert, SignatureError for a model of another shape, and LiteRT's ValueError
        or RuntimeError for a file it cannot load.
        """
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.batch_size = batch_size
        self._interpreter = Interpreter(
            model_path=os.fspath(path), num_threads=num_threads or usable_cpus()
        )
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        _check_signature(inputs, outputs, output_dtype)
        (tensor_in,), (tensor_out,) = inputs, outputs
        # The shape the model was saved with, then with -1 where a dimension is not fixed.
        self.input_shape = tuple(int(d) for d in tensor_in["shape"])
        self.input_signature = tuple(int(d) for d in tensor_in["shape_signature"])
        self.output_width = int(tensor_out["shape"][1])
        self._in_scale, self._out_scale = _scale(tensor_in), _scale(tensor_out)
        self.quantized_input = self._in_scale is not None
        self._in_dtype = np.dtype(tensor_in["dtype"])
        self._out_dtype = np.dtype(tensor_out["dtype"])
        self.output_dtype = np.dtype(np.float32) if self._out_scale else self._out_dtype
        self._input, self._output = tensor_in["index"], tensor_out["index"]
        self._lock = threading.Lock()
        self._allocated: tuple[int, ...] | None = None
        with quiet_stderr():  # LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            self._allocate((batch_size or self.input_shape[0], *self.input_shape[1:]))

    def run(self, images: np.ndarray) -> np.ndarray:
        """The outputs ``[n, k]`` for images ``[n, h, w, 3]`` (made float32), ``[0, k]`` for
        an empty batch without running the model. The caller checks that ``h`` and ``w`` are
        those the model fixes; LiteRT raises ValueError or RuntimeError otherwise."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        outputs = np.empty((len(images), self.output_width), self.output_dtype)
        if len(images) == 0:
            return outputs
        step = self.batch_size or len(images)
        with self._lock:
            for start in range(0, len(images), step):
                chunk = images[start : start + step]
                self._allocate(chunk.shape)
                self._interpreter.set_tensor(self._input, self._quantized(chunk))
                self._interpreter.invoke()
                result = self._interpreter.get_tensor(self._output)
                if self._out_scale:
                    scale, zero_point = self._out_scale
                    result = (result.astype(np.float32) - zero_point) * np.float32(scale)
                outputs[start : start + len(chunk)] = result
        return outputs

    def _quantized(self, images: np.ndarray) -> np.ndarray:
        """`images` as the input tensor takes them: as they are, or quantized."""
        if not self._in_scale:
            return images
        scale, zero_point = self._in_scale
        info = np.iinfo(self._in_dtype)
        values = np.round(images / np.float32(scale)) + zero_point
        return np.clip(values, info.min, info.max).astype(self._in_dtype)

    def _allocate(self, shape: tuple[int, ...]) -> None:
        if shape != self._allocated:
            self._interpreter.resize_tensor_input(self._input, list(shape))
            self._interpreter.allocate_tensors()
            self._allocated = shape
