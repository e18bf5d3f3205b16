"""Quantizing the TFLite export with the TFLite converter.

`none` keeps float32; `dynamic` stores int8 weights (activations stay float); `float16` stores
float16 weights; `int8` makes weights and activations int8 (every op, a full-integer model),
with the activations' ranges calibrated on a representative dataset: a fixed, seeded pick of
training images, decoded and resized exactly as for extraction. Input and output stay float32
unless int8 I/O is asked for.

The converter sets each activation's int8 range to the smallest and largest value seen in
calibration. A few extreme values then stretch the range of many tensors (the projection layers
of EfficientNet-Lite: their least-error ranges are a quarter to three quarters of it), so the
256 steps are coarse where the values are; and a range is sometimes wider than any value seen
(the module's `x * 255` input scaling got [-127, 255]). Rounding errors of the 60 layers add
up: on clothing_dev, the int8 model's features were 17% off the float ones and its top label
differed on 5.6% of the test photos. So each range is tuned (tuned_ranges): within what the
activations really span on TUNING_IMAGES calibration images, the range whose int8 rounding and
clipping has the least squared error on them (a histogram of every value) is kept: there,
13% and 3.1%. Rounding the weights to int8 also shifts each output channel's mean by the
rounding error times the mean input; the bias of every convolution and dense layer is corrected
by that shift, measured on the same images (corrected_biases; "bias correction" of Nagel et
al., Data-Free Quantization, 2019): there, 8% and 2.5-1.5% (README, Deploying).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice

import numpy as np
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.python.convert import mlir_quantize
from tensorflow.lite.tools import flatbuffer_utils

from retrain.data.decode import ImageDecodeError, decode_image
from retrain.data.preprocess import to_module_input
from retrain.data.sampling import random_picks

# Images the int8 ranges are calibrated on: the converter's guidance is "a few hundred".
CALIBRATION_IMAGES = 300
# Of those, the images whose activations tune the int8 ranges and biases (see tuned_ranges and
# corrected_biases).
TUNING_IMAGES = 100
HISTOGRAM_BINS = 2048  # per activation tensor, over its calibrated range
# The shares of an observed range's low and high end tried when tuning it.
RANGE_SHARES = np.linspace(0.05, 1.0, 20)


def calibration_paths(
    paths: Sequence[str], count: int = CALIBRATION_IMAGES, seed: int = 0
) -> list[str]:
    """A seeded random `count` of `paths` (all of them if fewer), in their order: the same
    images for the same training split and seed."""
    return [paths[i] for i in random_picks(len(paths), count, seed)]


# The converter's representative dataset: a callable giving an iterator of [batch] lists.
Representative = Callable[[], Iterator[list[np.ndarray]]]


def representative_dataset(
    paths: Sequence[str], input_size: tuple[int, int], max_pixels: int
) -> Representative:
    """The converter's representative dataset: each image of `paths` that decodes, as a float32
    batch [1, h, w, 3] in [0, 1], resized as extraction resizes."""

    def images() -> Iterator[list[np.ndarray]]:
        for path in paths:
            try:
                pixels = decode_image(path, input_size, max_pixels)
            except (ImageDecodeError, OSError):
                continue
            yield [to_module_input(pixels, input_size).numpy()[None]]

    return images


def configure(
    converter: tf.lite.TFLiteConverter,
    mode: str,
    representative: Representative | None = None,
    int8_io: bool = False,
) -> None:
    """Set `converter` up for quantization `mode` (one of config.QUANTIZATIONS); `int8` needs
    `representative` (see representative_dataset) and with `int8_io` takes and gives int8
    tensors. Raises ValueError for an unknown mode or int8 without a representative dataset."""
    if mode == "none":
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "dynamic":
        return
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
        return
    if mode != "int8":
        raise ValueError(f"unknown quantization {mode!r}")
    if representative is None:
        raise ValueError("int8 quantization needs a representative dataset")
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8


def describe(mode: str, int8_io: bool = False) -> str:
    """What `mode` (with `int8_io`) makes of the model, for the log."""
    if mode == "none":
        return "float32"
    if mode != "int8":
        return f"quantized: {mode}"
    ends = "int8" if int8_io else "float32, quantized at entry and dequantized at exit"
    how = "every op integer, activation ranges tuned, biases corrected"
    return f"quantized: int8, {how}; input and output {ends}"


def convert(
    converter: tf.lite.TFLiteConverter,
    mode: str,
    representative: Representative | None = None,
    int8_io: bool = False,
) -> bytes:
    """The TFLite flatbuffer of `converter` quantized as `mode` (see configure); for `int8`,
    with the activations' ranges tuned (see tuned_ranges) on `representative`'s first
    TUNING_IMAGES images before the weights and activations are quantized, and the biases then
    corrected on the same images (see corrected_biases)."""
    configure(converter, mode, representative, int8_io)
    if mode != "int8":
        return converter.convert()
    converter._experimental_calibrate_only = True  # noqa: SLF001 - the QuantizationDebugger's way
    calibrated = converter.convert()
    tuning = list(islice(representative(), TUNING_IMAGES))
    tuned = tuned_ranges(calibrated, iter(tuning))
    io_type = tf.int8 if int8_io else tf.float32
    quantized = mlir_quantize(tuned, input_data_type=io_type, output_data_type=io_type)
    return corrected_biases(quantized, calibrated, tuning)


def tuned_ranges(calibrated: bytes, images: Iterator[list[np.ndarray]]) -> bytes:
    """`calibrated` (a float TFLite model carrying each activation's calibrated min and max,
    the converter's calibrate-only output) with each activation's range but the input's
    replaced by the one of least int8 error on `images` (see least_error_range)."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    tensors = model.subgraphs[0].tensors
    ranged = {
        i: (min(float(t.quantization.min[0]), 0.0), max(float(t.quantization.max[0]), 0.0))
        for i, t in enumerate(tensors)
        if t.quantization is not None and t.quantization.min is not None
        if len(t.quantization.min) == 1
    }
    histograms = _activation_histograms(calibrated, images, ranged)
    for i, counts in histograms.items():
        low, high = least_error_range(counts, *ranged[i])
        tensors[i].quantization.min = [low]
        tensors[i].quantization.max = [high]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _activation_histograms(
    calibrated: bytes,
    images: Iterator[list[np.ndarray]],
    ranged: dict[int, tuple[float, float]],
) -> dict[int, np.ndarray]:
    """Per tensor of `ranged` ({index: (min, max)}) but the model's inputs, the counts of its
    values on `images` in HISTOGRAM_BINS bins over (min, max); none without images."""
    interpreter = _keeping_all_tensors(calibrated)
    inputs = {d["index"] for d in interpreter.get_input_details()}
    wanted = {i: r for i, r in ranged.items() if i not in inputs and r[1] > r[0]}
    counts = {i: np.zeros(HISTOGRAM_BINS, np.int64) for i in wanted}
    seen = False
    for _ in _invoked(interpreter, images):
        seen = True
        for i, (low, high) in wanted.items():
            counts[i] += np.histogram(interpreter.get_tensor(i), HISTOGRAM_BINS, (low, high))[0]
    return counts if seen else {}


def _keeping_all_tensors(model: bytes):  # -> ai_edge_litert Interpreter
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():  # "intended for debugging": keeping them is the point here
        warnings.simplefilter("ignore", UserWarning)
        return Interpreter(model_content=model, experimental_preserve_all_tensors=True)


def _invoked(interpreter, images: Iterable[list[np.ndarray]]) -> Iterator[None]:
    """Runs `interpreter` (one float input) on each of `images`, yielding after each run."""
    index = interpreter.get_input_details()[0]["index"]
    for n, (image,) in enumerate(images):
        if n == 0:  # the calibrated model's input may have a batch of any size
            interpreter.resize_tensor_input(index, image.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(index, image)
        interpreter.invoke()
        yield


# The layers whose biases absorb their weights' rounding (see corrected_biases).
_BIASED_LAYERS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# TFLite's TensorType codes of the tensors read here.
_TENSOR_TYPES = {0: np.float32, 2: np.int32, 9: np.int8}


def corrected_biases(
    quantized: bytes, calibrated: bytes, images: Sequence[list[np.ndarray]]
) -> bytes:
    """`quantized` (the int8 conversion of `calibrated`, the float model it was calibrated
    from) with the int32 bias of each convolution and dense layer lowered by the mean shift
    that rounding its weights adds to each output channel: (rounded - float weights) times the
    mean of each input channel, measured by running `calibrated` on `images`. Zero padding at
    the borders is not counted. Unchanged without images or layers found in both models."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(quantized))
    float_model = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    layers = _biased_layers(model)
    float_layers = _biased_layers(float_model)
    common = [name for name in layers if name in float_layers]
    if not images or not common:
        return quantized
    float_tensors = float_model.subgraphs[0].tensors
    inputs = {name: float_layers[name][1].inputs[0] for name in common}
    means = _channel_means(calibrated, set(inputs.values()), images)
    tensors = model.subgraphs[0].tensors
    for name in common:
        kind, op = layers[name]
        weights = tensors[op.inputs[1]]
        float_weights = _values(float_model, float_tensors[float_layers[name][1].inputs[1]])
        rounded = _dequantized(model, weights)
        if rounded.shape != float_weights.shape:
            continue
        shift = _rounding_shift(kind, rounded, float_weights, means[inputs[name]])
        bias = tensors[op.inputs[2]]
        scale = np.asarray(bias.quantization.scale, np.float64)
        corrected = _values(model, bias) - np.round(shift / scale).astype(np.int32)
        _own_buffer(model, bias).data = np.frombuffer(corrected.tobytes(), np.uint8)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _own_buffer(model, tensor):  # -> schema BufferT
    """The buffer of `tensor`, first given one of its own if another tensor shares it (the
    converter shares equal constants)."""
    if sum(t.buffer == tensor.buffer for t in model.subgraphs[0].tensors) > 1:
        model.buffers.append(schema.BufferT())
        tensor.buffer = len(model.buffers) - 1
    return model.buffers[tensor.buffer]


def _biased_layers(model) -> dict[str, tuple[str, object]]:
    """{output tensor name: (op kind, operator)} of the model's layers of _BIASED_LAYERS that
    have a bias and constant weights (int8 per channel in a quantized model, float32 in a
    float one)."""
    graph = model.subgraphs[0]
    layers = {}
    for op in graph.operators:
        kind = flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
        if kind not in _BIASED_LAYERS or len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        weights, bias = graph.tensors[op.inputs[1]], graph.tensors[op.inputs[2]]
        if (weights.type, bias.type) in ((9, 2), (0, 0)) and _has_data(model, weights):
            layers[graph.tensors[op.outputs[0]].name.decode()] = (kind, op)
    return layers


def _has_data(model, tensor) -> bool:
    data = model.buffers[tensor.buffer].data
    return data is not None and len(data) > 0


def _values(model, tensor) -> np.ndarray:
    data = bytes(model.buffers[tensor.buffer].data)
    return np.frombuffer(data, _TENSOR_TYPES[tensor.type]).reshape(tensor.shape).copy()


def _dequantized(model, weights) -> np.ndarray:
    scales = np.asarray(weights.quantization.scale, np.float64)
    shape = [1] * len(weights.shape)
    shape[weights.quantization.quantizedDimension] = -1
    return _values(model, weights) * scales.reshape(shape)


def _rounding_shift(
    kind: str, rounded: np.ndarray, weights: np.ndarray, input_means: np.ndarray
) -> np.ndarray:
    """The mean change of each output channel of a `kind` layer when `weights` become
    `rounded`, for inputs of `input_means` per channel (TFLite layouts: convolution
    [out, h, w, in], depthwise [1, h, w, in * multiplier], dense [out, in])."""
    error = rounded - weights
    if kind == "DEPTHWISE_CONV_2D":
        per_output = np.repeat(input_means, error.shape[3] // len(input_means))
        return error.sum(axis=(0, 1, 2)) * per_output
    if kind == "CONV_2D":
        return error.sum(axis=(1, 2)) @ input_means
    return error @ input_means


def _channel_means(
    model: bytes, tensors: set[int], images: Iterable[list[np.ndarray]]
) -> dict[int, np.ndarray]:
    """The mean of each channel (last axis) of each of `tensors` when `model` runs on `images`."""
    interpreter = _keeping_all_tensors(model)
    sums = dict.fromkeys(tensors, 0.0)
    count = 0
    for _ in _invoked(interpreter, images):
        count += 1
        for i in tensors:
            values = interpreter.get_tensor(i).astype(np.float64)
            sums[i] = sums[i] + values.reshape(-1, values.shape[-1]).mean(axis=0)
    return {i: total / max(count, 1) for i, total in sums.items()}


def least_error_range(counts: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The int8 range (low', high') of least squared rounding and clipping error for values
    histogrammed as `counts` over (low, high): low' and high' are shares (RANGE_SHARES) of the
    lowest and highest values seen (or 0 when all are >= 0), so the range only shrinks and
    always holds 0. Returns (low, high) unchanged for empty counts or values all near 0."""
    if not counts.any():
        return low, high
    edges = np.linspace(low, high, len(counts) + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    filled = np.flatnonzero(counts)
    # The outer edges of the outermost bins used; 0 for a side whose values all share 0's bin.
    seen_low = edges[filled[0]] if edges[filled[0] + 1] <= 0 else 0.0
    seen_high = edges[filled[-1] + 1] if edges[filled[-1]] >= 0 else 0.0
    if seen_high <= seen_low:  # all values in 0's bin: too few to tune a range on
        return low, high
    weights = counts / counts.sum()
    candidates = [
        (seen_low * a, seen_high * b)
        for a in (RANGE_SHARES if seen_low < 0 else [1.0])
        for b in (RANGE_SHARES if seen_high > 0 else [1.0])
    ]
    errors = [_rounding_error(centres, weights, *c) for c in candidates]
    return tuple(float(x) for x in candidates[int(np.argmin(errors))])


def _rounding_error(centres: np.ndarray, weights: np.ndarray, low: float, high: float) -> float:
    step = (high - low) / 255
    if step <= 0:
        return float(np.sum(weights * centres**2))
    rounded = np.clip(np.round((centres - low) / step), 0, 255) * step + low
    return float(np.sum(weights * (rounded - centres) ** 2))
