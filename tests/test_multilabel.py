"""Multi-label data (issue 18): labels from a CSV, the sigmoid head, thresholds chosen on the
validation split, multi-label metrics, every export and label-image, on generated images."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrain
from retrain.cli import retrain as cli
from retrain.config import (
    CacheConfig,
    DataConfig,
    ExportConfig,
    HeadTrainingConfig,
    ModuleConfig,
    OutputsConfig,
    RetrainConfig,
)
from retrain.data.labels_csv import read_labels_csv
from retrain.data.scan import SPLITS, split_for_file
from retrain.errors import ConfigError
from tests.conftest import retrain_args
from tests.fault_tools import graph_scores, load_test_images, save_tiny_module

LABELS = ["red", "green", "blue"]


def write_coloured(path: Path, on: np.ndarray, rng: np.random.Generator) -> Path:
    """A 32x32 PNG whose red, green and blue channels are bright where the image carries the
    label of that colour (`on`: up to 3 values, 0 or 1), with a little noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    on = np.asarray(on, np.float64)
    base = 40 + 170 * np.pad(on, (0, 3 - len(on)))
    pixels = base[None, None, :] + rng.normal(0, 12, (32, 32, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.write_text("\n".join(",".join(str(v) for v in row) for row in [header, *rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, labels CSV): 90 images, each label on about 40% of them, in nested
    folders, plus 2 image files the CSV does not list."""
    root = tmp_path_factory.mktemp("multilabel")
    images = root / "images"
    rng = np.random.default_rng(0)
    targets = rng.random((90, 3)) < 0.4
    rows = []
    for i, on in enumerate(targets):
        name = f"part{i % 3}/img{i:03d}.png"
        write_coloured(images / name, on, rng)
        rows.append([name, *on.astype(int)])
    for i in range(2):
        write_coloured(images / f"unlisted{i}.png", [1, 1, 1], rng)
    return images, write_csv(root / "labels.csv", ["path", *LABELS], rows)


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "module"
    save_tiny_module(path)
    return path


# ----------------------------------------------------------------------------- the CSV


def test_csv_gives_paths_targets_and_the_folder_split(dataset):
    images, csv_path = dataset
    image_set = read_labels_csv(csv_path, images, 20, 20)
    assert image_set.labels == LABELS and image_set.multi_label
    assert image_set.targets.shape == (90, 3) and image_set.targets.dtype == np.uint8
    assert image_set.unlisted == 2 and image_set.ignored == []
    first = Path(image_set.paths[0])
    assert first == images / "part0" / "img000.png"
    expected = [SPLITS.index(split_for_file(Path(p).name, 20, 20)) for p in image_set.paths]
    assert image_set.split_codes.tolist() == expected
    counts = image_set.class_split_counts()
    assert [sum(c.values()) for c in counts] == image_set.targets.sum(axis=0).tolist()
    assert image_set.label_text(0) == ";".join(
        label for label, on in zip(LABELS, image_set.targets[0]) if on
    )


def test_bad_rows_are_skipped_naming_their_line(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png", "c.png", "d.png"):
        write_coloured(tmp_path / name, [1, 0], rng)
    csv_path = write_csv(
        tmp_path / "labels.csv",
        ["path", "cat", "dog"],
        [
            ["a.png", 1, 0],
            ["missing.png", 1, 0],
            ["b.png", 2, 0],
            ["./a.png", 0, 1],
            ["c.png", 1],
            ["d.png", 0, 1],
        ],
    )
    image_set = read_labels_csv(csv_path, tmp_path, 0, 0)
    assert [Path(p).name for p in image_set.paths] == ["a.png", "d.png"]
    assert image_set.targets.tolist() == [[1, 0], [0, 1]]
    name = str(csv_path)
    assert image_set.ignored == [
        (f"{name} line 3", "image not found: missing.png; row skipped"),
        (f"{name} line 4", "label 'cat' has the value '2'; expected 0 or 1; row skipped"),
        (f"{name} line 5", "./a.png is listed again (first on line 2); row skipped"),
        (f"{name} line 6", "2 values, expected 3 (path and one per label); row skipped"),
    ]
    assert image_set.unlisted == 2  # b.png and c.png


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "is empty; expected a header path,label1,..."),
        ("file,cat\na.png,1\n", "line 1: the header must start with 'path', got 'file'"),
        ("path\na.png\n", "the header names no label after 'path'"),
        ("path,cat,cat\na.png,1,0\n", "the label 'cat' is named twice"),
        ("path,cat\nmissing.png,1\n", "has no usable row (see the warnings above)"),
        ("path,cat,dog\na.png,1,0\n", "label 'dog' is never 1 in the training split"),
    ],
)
def test_unusable_csv_is_a_config_error(tmp_path, text, words):
    write_coloured(tmp_path / "a.png", [1], np.random.default_rng(0))
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(ConfigError) as info:
        read_labels_csv(tmp_path / "labels.csv", tmp_path, 0, 0)
    assert info.value.fields[0] == "data.labels_csv"
    assert words in str(info.value) and "\n" not in str(info.value)


def test_command_line_errors_are_one_line_exit_2(dataset, tmp_path, capsys):
    images, csv_path = dataset
    never = write_csv(
        tmp_path / "never.csv", ["path", "red", "never"], [["part0/img000.png", 1, 0]]
    )
    for extra, message in (
        ([f"--labels_csv={tmp_path / 'nope.csv'}"], "--labels_csv: file not found: "),
        (
            [f"--labels_csv={csv_path}", "--sampling=class_balanced"],
            "--sampling=class_balanced draws one class per image; with --labels_csv",
        ),
        (
            [f"--labels_csv={never}", "--testing_percentage=0", "--validation_percentage=0"],
            f"--labels_csv: {never}: label 'never' is never 1 in the training split",
        ),
    ):
        assert cli.main(retrain_args(images, tmp_path / "out", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"retrain: error: {message}"), err


# ----------------------------------------------------------------------------- metrics


def test_average_precision_and_f1_thresholds_by_hand():
    from retrain.heads.evaluation import average_precision, best_f1_threshold, choose_thresholds

    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.2])
    positive = np.array([True, False, True, False, False])
    # Precision 1 at recall 1/2, then 2/3 at recall 1.
    assert average_precision(scores, positive) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(scores, np.zeros(5, bool)) is None
    # Taking the top 3 gives F1 0.8 (the best); the threshold lies between 0.7 and 0.6.
    assert best_f1_threshold(scores, positive) == pytest.approx(0.65)
    assert best_f1_threshold(scores, np.zeros(5, bool)) == 0.5
    assert best_f1_threshold(np.array([0.3, 0.3]), np.array([True, True])) == 0.3
    both = choose_thresholds(np.stack([scores, scores], 1), np.stack([positive, 0 * positive], 1))
    np.testing.assert_allclose(both, [0.65, 0.5])


def test_multi_label_report_by_hand():
    from retrain.heads.evaluation import MultiLabelEvaluation

    p = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.8], [0.4, 0.1]], np.float32)
    y = np.array([[1, 0], [0, 1], [0, 1], [1, 0]], np.uint8)
    result = MultiLabelEvaluation(0.3, p, y, np.array([0.5, 0.5]))
    report = result.report(["a", "b"])
    # a: predicted on rows 0 and 1 (one right), missed row 3; b: both right.
    assert report["per_label"]["a"] == {
        "threshold": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "support": 2,
        "roc_auc": 0.75,
        "average_precision": pytest.approx(1 / 2 + 1 / 2 * 2 / 3),  # ranks 1 and 3
    }
    assert report["per_label"]["b"]["f1"] == 1.0
    assert report["exact_match"] == report["accuracy"] == 0.5 == result.accuracy
    assert report["macro_f1"] == pytest.approx(0.75)
    assert report["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 2))
    assert report["mean_roc_auc"] == pytest.approx((0.75 + 1.0) / 2)
    assert result.per_class_accuracy == [0.5, 1.0]
    assert [m[0] for m in result.mistakes(["a", "b"])] == [1, 3]
    assert list(result.mistakes(["a", "b"]))[1][1:3] == ("(none)", "a")
    assert result.scalars(["a", "b"])["roc_auc/b"] == 1.0


def test_labels_without_positives_or_negatives_are_left_out_of_the_means():
    from retrain.heads.evaluation import MultiLabelEvaluation

    p = np.array([[0.9, 0.2, 0.6], [0.6, 0.7, 0.8], [0.1, 0.8, 0.9], [0.4, 0.1, 0.7]])
    y = np.array([[1, 0, 1], [0, 0, 1], [0, 0, 1], [1, 0, 1]], np.uint8)
    report = MultiLabelEvaluation(0.3, p.astype(np.float32), y).report(["a", "none", "all"])
    assert report["undefined_roc_auc"] == {"none": "no positives", "all": "no negatives"}
    for name in ("none", "all"):
        assert report["per_label"][name]["roc_auc"] is None
        assert report["per_label"][name]["average_precision"] is None
    assert report["mean_roc_auc"] == report["per_label"]["a"]["roc_auc"] == 0.75
    assert report["mean_roc_auc_labels"] == report["mean_average_precision_labels"] == 1
    lines = MultiLabelEvaluation(0.3, p.astype(np.float32), y).summary_lines(["a", "none", "all"])
    assert "mean ROC AUC 0.750 (over 1 of 3 labels)" in lines[0]
    assert lines[1] == (
        "ROC AUC and AP undefined on test, left out of the means: none (no positives), "
        "all (no negatives)"
    )


def test_the_log_summary_shows_the_worst_labels_only():
    from retrain.heads.evaluation import WORST_LABELS_SHOWN, MultiLabelEvaluation

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 12)).astype(np.uint8)
    noise = np.linspace(0.1, 2.0, 12)  # label j gets worse with j
    p = 1 / (1 + np.exp(-((2.0 * y - 1) + rng.normal(size=y.shape) * noise)))
    names = [f"l{j}" for j in range(12)]
    evaluation = MultiLabelEvaluation(0.3, p.astype(np.float32), y)
    lines = evaluation.summary_lines(names)
    assert lines[1] == f"The {WORST_LABELS_SHOWN} labels of lowest ROC AUC of 12:"
    shown = [line.split(":")[0].strip() for line in lines[2:]]
    aucs = {name: v["roc_auc"] for name, v in evaluation.report(names)["per_label"].items()}
    assert shown == sorted(aucs, key=aucs.get)[:WORST_LABELS_SHOWN] and "l11" in shown


# ----------------------------------------------------------------------------- the head


def test_sigmoid_head_loss_gradient_and_smoothing():
    import tensorflow as tf

    from retrain.heads.head import SigmoidHead

    head = SigmoidHead(3)
    logits = tf.constant([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]])
    labels = tf.constant(head.label_array(np.array([[1, 0, 1], [0, 0, 1]])))
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = tf.reduce_mean(head.losses(logits, labels))
    gradient = tape.gradient(loss, logits).numpy()
    expected = (head.probabilities(logits) - head.targets(labels)) / 2
    np.testing.assert_allclose(gradient, expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(head.targets(labels, 0.2).numpy()[0], [0.9, 0.1, 0.9])
    assert head.hits(logits, labels).numpy().tolist() == [1.0, 0.0]
    assert head.label_spec(4).shape == (4, 3)


def test_balanced_weights_weigh_each_labels_positives():
    from retrain.bottlenecks.splits import Split
    from retrain.heads.head import SigmoidHead
    from retrain.training.head import train_head

    head = SigmoidHead(2)
    y = np.array([[1, 1], [0, 1], [0, 1], [0, 0]])
    np.testing.assert_allclose(head.class_weights(y, "balanced"), [3.0, 1 / 3])
    assert head.class_weights(y, "none") is None

    # Label 1 is rare (5%) and overlaps label 0's features: weights raise its recall.
    rng = np.random.default_rng(0)

    def sample(n):
        labels = np.stack([rng.random(n) < 0.5, rng.random(n) < 0.05], 1).astype(np.uint8)
        x = rng.normal(size=(n, 8)).astype(np.float32)
        x[:, 0] += 2.0 * labels[:, 0]
        x[:, 1] += 1.5 * labels[:, 1]
        return x, labels

    (x, y), (test_x, test_y) = sample(600), sample(2000)

    def recall_of_rare(mode):
        settings = HeadTrainingConfig(
            how_many_training_steps=300, learning_rate=0.1, class_weights=mode
        )
        result = train_head(Split(x, y), None, head, settings)
        evaluation = head.evaluate(result.weights, result.biases, [(test_x, test_y)])
        return evaluation.report(["common", "rare"])["per_label"]["rare"]["recall"]

    assert recall_of_rare("balanced") > recall_of_rare("none") + 0.3


# ----------------------------------------------------------------------------- whole runs


def run_config(images: Path, csv_path: Path, out: Path, module: Path, **training) -> RetrainConfig:
    return RetrainConfig(
        image_dir=str(images),
        data=DataConfig(labels_csv=str(csv_path), testing_percentage=25, validation_percentage=25),
        module=ModuleConfig(handle=str(module), extraction_backend="tensorflow"),
        cache=CacheConfig(bottleneck_dir=str(out / "bottlenecks")),
        training=HeadTrainingConfig(
            how_many_training_steps=300, learning_rate=0.5, train_batch_size=32, **training
        ),
        export=ExportConfig(
            output_graph=str(out / "graph.pb"),
            output_labels=str(out / "labels.txt"),
            output_tflite=str(out / "model.tflite"),
            saved_model_dir=str(out / "saved_model"),
        ),
        outputs=OutputsConfig(
            metrics_json=str(out / "metrics.json"),
            split_manifest=str(out / "manifest.csv"),
            summaries_dir=str(out / "logs"),
        ),
    )


@pytest.fixture(scope="module")
def trained(dataset, tiny_module, tmp_path_factory):
    images, csv_path = dataset
    out = tmp_path_factory.mktemp("run")
    return retrain.run(run_config(images, csv_path, out, tiny_module)), out


def test_run_learns_and_reports_multi_label_metrics(trained):
    result, out = trained
    assert result.labels == LABELS
    assert result.head.head.num_outputs == 3 and len(result.head.head.thresholds) == 3
    test = result.test.report(LABELS)
    assert test["mean_roc_auc"] >= 0.97 and test["macro_f1"] >= 0.8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] == result.test.accuracy == test["exact_match"]
    assert metrics["unlisted_images"] == 2
    assert set(metrics["validation_evaluation"]["per_label"]) == set(LABELS)
    assert metrics["test_evaluation"]["per_label"]["red"]["threshold"] == pytest.approx(
        result.head.head.thresholds[0]
    )
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "path,label,split" and len(manifest) == 91
    summary = metrics["label_summary"]
    assert set(summary) == set(LABELS)
    for split in SPLITS:
        assert (
            sum(1 for row in manifest[1:] if row.endswith(split) and "red" in row)
            == (summary["red"][f"{split}_positives"])
        )
    red = test["per_label"]["red"]
    assert summary["red"]["f1"] == red["f1"] and summary["red"]["threshold"] == red["threshold"]
    assert list((out / "logs" / "test").glob("events.out.tfevents.*"))


def test_the_closing_lines_and_report_show_every_split_per_label(trained, tmp_path):
    from retrain.reporting.html import closing_lines, write_report

    result, out = trained
    lines = closing_lines(run_config(Path("x"), Path("y"), out, Path("m")), result)
    start = next(i for i, line in enumerate(lines) if line.startswith("Labels (all of 3"))
    header = lines[start + 1].split()
    assert header[:4] == ["label", "train", "n+", "(share)"] and "threshold" in header
    assert {lines[start + k].split()[0] for k in (2, 3, 4)} == set(LABELS)
    page = write_report(tmp_path / "r.html", run_config(out, out, out, out), result)
    text = Path(page).read_text()
    assert "Per label across the splits" in text and "test AP" in text


def test_tensorboard_gets_the_shares_per_split(trained):
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = trained
    events = EventAccumulator(str(out / "logs" / "train"), size_guidance={"tensors": 0})
    events.Reload()
    (shares,) = events.Tensors("label_shares")
    table = tf.make_ndarray(shares.tensor_proto).item().decode().splitlines()
    assert table[0].startswith("| label | train n+ (share) | validation n+ (share) |")
    assert {row.split("|")[1].strip() for row in table[2:]} == set(LABELS)


def test_a_shifted_validation_split_is_named_in_the_health_report(
    dataset, tiny_module, tmp_path, caplog
):
    """The CSV puts 'red' on every validation image (about 40% of the others): the run warns
    of the shift naming red alone, and that red has no negatives in validation."""
    import csv
    import logging

    images, csv_path = dataset
    rows = list(csv.reader(csv_path.open()))
    for row in rows[1:]:
        if split_for_file(Path(row[0]).name, 25, 25) == "validation":
            row[1] = "1"
    shifted = write_csv(tmp_path / "shifted.csv", rows[0], rows[1:])
    caplog.set_level(logging.INFO, logger="retrain")
    config = run_config(images, shifted, tmp_path, tiny_module)
    config = dataclasses.replace(
        config,
        training=dataclasses.replace(config.training, how_many_training_steps=20),
        export=ExportConfig(
            output_graph=str(tmp_path / "graph.pb"), output_labels=str(tmp_path / "labels.txt")
        ),
        outputs=OutputsConfig(),
    )
    result = retrain.run(config)
    found = {f.code: f for f in result.health}
    shift = found["label_share_shift"]
    assert [r["label"] for r in shift.numbers["shifts"]] == ["red"]
    assert "red (no negatives in validation)" in found["labels_without_auc"].message
    assert any("Health: 1 label(s) make up a share" in r.getMessage() for r in caplog.records)
    validation = result.evaluations["validation"].report(LABELS)
    assert validation["undefined_roc_auc"] == {"red": "no negatives"}
    assert validation["mean_roc_auc_labels"] == 2


def test_thresholds_are_written_beside_the_labels(trained):
    result, out = trained
    written = (out / "labels.txt.thresholds").read_text().split()
    assert [float(t) for t in written] == list(result.head.head.thresholds)
    assets = out / "saved_model" / "assets"
    assert (assets / "labels.txt.thresholds").read_text().split() == written
    assert result.outputs["thresholds"] == str(out / "labels.txt.thresholds")


def test_every_export_gives_the_evaluations_probabilities(trained):
    import tensorflow as tf

    from retrain.export.loading import TFLiteClassifier

    result, out = trained
    rows = [line.split(",") for line in (out / "manifest.csv").read_text().splitlines()[1:]]
    test_paths = [Path(path) for path, _, split in rows if split == "testing"]
    images = load_test_images(test_paths)
    expected = result.test.probabilities
    np.testing.assert_allclose(graph_scores(out / "graph.pb", images), expected, atol=1e-4)
    model = tf.saved_model.load(str(out / "saved_model"))
    served = model.signatures["serving_default"](tf.constant(images))["final_result"]
    np.testing.assert_allclose(served.numpy(), expected, atol=1e-4)
    tflite = TFLiteClassifier(out / "model.tflite")
    np.testing.assert_allclose(tflite.predict(images), expected, atol=1e-4)


def test_label_image_prints_the_labels_over_their_thresholds(trained, dataset, capsys):
    from label_image import cli as label_cli

    result, out = trained
    images, _ = dataset
    red_and_blue = write_coloured(out / "rb.png", [1, 0, 1], np.random.default_rng(5))
    args = [f"--graph={out / 'graph.pb'}", f"--labels={out / 'labels.txt'}", str(red_and_blue)]
    assert label_cli.main(["label-image", *args]) == 0
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert sorted(printed) == ["blue", "red"]
    assert label_cli.main(["label-image", "--top_k=3", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "(below threshold" in lines[2] and lines[2].startswith("green")
    (out / "labels.txt.thresholds").write_text("0.5\n")
    try:
        assert label_cli.main(["label-image", *args]) == 2
    finally:
        (out / "labels.txt.thresholds").write_text(
            "".join(f"{t!r}\n" for t in result.head.head.thresholds)
        )
    assert "has 1 thresholds for 3 labels" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trainable_module(tmp_path_factory) -> Path:
    """A tiny module with trainable variables, for fine-tuning (tests/test_finetune.py's)."""
    from retrain.models.savedmodel import export_image_module
    from tests.test_finetune import TINY_INPUT, _tiny_network

    path = tmp_path_factory.mktemp("trainable") / "module"
    export_image_module(_tiny_network(), path, TINY_INPUT)
    return path


@pytest.mark.parametrize(
    "options",
    [
        {"distortions": {"flip_left_right": True, "random_crop": 10, "copies": 1}},
        {"distortions": {"flip_left_right": True}, "checkpoint": True},
        {"fine_tune_steps": 3},
    ],
    ids=["cached_copies", "on_the_fly_and_checkpoints", "fine_tuning"],
)
def test_multi_label_runs_with_the_folder_options(
    dataset, tiny_module, trainable_module, tmp_path, options
):
    from dataclasses import replace

    from retrain.config import DistortionConfig, FineTuningConfig
    from retrain.heads.evaluation import MultiLabelEvaluation

    images, csv_path = dataset
    config = run_config(images, csv_path, tmp_path, tiny_module)
    training = replace(config.training, how_many_training_steps=20)
    if options.get("checkpoint"):
        training = replace(training, checkpoint_path=str(tmp_path / "checkpoints"))
    config = replace(
        config,
        training=training,
        distortions=DistortionConfig(**options.get("distortions", {})),
        export=ExportConfig(output_graph=str(tmp_path / "graph.pb")),
    )
    if "fine_tune_steps" in options:
        config = replace(
            config,
            module=replace(config.module, handle=str(trainable_module)),
            fine_tuning=FineTuningConfig(steps=options["fine_tune_steps"], batch_size=8),
        )
    result = retrain.run(config)
    assert isinstance(result.test, MultiLabelEvaluation)
    assert result.test.probabilities.shape == (result.images["testing"], 3)
    if "fine_tune_steps" in options:
        assert isinstance(result.fine_tune.after, MultiLabelEvaluation)
    if options.get("checkpoint"):
        resumed = retrain.run(replace(config, training=replace(training, resume=True)))
        assert resumed.head.resumed_from_step == 20
        np.testing.assert_allclose(resumed.head.weights, result.head.weights)


def test_beam_extract_takes_the_csv_and_caches_what_retrain_uses(dataset, tiny_module, tmp_path):
    pytest.importorskip("apache_beam")
    from retrain.cli import beam_extract

    images, csv_path = dataset
    shared = [
        f"--labels_csv={csv_path}",
        f"--tfhub_module={tiny_module}",
        "--extraction_backend=tensorflow",
        "--testing_percentage=20",
        "--validation_percentage=20",
        "--flip_left_right",
        "--distorted_copies=1",
    ]
    argv = [
        beam_extract.PROG,
        f"--image_dir={images}",
        f"--bottleneck_dir={tmp_path / 'bottlenecks'}",
        f"--summary_json={tmp_path / 'summary.json'}",
        "--runner=DirectRunner",
        *shared,
    ]
    assert beam_extract.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images"] == 90 and 0 < summary["copies"]["total"] < 90
    assert cli.main(retrain_args(images, tmp_path, *shared, steps=5)) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bottlenecks_computed"] == 0
    assert metrics["distortions"]["computed"] == 0
