"""The .tflite that retrain writes, run by MediaPipe Tasks' own ImageClassifier (the `mediapipe`
extra; skipped without it): every quantization loads, label names come back, a multi-label
model's scores come back, and the export check reports MediaPipe's figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from retrain.data.resize import resize_bilinear
from retrain.export import check as export_check
from retrain.export import mediapipe_check
from retrain.export.tflite_metadata import carried, read_metadata
from retrain.export.writer import Classifier, write_tflite
from retrain.heads.evaluation import Evaluation, MultiLabelEvaluation
from retrain.heads.head import SigmoidHead, SoftmaxHead
from retrain.models.tflite import TFLiteModel

mp = pytest.importorskip("mediapipe")
from mediapipe.tasks.python import BaseOptions, vision  # noqa: E402

COLOURS = {"red": (210, 30, 40), "green": (30, 190, 50), "blue": (40, 30, 200)}
LABELS = list(COLOURS)
SIZE = (24, 20)  # the model's input (height, width)


class MeanColour(tf.Module):
    """The 'image module': an image's mean colour, as 3 features."""

    @tf.function
    def __call__(self, images):
        return tf.reduce_mean(images, axis=[1, 2])


def _classifier(head) -> Classifier:
    weights = 12 * (np.eye(3, dtype=np.float32) - 1 / 3)  # each colour's own feature
    return Classifier(MeanColour(), head, weights, np.zeros(3, np.float32), SIZE)


def _samples():
    rng = np.random.default_rng(0)
    samples = [rng.random((1, *SIZE, 3), dtype=np.float32) for _ in range(30)]
    return lambda: ([s] for s in samples)


def _write(path: Path, head, mode: str = "none", int8_io: bool = False) -> Path:
    write_tflite(
        _classifier(head),
        path,
        LABELS,
        "efficientnet_lite0",
        quantization=mode,
        representative=_samples(),
        int8_io=int8_io,
    )
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    """Photos of each colour, of other sizes than the model's input, with some noise."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    paths = []
    for i, colour in enumerate(COLOURS.values()):
        for size in ((64, 48), (37, 90)):
            noise = rng.integers(-25, 25, (size[1], size[0], 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            paths.append(str(folder / f"{i}_{size[0]}.png"))
            Image.fromarray(pixels).save(paths[-1])
    return paths


def _classify(path: Path, photos: list[str]) -> list[list[tuple[str, float]]]:
    options = vision.ImageClassifierOptions(
        base_options=BaseOptions(model_asset_path=str(path)), max_results=-1
    )
    with vision.ImageClassifier.create_from_options(options) as classifier:
        results = [classifier.classify(mp.Image.create_from_file(p)) for p in photos]
    return [[(c.category_name, c.score) for c in r.classifications[0].categories] for r in results]


@pytest.mark.parametrize("mode", ["none", "dynamic", "float16", "int8"])
def test_every_quantization_loads_and_names_the_right_labels(tmp_path, photos, mode):
    path = _write(tmp_path / "m.tflite", SoftmaxHead(3), mode)
    results = _classify(path, photos)
    expected = [label for label in LABELS for _ in range(2)]
    assert [categories[0][0] for categories in results] == expected
    assert all(sorted(name for name, _ in c) == sorted(LABELS) for c in results)
    assert all(sum(score for _, score in c) == pytest.approx(1, abs=0.02) for c in results)


def test_a_multi_label_models_labels_come_back_with_their_scores(tmp_path, photos):
    head = SigmoidHead(3, label_thresholds=(0.3, 0.5, 0.8))
    path = _write(tmp_path / "m.tflite", head)
    assert carried(path).thresholds == [0.3, 0.5, 0.8]
    interpreter = TFLiteModel(path, num_threads=1)
    for photo, categories in zip(photos, _classify(path, photos)):
        scores = dict(categories)
        assert sorted(scores) == sorted(LABELS)  # every label, not only the best
        assert max(scores.values()) > 0.9 and sum(scores.values()) < 1.5  # sigmoid, not softmax
        pixels = np.asarray(Image.open(photo).resize(SIZE[::-1], Image.BILINEAR), np.float32)
        ours = interpreter.run(pixels[None] / 255)[0]
        # Only the resizing differs (MediaPipe's own): the mean colour barely moves.
        np.testing.assert_allclose([scores[label] for label in LABELS], ours, atol=0.02)


def test_mediapipe_stretches_the_whole_image_as_retrain_does(tmp_path):
    """No crop, no letterbox: a 3:1 image whose left third is red is a third red to both."""
    path = _write(tmp_path / "m.tflite", SigmoidHead(3, label_thresholds=(0.5,) * 3))
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, :100], pixels[:, 100:] = (230, 20, 20), (20, 20, 230)
    Image.fromarray(pixels).save(tmp_path / "stripes.png")
    (categories,) = _classify(path, [str(tmp_path / "stripes.png")])
    ours = TFLiteModel(path, num_threads=1).run(resize_bilinear(pixels, SIZE)[None] / 255)[0]
    np.testing.assert_allclose([dict(categories)[label] for label in LABELS], ours, atol=1e-3)
    assert 0.3 < dict(categories)["red"] < 0.8  # a centre crop would leave no red


def test_an_int8_input_model_carries_metadata_but_mediapipe_refuses_it(tmp_path, caplog, photos):
    path = _write(tmp_path / "m.tflite", SoftmaxHead(3), "int8", int8_io=True)
    metadata = read_metadata(path)
    assert metadata.mean is None and metadata.output_files == {"labels.txt": 2}
    with pytest.raises((ValueError, RuntimeError), match="uint8/float32"):
        _classify(path, photos[:1])
    assert mediapipe_check.timed_scores(str(path), photos, 10**8, SIZE) is None
    assert "MediaPipe's ImageClassifier cannot run" in caplog.text


def _evaluation(head, path: Path, photos: list[str]):
    """The float model's evaluation of `photos` (the reference of the export check)."""
    images = np.stack(
        [np.asarray(Image.open(p).resize(SIZE[::-1]), np.float32) / 255 for p in photos]
    )
    scores = _classifier(head).classify(images).numpy()
    truth = np.repeat(np.arange(3), 2)
    if isinstance(head, SigmoidHead):
        rows = np.eye(3, dtype=np.uint8)[truth]
        return MultiLabelEvaluation(1.0, scores, rows, list(head.thresholds))
    return Evaluation(1.0, 0.0, truth, [], truth, scores)


@pytest.mark.parametrize("head", [SoftmaxHead(3), SigmoidHead(3, label_thresholds=(0.5,) * 3)])
def test_the_export_check_runs_mediapipe_by_label_name(tmp_path, photos, caplog, head):
    path = _write(tmp_path / "m.tflite", head)
    with caplog.at_level("INFO", logger="retrain"):
        checks = export_check.check_exports(
            {"output_tflite": str(path)}, photos, _evaluation(head, path, photos), head, SIZE, 10**8
        )
    assert [c.format for c in checks] == ["tflite", "mediapipe", "mediapipe_own_resize"]
    for mediapipe in (c.as_dict() for c in checks[1:]):
        assert mediapipe["images"] == len(photos) and mediapipe["quantization"] == "none"
        assert mediapipe["accuracy"] == 1.0 and mediapipe["agreement"] == 1.0
    resized = checks[1]  # the same pixels as the interpreter's, but for rounding to 0..255
    assert resized.max_score_difference < 0.01
    assert "Export check: mediapipe " in caplog.text
    assert "Export check: mediapipe_own_resize " in caplog.text


@pytest.mark.slow
def test_metadata_survives_a_real_run_and_its_check(tmp_path):
    """A run of the pipeline writes the file, checks it with MediaPipe (in --metrics_json), and
    a second run that reuses nothing writes it again, metadata and all."""
    from retrain.cli.retrain import main
    from tests.conftest import example_subset, retrain_args

    photos = example_subset(tmp_path / "photos", per_class=12, labels=("daisy", "roses", "tulips"))
    for run in ("one", "two"):  # the second run: a fresh bottleneck folder
        out = tmp_path / run
        tflite = tmp_path / "model.tflite"
        assert main([*retrain_args(photos, out, f"--output_tflite={tflite}", steps=50)]) == 0
        metadata = read_metadata(tflite)
        assert (metadata.mean, metadata.std) == ((0.0,), (255.0,))
        assert "3 classes: daisy, roses, tulips" in metadata.description
        assert "efficientnet_lite0" in metadata.description
        checks = json.loads((out / "metrics.json").read_text())["export_checks"]
        (mediapipe,) = [c for c in checks if c["format"] == "mediapipe"]
        assert mediapipe["agreement"] == 1.0 and mediapipe["images"] >= 1
        assert {name for name, _ in _classify(tflite, [str(next(photos.rglob("*.jpg")))])[0]} == {
            "daisy",
            "roses",
            "tulips",
        }
