"""Tests of the TFLite export's quantization (retrain.models.quantize) and of the labels it carries
(retrain.export.tflite_labels), on a tiny model; the real module's figures are in the README."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.lite.python.convert import mlir_quantize
from tensorflow.lite.tools import flatbuffer_utils

from retrain.export.tflite_labels import embedded_labels, with_labels
from retrain.export.tflite_metadata import ModelInfo, carried, read_metadata, with_metadata
from retrain.models import quantize
from retrain.models.tflite import TFLiteModel
from tests.conftest import write_image
from tests.tflite_models import TinyClassifier


def _converter() -> tf.lite.TFLiteConverter:
    model = TinyClassifier()
    return tf.lite.TFLiteConverter.from_concrete_functions(
        [model.__call__.get_concrete_function()], model
    )


def _samples():
    rng = np.random.default_rng(0)
    samples = [rng.random((1, 12, 10, 3), dtype=np.float32) for _ in range(50)]
    return lambda: ([s] for s in samples)


def _convert(mode: str, int8_io: bool = False) -> bytes:
    return quantize.convert(_converter(), mode, _samples(), int8_io)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(7).random((16, 12, 10, 3), dtype=np.float32)


@pytest.mark.parametrize(
    ("mode", "int8_io", "input_dtype"),
    [
        ("dynamic", False, np.float32),
        ("float16", False, np.float32),
        ("int8", False, np.float32),
        ("int8", True, np.int8),
    ],
)
def test_quantized_models_run_and_agree_with_float(tmp_path, images, mode, int8_io, input_dtype):
    path = tmp_path / "model.tflite"
    path.write_bytes(_convert(mode, int8_io))
    model = TFLiteModel(path, num_threads=1)
    assert model._interpreter.get_input_details()[0]["dtype"] == input_dtype
    scores = model.run(images)  # float in, float out, whatever the tensors hold
    assert scores.dtype == np.float32
    expected = TinyClassifier()(images).numpy()
    np.testing.assert_allclose(scores, expected, atol=0.02)
    assert (scores.argmax(1) == expected.argmax(1)).mean() >= 0.9


def test_int8_with_int8_io_is_full_integer(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(_convert("int8", int8_io=True))
    interpreter = TFLiteModel(path, num_threads=1)._interpreter
    kinds = {d["dtype"] for d in interpreter.get_tensor_details()}
    assert kinds <= {np.int8, np.int32}, kinds  # no float tensor anywhere


def _ranges(model: bytes) -> dict[str, tuple[float, float]]:
    tensors = flatbuffer_utils.read_model_from_bytearray(bytearray(model)).subgraphs[0].tensors
    return {
        t.name.decode(): (float(t.quantization.min[0]), float(t.quantization.max[0]))
        for t in tensors
        if t.quantization is not None and t.quantization.min is not None
    }


def test_tuned_ranges_only_shrink_and_keep_the_input_range():
    converter = _converter()
    quantize.configure(converter, "int8", _samples())
    converter._experimental_calibrate_only = True
    calibrated = converter.convert()
    before = _ranges(calibrated)
    after = _ranges(quantize.tuned_ranges(calibrated, _samples()()))
    assert before.keys() == after.keys() and len(after) >= 3
    assert after["serving_default_images:0"] == before.pop("serving_default_images:0")
    for name, (low, high) in before.items():
        assert min(low, 0) <= after[name][0] <= 0 <= after[name][1] <= max(high, 0), name
    assert after != before  # the softmax's calibrated range is wider than its values
    assert _ranges(quantize.tuned_ranges(calibrated, iter([]))) == _ranges(calibrated)


class _ConvNet(tf.Module):
    """Convolution, depthwise convolution and a dense layer, on inputs of mean 0.5: rounding
    their weights shifts their outputs' means."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(2)
        self.conv = tf.constant(rng.normal(size=(3, 3, 3, 8)).astype(np.float32))
        self.depthwise = tf.constant(rng.normal(size=(3, 3, 8, 1)).astype(np.float32))
        self.dense = tf.constant(rng.normal(size=(8, 4)).astype(np.float32))
        self.bias = tf.constant(rng.normal(size=(4,)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 12, 10, 3], tf.float32)])
    def __call__(self, images):
        x = tf.nn.relu(tf.nn.conv2d(images, self.conv, 1, "VALID"))
        x = tf.nn.relu(tf.nn.depthwise_conv2d(x, self.depthwise, [1, 1, 1, 1], "VALID"))
        return tf.reduce_mean(x, axis=[1, 2]) @ self.dense + self.bias


def test_corrected_biases_remove_the_mean_shift_of_rounded_weights(tmp_path):
    net = _ConvNet()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [net.__call__.get_concrete_function()], net
    )
    samples = list(_samples()())
    quantize.configure(converter, "int8", lambda: iter(samples))
    converter._experimental_calibrate_only = True
    calibrated = converter.convert()
    rounded = mlir_quantize(calibrated)
    corrected = quantize.corrected_biases(rounded, calibrated, samples)
    images = np.concatenate([s[0] for s in samples])
    expected = net(images).numpy()

    def mean_shift(model: bytes) -> float:
        path = tmp_path / "model.tflite"
        path.write_bytes(model)
        scores = TFLiteModel(path, num_threads=1).run(images)
        return float(np.abs((scores - expected).mean(axis=0)).mean())

    assert mean_shift(corrected) < 0.6 * mean_shift(rounded)
    changed = [
        name
        for name, (low, high) in _ranges(corrected).items()
        if (low, high) != _ranges(rounded)[name]
    ]
    assert changed == []  # only biases change
    assert quantize.corrected_biases(rounded, calibrated, []) == rounded


def _histogram(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.histogram(values, quantize.HISTOGRAM_BINS, (low, high))[0]


def test_least_error_range_clips_rare_extremes_and_drops_unused_sides():
    rng = np.random.default_rng(0)
    values = rng.laplace(0, 1, 100_000)  # heavy tails: a few values far out, as in a CNN
    edge = np.abs(values).max()
    low, high = quantize.least_error_range(_histogram(values, -edge, edge), -edge, edge)
    # The tails are clipped near +-10 (ACIQ's optimum for 8-bit Laplace values is 9.89 b).
    assert -0.95 * edge < low < -8 and 8 < high < 0.95 * edge
    spread = rng.uniform(-1, 1, 100_000)  # every value matters: the range stays whole
    low, high = quantize.least_error_range(_histogram(spread, -1, 1), -1, 1)
    assert low == pytest.approx(-1, abs=0.01) and high == pytest.approx(1, abs=0.01)
    # Values in [0, 255] calibrated as [-127, 255] (the module's `x * 255`): no negative side.
    pixels = rng.integers(0, 256, 100_000).astype(float)
    low, high = quantize.least_error_range(_histogram(pixels, -127, 255), -127, 255)
    assert low == 0 and high == pytest.approx(255, abs=1)
    empty = np.zeros(quantize.HISTOGRAM_BINS, np.int64)
    assert quantize.least_error_range(empty, -3.0, 4.0) == (-3.0, 4.0)
    zeros = _histogram(np.zeros(100), -3.0, 4.0)  # a dead tensor keeps its range
    assert quantize.least_error_range(zeros, -3.0, 4.0) == (-3.0, 4.0)


def test_the_log_says_what_each_mode_makes():
    assert quantize.describe("none") == "float32"
    assert quantize.describe("dynamic") == "quantized: dynamic"
    assert "every op integer" in quantize.describe("int8")
    assert "input and output float32" in quantize.describe("int8")
    assert "input and output int8" in quantize.describe("int8", int8_io=True)


def test_int8_needs_a_representative_dataset_and_modes_are_known():
    model = TinyClassifier()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [model.__call__.get_concrete_function()], model
    )
    with pytest.raises(ValueError, match="representative"):
        quantize.configure(converter, "int8")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize.configure(converter, "int4")


def test_calibration_images_are_a_fixed_pick():
    paths = [f"img{i:03d}.jpg" for i in range(1000)]
    picked = quantize.calibration_paths(paths, 300, seed=0)
    assert len(picked) == 300 == len(set(picked)) and picked == sorted(picked)
    assert picked == quantize.calibration_paths(paths, 300, seed=0)
    assert picked != quantize.calibration_paths(paths, 300, seed=1)
    assert quantize.calibration_paths(paths[:10], 300) == paths[:10]


def test_representative_dataset_decodes_and_skips_bad_files(tmp_path):
    good = [str(write_image(tmp_path / f"{i}.png", size=(40, 30))) for i in range(2)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    batches = list(quantize.representative_dataset([good[0], str(bad), good[1]], (12, 10), 10**8)())
    assert len(batches) == 2
    for (batch,) in batches:
        assert batch.shape == (1, 12, 10, 3) and batch.dtype == np.float32
        assert batch.min() >= 0 and batch.max() <= 1


def test_labels_travel_inside_the_tflite_file(tmp_path, images):
    path = tmp_path / "model.tflite"
    plain = _convert("none")
    path.write_bytes(plain)
    assert embedded_labels(path) is None
    path.write_bytes(with_labels(plain, ["red", "green", "blue", "grey"], [0.5, 0.25, 1.0, 0.0]))
    assert embedded_labels(path) == (["red", "green", "blue", "grey"], [0.5, 0.25, 1.0, 0.0])
    assert zipfile.ZipFile(path).namelist() == ["labels.txt", "labels.txt.thresholds"]
    # The interpreter ignores the archive after the flatbuffer.
    np.testing.assert_allclose(
        TFLiteModel(path, num_threads=1).run(images), TinyClassifier()(images).numpy(), atol=1e-5
    )
    path.write_bytes(with_labels(plain, ["only"]))
    assert embedded_labels(path) == (["only"], None)


@pytest.mark.parametrize(
    ("mode", "int8_io"),
    [("none", False), ("dynamic", False), ("float16", False), ("int8", False), ("int8", True)],
)
def test_every_quantization_carries_the_metadata_mediapipe_reads(tmp_path, images, mode, int8_io):
    plain = _convert(mode, int8_io)
    thresholds = [0.5, 0.25, 1.0, 0.0] if mode == "none" else None  # multi-label, then not
    info = ModelInfo("/home/me/modules/my_module/", ["red", "green", "blue", "grey"], thresholds)
    path = tmp_path / "model.tflite"
    path.write_bytes(with_metadata(plain, info))
    metadata = read_metadata(path)
    assert metadata.name == "retrain image classifier"
    assert metadata.version.startswith("retrain ")
    assert "4 classes: red, green, blue, grey" in metadata.description
    assert "image module my_module." in metadata.description  # no local path in the file
    assert "RGB image of 10x12 pixels" in metadata.description
    assert metadata.version.split()[1] in metadata.description
    if int8_io:  # a quantized input: its quantization says it all
        assert (metadata.mean, metadata.std) == (None, None)
    else:  # a float input in [0, 1]: pixel values / 255
        assert (metadata.mean, metadata.std) == ((0.0,), (255.0,))
    files = {"labels.txt": 2} | ({"labels.txt.thresholds": 0} if thresholds else {})
    assert metadata.output_files == files  # TENSOR_AXIS_LABELS, and an UNKNOWN file
    assert carried(path).labels == info.labels and carried(path).thresholds == thresholds
    archive = zipfile.ZipFile(path)
    assert archive.namelist() == list(files)
    assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}  # MediaPipe's
    original = tmp_path / "plain.tflite"
    original.write_bytes(plain)
    np.testing.assert_array_equal(  # the model computes what it did without metadata
        TFLiteModel(path, num_threads=1).run(images),
        TFLiteModel(original, num_threads=1).run(images),
    )
    assert read_metadata(original) is None and carried(original).normalization is None


def test_metadata_is_replaced_not_added_twice(tmp_path):
    first = with_metadata(_convert("none"), ModelInfo("a", ["x", "y", "z", "w"]))
    path = tmp_path / "model.tflite"
    path.write_bytes(with_metadata(first, ModelInfo("b", ["p", "q", "r", "s"])))
    entries = flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes())).metadata
    assert [m.name for m in entries].count(b"TFLITE_METADATA") == 1
    assert "p, q, r, s" in read_metadata(path).description
    assert carried(path).labels == ["p", "q", "r", "s"]
