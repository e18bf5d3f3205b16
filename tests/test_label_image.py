"""Tests of label-image's command line (label_image.cli) on a tiny TFLite classifier."""

from __future__ import annotations

import pytest

from label_image import cli as label_cli
from retrain.errors import UsageError
from tests.conftest import write_image
from tests.tflite_models import write_tiny_classifier


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
