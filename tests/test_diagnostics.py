"""Seeing why a model does or does not learn: the pictures, TensorBoard's images, text and
projector, the HTML report, the learning-rate finder and the end-of-run summary."""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import io
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrain.cli import retrain as cli
from retrain.errors import RetrainError
from retrain.reporting import pictures
from tests.conftest import EXAMPLE_DIR, ROOT, retrain_args

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ----------------------------------------------------------------------------- pictures


def test_confusion_image_shades_right_answers_blue_and_confusions_red():
    matrix = np.array([[9, 1], [0, 10]])
    image = pictures.confusion_image(matrix, ["cats", "dogs"], cell=40)
    pixels = np.asarray(image)
    height, width, _ = pixels.shape
    # The cells are the last 2 x 2 * 40 pixels before the 12-pixel right/bottom margin.
    right_cell = pixels[height - 12 - 80 + 5, width - 12 - 80 + 5]  # row cats, column cats
    confusion = pixels[height - 12 - 80 + 5, width - 12 - 40 + 5]  # cats taken for dogs
    empty = pixels[height - 12 - 40 + 5, width - 12 - 80 + 5]  # dogs taken for cats: none
    assert right_cell[2] > right_cell[0] + 100  # deep blue: 90% recall
    assert confusion[0] > confusion[2]  # reddish
    assert tuple(empty) == (255, 255, 255)


def test_mistakes_grid_captions_every_image_even_unreadable_ones(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    photo = sorted(EXAMPLE_DIR.glob("roses/*.jpg"))[0]
    mistakes = [
        pictures.Mistake(str(photo), "roses", "tulips", 0.91),
        pictures.Mistake(str(broken), "roses", "daisy", 0.55),
    ]
    grid = pictures.mistakes_grid(mistakes, columns=6)
    tile = pictures.THUMBNAIL + 8
    assert grid.size == (2 * tile, pictures.THUMBNAIL + pictures.CAPTION + 8)
    photo_area = np.asarray(grid)[4 : 4 + 60, 4 : 4 + 60]
    blank_area = np.asarray(grid)[4 : 4 + 60, tile + 4 : tile + 64]
    assert photo_area.std() > 10 and blank_area.std() == 0
    assert pictures.mistakes_grid([]) is None


def test_line_chart_needs_a_finite_point():
    chart = pictures.line_chart({"loss": ([1, 2, 3], [0.5, float("nan"), 0.2])}, "t", "step")
    assert chart.size == (520, 280)
    with pytest.raises(RetrainError, match="no finite value"):
        pictures.line_chart({"loss": ([1], [float("inf")])}, "t", "step")


# ----------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory):
    """One CLI run on the test photos with every diagnostic output asked for."""
    out = tmp_path_factory.mktemp("diagnosed")
    photos = out / "photos"
    shutil.copytree(EXAMPLE_DIR, photos)
    argv = retrain_args(
        photos,
        out,
        f"--report_html={out / 'report.html'}",
        "--print_misclassified_test_images",
        steps=200,
    )
    status = cli.main(argv)
    assert status == 0
    return out, json.loads((out / "metrics.json").read_text())


def _tensorboard(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    return {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}


def _png(event) -> Image.Image:
    import tensorflow as tf

    encoded = tf.make_ndarray(event.tensor_proto)  # [width, height, png bytes]
    return Image.open(io.BytesIO(encoded[2]))


def test_tensorboard_gets_the_confusion_matrix_and_the_misclassified_images(diagnosed):
    out, metrics = diagnosed
    test = _tensorboard(out / "logs" / "test")
    confusion = _png(test["confusion_matrix"][0])
    assert confusion.format == "PNG" and min(confusion.size) > 200
    mistakes = sum(
        sum(row) - row[i] for i, row in enumerate(metrics["test_evaluation"]["confusion_matrix"])
    )
    assert ("misclassified" in test) == (mistakes > 0)
    if mistakes:
        grid = _png(test["misclassified"][0])
        tiles = (grid.width // (pictures.THUMBNAIL + 8)) * (
            grid.height // (pictures.THUMBNAIL + pictures.CAPTION + 8)
        )
        assert tiles >= mistakes
    assert "confusion_matrix" in _tensorboard(out / "logs" / "validation")


def test_tensorboard_gets_update_ratios_learning_rate_and_the_health_report(diagnosed):
    import tensorflow as tf

    out, metrics = diagnosed
    train = _tensorboard(out / "logs" / "train")
    for tag in ("learning_rate", "update_to_weight_ratio/weights", "update_to_weight_ratio/biases"):
        assert len(train[tag]) == 20, tag  # every 10 of the 200 steps
    ratio = float(tf.make_ndarray(train["update_to_weight_ratio/weights"][-1].tensor_proto))
    assert 0 < ratio < 1
    text = tf.make_ndarray(train["health"][0].tensor_proto).item().decode()
    codes = [finding["code"] for finding in metrics["health"]]
    if codes:
        assert "| severity | finding | suggestion |" in text
        assert all(f["message"].split(":")[0] in text for f in metrics["health"])
    else:
        assert text == "No problem found."


def test_projector_shows_every_vector_with_its_file_label_and_split(diagnosed):
    out, metrics = diagnosed
    folder = out / "logs" / "projector"
    rows = (folder / "metadata.tsv").read_text().splitlines()
    assert rows[0] == "file\tlabel\tsplit"
    assert len(rows) - 1 == sum(metrics["images"].values())
    file, label, split = rows[1].split("\t")
    assert Path(file).parent.name == label and split in ("training", "validation", "testing")
    assert list(folder.glob("events.out.tfevents.*"))  # else TensorBoard lists no such run
    config = (folder / "projector_config.pbtxt").read_text()
    assert "metadata.tsv" in config and "bottlenecks/.ATTRIBUTES/VARIABLE_VALUE" in config
    import tensorflow as tf

    checkpoint = tf.train.latest_checkpoint(str(folder))
    vectors = tf.train.load_variable(checkpoint, "bottlenecks/.ATTRIBUTES/VARIABLE_VALUE")
    assert vectors.shape == (len(rows) - 1, 1280)


def test_metrics_hold_the_validation_evaluation_and_the_learning_rate(diagnosed):
    _, metrics = diagnosed
    validation = metrics["validation_evaluation"]
    assert validation["n"] == metrics["images"]["validation"]
    low, high = validation["accuracy_interval_95"]
    assert low <= validation["accuracy"] <= high


def test_report_is_one_self_contained_page(diagnosed):
    out, metrics = diagnosed
    page = (out / "report.html").read_text()
    for heading in ("Health", "Training", "Evaluation: test split", "What was run"):
        assert f"<h2>{heading}" in page, heading
    accuracy = metrics["test_evaluation"]["accuracy"]
    assert f"Test accuracy <b>{100 * accuracy:.1f}%" in page
    assert not re.search(r"""(src|href)=['"](?!data:)""", page)  # nothing outside the file
    images = re.findall(r"src='data:image/(png|jpeg);base64,([^']+)'", page)
    assert len(images) >= 4  # 3 charts (loss, accuracy, rate), 2 confusion matrices, ...
    for kind, data in images:
        assert Image.open(io.BytesIO(base64.b64decode(data))).format == kind.upper()
    for name in metrics["classes"]:
        assert f"<td>{name}</td>" in page


def test_run_ends_with_a_summary_and_prints_the_misclassified_images(diagnosed, capfd):
    out, metrics = diagnosed
    # The fixture's output went to the terminal of pytest: rerun cheaply from the cache.
    again = out / "again"
    argv = retrain_args(out / "photos", again, "--print_misclassified_test_images", steps=20)
    argv[2] = f"--bottleneck_dir={out / 'bottlenecks'}"
    assert cli.main(argv) == 0
    err = capfd.readouterr().err
    summary = err[err.index("--- Summary ---") :]
    assert re.search(r"Test accuracy \d+\.\d% \(95% interval .*N=\d+\)", summary)
    assert "Weakest classes (recall):" in summary
    assert "Try it: label-image --graph" in summary
    assert f"tensorboard --logdir {out / 'again' / 'logs'}" in summary
    listed = err[err.index("=== MISCLASSIFIED TEST IMAGES ===") :].split("--- Summary")[0]
    confusion = json.loads((again / "metrics.json").read_text())["test_evaluation"]
    mistakes = sum(sum(row) - row[i] for i, row in enumerate(confusion["confusion_matrix"]))
    assert listed.count("(true: ") == mistakes


def test_progress_bar_on_a_terminal_replaces_the_step_lines(diagnosed, tmp_path):
    out, _ = diagnosed
    argv = retrain_args(out / "photos", tmp_path, steps=200)[1:]
    argv[1] = f"--bottleneck_dir={out / 'bottlenecks'}"
    command = [sys.executable, "-m", "retrain", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    on_terminal = _run_on_terminal(command, env)
    assert "Training: 100%" in on_terminal and "200/200" in on_terminal
    assert "Step 10: Train accuracy" not in on_terminal
    assert "Final test accuracy = " in on_terminal  # the line scripts parse stays
    # Piped, the step lines stay and no bar is drawn: test_faults' piped reference run.


def _run_on_terminal(command: list[str], env: dict) -> str:
    """The output of `command` run with stdout and stderr on a pseudo-terminal."""
    leader, follower = pty.openpty()
    rows_columns = struct.pack("HHHH", 40, 120, 0, 0)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, rows_columns)  # a new pty is 0 x 0
    process = subprocess.Popen(command, env=env, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


def test_audit_report_shows_each_finding_with_thumbnails(tmp_path):
    pytest.importorskip("cleanlab")
    pytest.importorskip("faiss")
    import retrain
    from tests.fault_tools import save_tiny_module
    from tests.test_audit import audit_config, clean_folder, photo

    save_tiny_module(tmp_path / "module")
    root = clean_folder(tmp_path / "images")
    photo(root / "blue" / "filed_wrong.png", 0, seed=999)
    shutil.copy(root / "red" / "r3.png", root / "blue" / "copy_of_r3.png")
    config = audit_config(root, tmp_path, tmp_path / "module")
    outputs = retrain.OutputsConfig(report_html=str(tmp_path / "audit.html"))
    report = retrain.audit_photos(dataclasses.replace(config, outputs=outputs))
    page = (tmp_path / "audit.html").read_text()
    assert f"Audit of {report.images} images" in page
    for title in ("Suspect labels", "Duplicates", "Outliers"):
        assert f"<h3>{title}" in page
    suspects = page[page.index("<h3>Suspect labels") : page.index("<h3>Duplicates")]
    assert "filed_wrong.png" in suspects and "looks like red" in suspects
    assert suspects.count("data:image/jpeg") == min(len(report.suspects), 30)
    duplicates = page[page.index("<h3>Duplicates") : page.index("<h3>Outliers")]
    assert "copy_of_r3.png" in duplicates and "identical file" in duplicates
    assert "<h2>Training" not in page  # an audit trains nothing it reports


# ----------------------------------------------------------------------------- lr finder


def test_lr_find_suggests_a_rate_and_writes_its_plot(diagnosed, tmp_path, capfd):
    out, _ = diagnosed
    argv = retrain_args(out / "photos", tmp_path, "--lr_find")
    argv[2] = f"--bottleneck_dir={out / 'bottlenecks'}"
    assert cli.main(argv) == 0
    err = capfd.readouterr().err
    found = json.loads((tmp_path / "metrics.json").read_text())["lr_find"]["training"]
    assert 1e-6 < found["suggested_learning_rate"] < 10
    assert found["suggested_learning_rate"] <= found["lowest_loss_rate"] / 10 * 1.05
    assert f"suggested learning rate {found['suggested_learning_rate']:g}" in err
    assert "<- lowest loss; suggested rate" in err
    assert not (tmp_path / "graph.pb").exists()  # it trains nothing it keeps
    chart = _png(_tensorboard(tmp_path / "logs" / "lr_find")["loss_against_rate/training"][0])
    assert chart.size == (520, 280)


def test_learning_rate_auto_trains_at_the_suggested_rate(diagnosed, tmp_path):
    out, _ = diagnosed
    argv = retrain_args(out / "photos", tmp_path, "--learning_rate=auto", steps=100)
    argv[2] = f"--bottleneck_dir={out / 'bottlenecks'}"
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    suggested = metrics["lr_find"]["training"]["suggested_learning_rate"]
    assert metrics["test_accuracy"] is not None and (tmp_path / "graph.pb").exists()
    train = _tensorboard(tmp_path / "logs" / "train")
    import tensorflow as tf

    rate = float(tf.make_ndarray(train["learning_rate"][0].tensor_proto))
    assert rate == pytest.approx(suggested)


@pytest.mark.parametrize("value", ["fast", "-1", "0"])
def test_bad_learning_rate_is_one_line_exit_2(value, tmp_path, capfd):
    status = cli.main(retrain_args(EXAMPLE_DIR, tmp_path, f"--learning_rate={value}"))
    err = capfd.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "--learning_rate" in err, err


def test_lr_finder_on_separable_data_suggests_a_rate_that_learns():
    from retrain.bottlenecks.splits import Split
    from retrain.config import HeadTrainingConfig
    from retrain.heads.head import SoftmaxHead
    from retrain.training.lr_find import search_learning_rate

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    # Features of scale 3: the loss clearly diverges before the finder's largest rate, whatever
    # the batches drawn (seeds 0-2, either sampling).
    x = (rng.normal(0, 3, (600, 16)) + 9 * np.eye(3, 16)[y]).astype(np.float32)
    search = search_learning_rate(Split(x, y), SoftmaxHead(3), HeadTrainingConfig())
    assert min(search.smoothed) < 0.5 * search.smoothed[0]  # the loss fell ...
    assert search.smoothed[-1] > min(search.smoothed)  # ... then rose again
    assert 1e-4 < search.suggestion < 10
    lines = search.text_plot()
    assert sum("<- lowest loss" in line for line in lines) == 1


# ----------------------------------------------------------------------------- browser


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium)")
def test_report_renders_in_headless_chromium(diagnosed, tmp_path):
    out, _ = diagnosed
    shot = tmp_path / "report.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,2400",
        f"--screenshot={shot}",
        (out / "report.html").as_uri(),
    ]
    subprocess.run(command, capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1200)
    blue_lines = ((pixels[..., 2] > 150) & (pixels[..., 0] < 60)).sum()  # chart lines, cells
    assert pixels.std() > 20 and blue_lines > 500


def test_suggestion_is_a_tenth_of_the_lowest_or_the_steepest_fall_if_smaller():
    from retrain.training.lr_find import suggest

    rates = [10.0 ** (e / 4) for e in range(-24, 5)]  # 1e-6 ... 10, four points a decade
    # Falls fastest around 1e-1, lowest at 1 (a tenth: 0.1), then diverges.
    turned_up = [2.3] * 16 + [2.2, 2.0, 1.7, 1.3, 0.9, 0.6, 0.4, 0.3, 0.25, 0.6, 2.0, 5.0, 9.0]
    assert suggest(rates, turned_up) == pytest.approx(0.1)
    # A set the layer memorises: the loss never turns up, and fell fastest at 10**-3.75.
    memorised = [2.3] * 8 + [2.2, 1.0, 0.8, 0.6] + [0.5 - 0.02 * i for i in range(17)]
    assert suggest(rates, memorised) == pytest.approx(10.0 ** (-15 / 4))
    # Fine-tuning a layer that fits: flat and noisy, then rising after 10**-1.25.
    already_fit = [0.2, 0.13, 0.21] * 6 + [0.2, 0.21, 0.3, 0.9, 3.0, 8.0, 9.0, 9.0, 9.0, 9.0, 9.0]
    assert suggest(rates, already_fit, "edge") == pytest.approx(10.0 ** (-5 / 4) / 10)
