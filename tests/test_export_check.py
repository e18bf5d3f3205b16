"""Tests of retrain.export.check and retrain.export.loading on a tiny classifier in every format
(the
real module's run is in test_end_to_end)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from retrain.bottlenecks import extract
from retrain.errors import RetrainError
from retrain.export import check as export_check
from retrain.export.loading import (
    FROZEN_GRAPH,
    SAVED_MODEL,
    TFLITE,
    ModelLoadError,
    model_format,
    open_model,
)
from retrain.heads.evaluation import Evaluation, MultiLabelEvaluation
from retrain.heads.head import SigmoidHead, SoftmaxHead
from tests.conftest import write_image
from tests.tflite_models import TinyClassifier, write_tflite

HEAD = SoftmaxHead(4)  # the tiny classifier's four outputs
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120), (250, 250, 10)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny classifier as a frozen graph, a SavedModel and a .tflite; and test images."""
    folder = tmp_path_factory.mktemp("exports")
    model = TinyClassifier()
    concrete = model.__call__.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete).graph.as_graph_def()
    (folder / "graph.pb").write_bytes(frozen.SerializeToString())
    tf.saved_model.save(model, str(folder / "saved"), signatures={"serving_default": concrete})
    write_tflite(folder / "model.tflite", model.__call__, model)
    paths = [
        str(write_image(folder / "images" / f"{i}.png", size=(30 + i, 20), color=c))
        for i, c in enumerate(COLOURS * 3)
    ]
    outputs = {
        "output_graph": str(folder / "graph.pb"),
        "output_labels": str(folder / "labels.txt"),
        "saved_model_dir": str(folder / "saved"),
        "output_tflite": str(folder / "model.tflite"),
    }
    return model, outputs, paths


def _reference(model, paths) -> np.ndarray:
    batches = extract.decoded_batches(paths, (12, 10), 8, {}, 10**8)
    return np.concatenate([model(images).numpy() for _, images, _ in batches])


def test_formats_are_told_by_content(models, tmp_path):
    _, outputs, _ = models
    renamed = tmp_path / "model.pb"
    renamed.write_bytes(Path(outputs["output_tflite"]).read_bytes())
    assert model_format(outputs["output_graph"]) == FROZEN_GRAPH
    assert model_format(outputs["saved_model_dir"]) == SAVED_MODEL
    assert model_format(renamed) == TFLITE
    with pytest.raises(ModelLoadError, match="folder without a SavedModel"):
        model_format(tmp_path)


def test_every_format_gives_the_same_scores(models):
    model, outputs, paths = models
    reference = _reference(model, paths)
    images = np.concatenate(
        [b.numpy() for _, b, _ in extract.decoded_batches(paths, (12, 10), 8, {}, 10**8)]
    )
    for setting in ("output_graph", "saved_model_dir", "output_tflite"):
        loaded = open_model(outputs[setting])
        assert loaded.input_size() == (12, 10) and loaded.output_width() == 4
        np.testing.assert_allclose(loaded.predict(images), reference, atol=1e-5)
        assert loaded.predict(images[:0]).shape == (0, 4)


def test_checks_report_accuracy_and_agreement_per_format(models, caplog):
    model, outputs, paths = models
    reference = _reference(model, paths)
    labels = reference.argmax(1)
    labels[:3] = (labels[:3] + 1) % 4  # three images the model gets wrong
    evaluation = Evaluation(0.8, 0.0, reference.argmax(1), [], labels, reference)
    with caplog.at_level("INFO", logger="retrain"):
        checks = export_check.check_exports(
            outputs, paths, evaluation, HEAD, (12, 10), 10**8, "none"
        )
    assert [c.format for c in checks] == [FROZEN_GRAPH, SAVED_MODEL, TFLITE]
    for check in checks:
        assert check.images == len(paths) and check.agreement == 1.0
        assert check.accuracy == pytest.approx(1 - 3 / len(paths))
        assert check.max_score_difference < 1e-5 and check.seconds > 0
        assert set(check.as_dict()) >= {"format", "accuracy", "agreement", "seconds"}
    assert len([r for r in caplog.records if r.message.startswith("Export check: ")]) == 3


def test_float_formats_run_on_a_subset_of_large_splits(models, monkeypatch):
    model, outputs, paths = models
    reference = _reference(model, paths)
    evaluation = Evaluation(1.0, 0.0, reference.argmax(1), [], reference.argmax(1), reference)
    monkeypatch.setattr(export_check, "FLOAT_CHECK_IMAGES", 4)
    checks = export_check.check_exports(outputs, paths, evaluation, HEAD, (12, 10), 10**8)
    assert [c.images for c in checks] == [4, 4, len(paths)]
    graph_only = {"output_graph": outputs["output_graph"]}  # only those 4 are decoded
    decoded = []
    real = export_check.extract.decoded_batches
    monkeypatch.setattr(
        export_check.extract,
        "decoded_batches",
        lambda *a: [decoded.append(len(b[0])) or b for b in real(*a)],
    )
    (check,) = export_check.check_exports(graph_only, paths, evaluation, HEAD, (12, 10), 10**8)
    assert check.images == 4 == sum(decoded) and check.agreement == 1.0


def test_multi_label_accuracy_is_the_exact_match_at_thresholds():
    """The check counts a multi-label image right as the run's evaluation does."""
    scores = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.1]])
    rows = np.array([[1, 0], [1, 1], [0, 1]], np.uint8)
    head = SigmoidHead(2)
    assert head.accuracy(scores, rows, [0.5, 0.5]) == pytest.approx(2 / 3)
    assert head.accuracy(scores, rows, [0.7, 0.1]) == pytest.approx(1 / 3)
    evaluation = MultiLabelEvaluation(0.0, scores.astype(np.float32), rows, [0.5, 0.5])
    assert head.accuracy(scores, rows, evaluation.thresholds) == evaluation.accuracy


def test_nothing_to_check_and_a_broken_export(models, tmp_path, caplog):
    model, outputs, paths = models
    reference = _reference(model, paths)
    evaluation = Evaluation(1.0, 0.0, reference.argmax(1), [], reference.argmax(1), reference)
    labels_only = {"output_labels": "l.txt"}
    assert export_check.check_exports(labels_only, paths, evaluation, HEAD, (12, 10), 1) == []
    with caplog.at_level("INFO", logger="retrain"):
        assert export_check.check_exports(outputs, [], None, HEAD, (12, 10), 10**8) == []
    assert "no test images" in caplog.text
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(Path(outputs["output_tflite"]).read_bytes()[:500])
    with pytest.raises(RetrainError, match="cannot be loaded back: cannot load .*broken.tflite"):
        export_check.check_exports(
            {"output_tflite": str(broken)}, paths, evaluation, HEAD, (12, 10), 1
        )


def test_only_an_export_that_does_not_reproduce_the_float_model_is_judged_on_its_subset():
    """--assert_accuracy_at_least judges a float export by the run's accuracy on the whole split
    (its scores matched the float model's on every image checked), a quantized one by its own."""

    def check(difference: float) -> export_check.ExportCheck:
        return export_check.ExportCheck("frozen_graph", "g.pb", "none", 64, 0.5, 1.0, difference, 1)

    assert check(5e-7).reproduces_float_model
    assert check(export_check.SCORE_TOLERANCE).reproduces_float_model
    assert not check(0.02).reproduces_float_model  # e.g. an int8 .tflite's scores
