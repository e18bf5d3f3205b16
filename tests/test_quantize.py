"""Tests of the TFLite export's quantization (retrain.quantize) and of the labels it carries
(retrain.tflite_labels), on a tiny model; the real module's figures are in the README."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import tensorflow as tf

from retrain import quantize
from retrain.tflite_labels import embedded_labels, with_labels
from retrain.tflite_model import TFLiteModel
from tests.conftest import write_image
from tests.tflite_models import TinyClassifier


def _convert(mode: str, int8_io: bool = False) -> bytes:
    model = TinyClassifier()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [model.__call__.get_concrete_function()], model
    )
    rng = np.random.default_rng(0)
    samples = [rng.random((1, 12, 10, 3), dtype=np.float32) for _ in range(50)]
    quantize.configure(converter, mode, lambda: ([s] for s in samples), int8_io)
    return converter.convert()


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
