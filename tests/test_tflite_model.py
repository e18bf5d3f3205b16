"""Tests of retrain.models.tflite, the LiteRT wrapper that the tflite extraction backend and
label-image share, and of how each of them words a model it cannot use."""

from __future__ import annotations

import json
import math
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from label_image import cli as label_cli
from retrain.bottlenecks.backends import BackendError, tflite_backend
from retrain.export.loading import ModelLoadError, TFLiteClassifier
from retrain.export.tflite_metadata import ModelInfo, with_metadata
from retrain.models.tflite import SignatureError, TFLiteModel, is_tflite_file
from tests.tflite_models import TinyClassifier, write_tflite, write_tiny_classifier


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, TinyClassifier]:
    return write_tiny_classifier(tmp_path_factory.mktemp("tiny") / "tiny.tflite")


def _images(rows: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 12, 10, 3), dtype=np.float32)


def _count_invocations(model: TFLiteModel, monkeypatch) -> list[int]:
    calls: list[int] = []
    invoke = model._interpreter.invoke
    monkeypatch.setattr(model._interpreter, "invoke", lambda: calls.append(1) or invoke())
    return calls


def test_it_describes_the_model(tiny):
    model = TFLiteModel(tiny[0], num_threads=1)
    assert model.path == tiny[0]
    assert model.input_shape == (1, 12, 10, 3)
    assert model.input_signature == (-1, 12, 10, 3)
    assert (model.output_width, model.output_dtype) == (4, np.float32)


@pytest.mark.parametrize("batch_size", [None, 1, 2, 8])
def test_runs_batches_in_chunks_of_batch_size(tiny, batch_size, monkeypatch):
    path, reference = tiny
    model = TFLiteModel(path, num_threads=1, batch_size=batch_size)
    calls = _count_invocations(model, monkeypatch)
    for rows in (5, 1, 5):  # a shorter batch resizes the interpreter, and back
        calls.clear()
        images = _images(rows)
        scores = model.run(images)
        assert scores.shape == (rows, 4) and scores.dtype == np.float32
        np.testing.assert_allclose(scores, reference(images).numpy(), atol=1e-5)
        assert len(calls) == (1 if batch_size is None else math.ceil(rows / batch_size))


def test_an_empty_batch_is_not_run(tiny, monkeypatch):
    model = TFLiteModel(tiny[0], num_threads=1, batch_size=2)
    calls = _count_invocations(model, monkeypatch)
    scores = model.run(np.zeros((0, 12, 10, 3)))
    assert (scores.shape, scores.dtype, calls) == ((0, 4), np.float32, [])


def test_calls_from_several_threads_are_serialised(tiny):
    path, reference = tiny
    model = TFLiteModel(path, num_threads=1, batch_size=3)
    batches = [_images(rows, seed=rows) for rows in (1, 2, 4, 7)]
    expected = [reference(b).numpy() for b in batches]
    failures: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                np.testing.assert_allclose(model.run(batches[i]), expected[i], atol=1e-5)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures


def test_is_tflite_file(tiny, tmp_path):
    text = tmp_path / "model.tflite"
    text.write_text("not a model")
    assert is_tflite_file(tiny[0]) and not is_tflite_file(text)
    with pytest.raises(FileNotFoundError):
        is_tflite_file(tmp_path / "missing.tflite")


# ----------------------------------------------------------------------------- signatures


def _spec(dtype=tf.float32) -> list[tf.TensorSpec]:
    return [tf.TensorSpec([None, 4, 4, 3], dtype)]


@tf.function(input_signature=_spec())
def _two_outputs(images):
    return tf.reduce_mean(images, axis=[1, 2]), tf.reduce_max(images, axis=[1, 2])


@tf.function(input_signature=_spec(tf.int32))
def _integer_input(images):
    return tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2])


@tf.function(input_signature=_spec())
def _image_output(images):
    return images * 2.0


@tf.function(input_signature=_spec())
def _integer_output(images):
    return tf.cast(tf.reduce_mean(images, axis=[1, 2]) * 100.0, tf.int32)


@pytest.mark.parametrize(
    ("function", "part", "backend_says", "label_image_says"),
    [
        (
            _two_outputs,
            "count",
            "expected 1 input and 1 output, got 1 and 2",
            "{path}: expected one input and one output, found 1 and 2",
        ),
        (
            _integer_input,
            "input",
            "input is int32 [",
            "{path}: input is int32 [-1, 4, 4, 3], not float32 images [n, h, w, 3]",
        ),
        (_image_output, "output", "output is float32 [", "{path}: output shape ["),
    ],
)
def test_a_model_of_another_shape_is_refused_in_each_users_words(
    tmp_path, function, part, backend_says, label_image_says
):
    path = write_tflite(tmp_path / "model.tflite", function)
    with pytest.raises(SignatureError) as info:
        TFLiteModel(path, num_threads=1)
    assert info.value.part == part
    with pytest.raises(BackendError) as info:
        tflite_backend(path, num_threads=1)
    assert str(info.value).startswith(f"cannot load TFLite model {path}: {backend_says}")
    with pytest.raises(ModelLoadError) as info:
        TFLiteClassifier(path, num_threads=1)
    assert str(info.value).startswith(label_image_says.format(path=path))


def test_only_the_backend_requires_float32_features(tmp_path):
    path = write_tflite(tmp_path / "model.tflite", _integer_output)
    with pytest.raises(BackendError, match=r": output is int32 \[.*\], not \[N,D\]$"):
        tflite_backend(path, num_threads=1)
    with pytest.raises(SignatureError, match="output is int32"):
        TFLiteModel(path, num_threads=1, output_dtype=np.float32)
    scores = TFLiteClassifier(path, num_threads=1).predict(np.full((2, 4, 4, 3), 0.5))
    np.testing.assert_array_equal(scores, np.full((2, 3), 50, np.int32))


def test_the_classifier_normalizes_as_the_metadata_says(tiny, tmp_path):
    """A float model whose metadata says mean 127.5, std 127.5 (inputs in [-1, 1], as Model
    Maker's) gets images in [0, 1] mapped there; retrain's own (mean 0, std 255) as they are."""
    path, reference = tiny
    images = _images(3)
    for normalization, expected in (
        ((127.5, 127.5), reference(images * 2 - 1).numpy()),
        ((0.0, 255.0), reference(images).numpy()),
    ):
        info = ModelInfo("m", ["a", "b", "c", "d"], normalization=normalization)
        other = tmp_path / "normalized.tflite"
        other.write_bytes(with_metadata(path.read_bytes(), info))
        model = TFLiteClassifier(other, num_threads=1)
        assert model.labels == ["a", "b", "c", "d"] and model.thresholds is None
        np.testing.assert_allclose(model.predict(images), expected, atol=1e-5)


def test_label_image_takes_labels_from_metadata_and_still_runs_old_files(tiny, tmp_path, capsys):
    path, reference = tiny
    image = tmp_path / "red.png"
    Image.new("RGB", (10, 12), (250, 10, 10)).save(image)
    with_md = tmp_path / "with_metadata.tflite"
    with_md.write_bytes(with_metadata(path.read_bytes(), ModelInfo("m", ["a", "b", "c", "d"])))
    old = tmp_path / "old.tflite"  # written before the metadata: a deflated labels archive
    old.write_bytes(path.read_bytes())
    with zipfile.ZipFile(old, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("labels.txt", "a\nb\nc\nd\n")
    bare = tmp_path / "bare.tflite"  # no labels at all: --labels as ever
    bare.write_bytes(path.read_bytes())
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\n")
    expected = reference(np.full((1, 12, 10, 3), [250 / 255, 10 / 255, 10 / 255], np.float32))
    best = "abcd"[int(np.argmax(expected))]
    for model, extra in ((with_md, []), (old, []), (bare, [f"--labels={labels}"])):
        status = label_cli.main(["label-image", f"--graph={model}", *extra, "--json", str(image)])
        row = json.loads(capsys.readouterr().out)
        assert status == 0 and row["labels"][0] == best


def test_label_image_normalizes_by_metadata_unless_the_flags_say_how(tiny, tmp_path, capsys):
    path, _ = tiny
    image = tmp_path / "photo.png"
    Image.new("RGB", (10, 12), (200, 90, 30)).save(image)
    model = tmp_path / "minus_one_to_one.tflite"
    info = ModelInfo("m", ["a", "b", "c", "d"], normalization=(127.5, 127.5))
    model.write_bytes(with_metadata(path.read_bytes(), info))
    scores = []
    for flags in ([], ["--input_mean=127.5", "--input_std=127.5"], ["--input_std=255"]):
        args = ["label-image", f"--graph={model}", *flags, "--json", "--top_k=4", str(image)]
        assert label_cli.main(args) == 0
        row = json.loads(capsys.readouterr().out)
        scores.append(dict(zip(row["labels"], row["scores"])))
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)  # the metadata's, or the same flags
    assert scores[2] != pytest.approx(scores[0], abs=1e-3)  # the flags' [0, 1] input instead
