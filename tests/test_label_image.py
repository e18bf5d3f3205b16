"""Tests of label-image's command line (label_image.cli) on a tiny classifier in every format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from label_image import cli as label_cli
from retrain.errors import UsageError
from retrain.export.tflite_labels import with_labels
from tests.conftest import write_image
from tests.tflite_models import TinyClassifier, write_tflite, write_tiny_classifier


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("label_image")
    path, _ = write_tiny_classifier(folder / "tiny.tflite")
    labels = folder / "labels.txt"
    labels.write_text("red\ngreen\nblue\ngrey\n")
    return [f"--graph={path}", f"--labels={labels}"]


def test_usage_errors_are_retrains_and_exit_2(tmp_path, capsys):
    assert label_cli.UsageError is UsageError
    with pytest.raises(UsageError, match=r"^--labels: cannot read .*missing\.txt: "):
        label_cli.read_labels(str(tmp_path / "missing.txt"))
    for argv, message in (
        ([], "--image: give at least one image file"),
        (["--top_k=0", "a.jpg"], "--top_k must be positive, got 0"),
        (["--input_std=0", "a.jpg"], "--input_std must not be 0"),
        (["--no_such_flag", "a.jpg"], "Unknown command line flag 'no_such_flag'"),
    ):
        assert label_cli.main(["label-image", *argv]) == 2
        assert capsys.readouterr().err == f"label-image: error: {message}\n"


def test_a_file_that_is_not_a_model_is_a_usage_error(tmp_path, capsys):
    graph = tmp_path / "model.tflite"
    graph.write_text("not a model")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\n")
    image = write_image(tmp_path / "a.png")
    assert (
        label_cli.main(["label-image", f"--graph={graph}", f"--labels={labels}", str(image)]) == 2
    )
    assert capsys.readouterr().err == (
        f"label-image: error: --graph: {graph} is not a model: neither a TensorFlow GraphDef "
        "(.pb) nor a .tflite, or a damaged one\n"
    )


def test_bad_images_are_reported_and_the_rest_classified(model_args, tmp_path, capsys):
    good = write_image(tmp_path / "good.png", size=(30, 20))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    images = [str(empty), str(good), str(text)]
    assert label_cli.main(["label-image", *model_args, "--top_k=2", *images]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"label-image: error: --image {empty}: empty file (0 bytes)",
        f"label-image: error: --image {text}: not an image file, or an unsupported format",
    ]
    lines = captured.out.splitlines()
    assert lines[0] == f"{good}:" and len(lines) == 3
    assert all(line.split()[0] in ("red", "green", "blue", "grey") for line in lines[1:])


# ----------------------------------------------------------------------------- every format


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, Path]:
    """The tiny classifier as a frozen graph, a SavedModel (labels in its assets) and a
    .tflite carrying its labels."""
    folder = tmp_path_factory.mktemp("formats")
    model = TinyClassifier()
    concrete = model.__call__.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete).graph.as_graph_def()
    (folder / "graph.pb").write_bytes(frozen.SerializeToString())
    model.labels_file = tf.saved_model.Asset(str(write_labels(folder / "labels.txt")))
    tf.saved_model.save(model, str(folder / "saved"), signatures={"serving_default": concrete})
    plain = write_tflite(folder / "plain.tflite", model.__call__, model)
    (folder / "model.tflite").write_bytes(with_labels(plain.read_bytes(), LABELS))
    return {
        "pb": folder / "graph.pb",
        "saved": folder / "saved",
        "tflite": folder / "model.tflite",
        "labels": folder / "labels.txt",
    }


LABELS = ["red", "green", "blue", "grey"]


def write_labels(path: Path, labels=LABELS) -> Path:
    path.write_text("".join(f"{label}\n" for label in labels))
    return path


def run_json(capsys, *args) -> tuple[int, list[dict], list[str]]:
    status = label_cli.main(["label-image", "--json", *map(str, args)])
    captured = capsys.readouterr()
    return status, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_every_format_by_content_with_its_own_labels(formats, tmp_path, capsys):
    images = [
        write_image(tmp_path / f"{i}.png", size=(30, 20), color=c)
        for i, c in enumerate([(250, 10, 10), (10, 250, 10), (10, 10, 250)])
    ]
    results = {}
    for name in ("pb", "saved", "tflite"):
        labels = [f"--labels={formats['labels']}"] if name == "pb" else []  # the others carry them
        status, rows, err = run_json(
            capsys, f"--graph={formats[name]}", *labels, "--top_k=4", *images
        )
        assert status == 0 and err == ""
        assert [row["file"] for row in rows] == [str(p) for p in images]
        assert all(sorted(row["labels"]) == sorted(LABELS) for row in rows)
        results[name] = np.array(
            [dict(zip(r["labels"], r["scores"]))[x] for r in rows for x in LABELS]
        )
    np.testing.assert_allclose(results["saved"], results["pb"], atol=1e-5)
    np.testing.assert_allclose(results["tflite"], results["pb"], atol=1e-5)
    renamed = tmp_path / "model.pb"  # a .tflite by content, whatever its name
    renamed.write_bytes(formats["tflite"].read_bytes())
    status, rows, _ = run_json(capsys, f"--graph={renamed}", "--top_k=1", images[0])
    assert status == 0 and len(rows[0]["labels"]) == 1


def test_folders_are_walked_and_their_problems_reported(formats, tmp_path, capsys):
    folder = tmp_path / "photos"
    first = write_image(folder / "b.png")
    second = write_image(folder / "sub" / "a.jpg")
    (folder / "notes.txt").write_text("not an image")  # not an image name: not walked
    (folder / ".hidden.png").write_bytes(b"")
    empty_folder = tmp_path / "nothing"
    empty_folder.mkdir()
    empty_file = tmp_path / "empty.jpg"
    empty_file.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    args = [f"--graph={formats['tflite']}", folder, empty_folder, empty_file, missing]
    status, rows, err = run_json(capsys, *args)
    assert status == 1
    assert err.splitlines() == [
        f"label-image: error: --image {empty_folder}: no image files in this folder",
        f"label-image: error: --image {empty_file}: empty file (0 bytes)",
        f"label-image: error: --image {missing}: cannot read: No such file or directory",
    ]
    classified = [row["file"] for row in rows if "labels" in row]
    assert classified == [str(first), str(second)]
    assert {row["file"]: row["error"] for row in rows if "error" in row} == {
        str(empty_folder): "no image files in this folder",
        str(empty_file): "empty file (0 bytes)",
        str(missing): "cannot read: No such file or directory",
    }
    status = label_cli.main(["label-image", f"--graph={formats['tflite']}", str(folder)])
    assert status == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{first}:"


def test_labels_that_do_not_fit_the_model_are_one_line_exit_2(formats, tmp_path, capsys):
    image = write_image(tmp_path / "a.png")
    short = write_labels(tmp_path / "three.txt", LABELS[:3])
    for name in ("pb", "saved", "tflite"):
        args = [f"--graph={formats[name]}", f"--labels={short}", str(image)]
        assert label_cli.main(["label-image", *args]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == (
            f"label-image: error: --labels: {short} has 3 labels for a model with 4 outputs\n"
        )


def test_bad_node_names_list_the_candidates(formats, tmp_path, capsys):
    image = write_image(tmp_path / "a.png")
    labels = f"--labels={formats['labels']}"
    for name, flag, message in (
        ("pb", "--input_layer=input", "--input_layer: no 'input' in {}; candidates: images"),
        ("pb", "--output_layer=out", "--output_layer: no 'out' in {}; candidates: Identity"),
        ("saved", "--output_layer=out", "--output_layer: no 'out' in {}; candidates: output_0"),
    ):
        graph = formats[name]
        assert label_cli.main(["label-image", f"--graph={graph}", labels, flag, str(image)]) == 2
        assert capsys.readouterr().err == f"label-image: error: --graph: {message.format(graph)}\n"
    # A .tflite has one input and one output: names given for a graph are ignored, with a word.
    graph = formats["tflite"]
    assert label_cli.main(["label-image", f"--graph={graph}", "--input_layer=x", str(image)]) == 0
    assert capsys.readouterr().err == (
        "label-image: warning: ignored --input_layer x: a .tflite has one input and one output\n"
    )


@pytest.mark.parametrize("name", ["pb", "tflite", "saved"])
def test_damaged_models_are_one_line_exit_2(formats, tmp_path, capsys, name):
    image = write_image(tmp_path / "a.png")
    source = formats[name]
    if name == "saved":
        damaged = tmp_path / "saved"
        shutil.copytree(source, damaged)
        data = (damaged / "saved_model.pb").read_bytes()
        (damaged / "saved_model.pb").write_bytes(data[: len(data) // 2])
    else:
        damaged = tmp_path / source.name
        damaged.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    args = [f"--graph={damaged}", f"--labels={formats['labels']}", str(image)]
    assert label_cli.main(["label-image", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("label-image: error: --graph: ")
    assert str(damaged) in lines[0]
