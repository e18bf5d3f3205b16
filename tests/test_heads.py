"""The Head answers every question about the form of the labels (retrain.heads.head): what the
labels count per output, which outputs an example has, how a label reads, how scores are judged;
and no module outside retrain/heads/ asks a label array for its shape."""

from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from retrain.heads.head import SigmoidHead, SoftmaxHead, make_head
from tests.conftest import ROOT

NAMES = ["cat", "dog", "hat"]
CLASSES = np.array([2, 0, 2, 2], np.int64)  # class indices [n]
ROWS = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0]], np.uint8)  # 0/1 rows [n, 3]


def test_the_kind_of_labels():
    assert not SoftmaxHead(3).multi_label and SigmoidHead(3).multi_label
    assert (SoftmaxHead(3).output_noun, SigmoidHead(3).output_noun) == ("class", "label")


def test_positives_count_each_output():
    softmax, sigmoid = SoftmaxHead(3).positives(CLASSES), SigmoidHead(3).positives(ROWS)
    assert softmax.tolist() == [1, 0, 3] and softmax.dtype == np.int64
    assert sigmoid.tolist() == [3, 1, 1] and sigmoid.dtype == np.int64
    # No examples: zero for every output.
    assert SoftmaxHead(3).positives(CLASSES[:0]).tolist() == [0, 0, 0]
    assert SigmoidHead(3).positives(ROWS[:0]).tolist() == [0, 0, 0]


def test_membership_is_one_hot_or_the_rows():
    softmax = SoftmaxHead(3).membership(CLASSES)
    assert softmax.dtype == np.float32 and softmax.tolist() == [
        [0, 0, 1],
        [1, 0, 0],
        [0, 0, 1],
        [0, 0, 1],
    ]
    sigmoid = SigmoidHead(3).membership(ROWS)
    assert sigmoid.dtype == np.float32
    np.testing.assert_array_equal(sigmoid, ROWS)
    # What the counts say, the membership says too.
    np.testing.assert_array_equal(softmax.sum(axis=0), SoftmaxHead(3).positives(CLASSES))
    np.testing.assert_array_equal(sigmoid.sum(axis=0), SigmoidHead(3).positives(ROWS))


def test_label_text():
    softmax, sigmoid = SoftmaxHead(3), SigmoidHead(3)
    assert softmax.label_text(CLASSES[0], NAMES) == "hat"
    assert softmax.label_text(1, NAMES, ";") == "dog"
    assert sigmoid.label_text(ROWS[0], NAMES) == "cat,hat"
    assert sigmoid.label_text(ROWS[0], NAMES, ";") == "cat;hat"
    assert sigmoid.label_text(ROWS[1], NAMES) == ""
    assert sigmoid.label_text(ROWS[3], NAMES, ";") == "cat"


def test_softmax_accuracy_is_the_top_class():
    scores = np.array([[0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    head = SoftmaxHead(3)
    assert head.accuracy(scores, CLASSES) == pytest.approx(3 / 4)
    assert head.accuracy(scores, CLASSES, [0.9, 0.9, 0.9]) == pytest.approx(3 / 4)  # argmax
    assert head.accuracy(scores[:0], CLASSES[:0]) == 0.0


def test_sigmoid_accuracy_is_the_exact_match_at_thresholds():
    scores = np.array([[0.9, 0.2, 0.6], [0.1, 0.1, 0.1], [0.8, 0.4, 0.3], [0.7, 0.1, 0.2]])
    head = SigmoidHead(3)
    assert head.accuracy(scores, ROWS) == pytest.approx(3 / 4)  # 0.5 each: row 2 misses "dog"
    assert head.accuracy(scores, ROWS, [0.5, 0.3, 0.5]) == 1.0
    assert head.accuracy(scores, ROWS, [0.95, 0.3, 0.5]) == 0.25
    # Without thresholds given, the head's own (calibrated) ones decide.
    tuned = SigmoidHead(3, label_thresholds=(0.5, 0.3, 0.5))
    assert tuned.accuracy(scores, ROWS) == 1.0
    assert head.accuracy(scores[:0], ROWS[:0]) == 0.0


def test_make_head_follows_the_image_set():
    assert make_head(SimpleNamespace(multi_label=False, labels=NAMES)) == SoftmaxHead(3)
    assert make_head(SimpleNamespace(multi_label=True, labels=NAMES)) == SigmoidHead(3)


def test_the_package_offers_the_heads_without_importing_tensorflow():
    code = (
        "import sys, retrain.heads, retrain.heads.evaluation, retrain.heads.thresholds; "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"
    import retrain.heads

    assert retrain.heads.make_head is make_head and retrain.heads.SigmoidHead is SigmoidHead


# Outside retrain/heads/, `ndim` only checks arrays of images (or the cache's index), never
# labels: each file's count of those checks.
NDIM_ALLOWED = {
    "retrain/bottlenecks/backends.py": 2,  # the TFLite extractor's images, auto's samples
    "retrain/bottlenecks/cache.py": 1,  # the cache index file
    "retrain/bottlenecks/distribute.py": 1,  # a mirrored batch of images
    "retrain/export/loading.py": 1,  # a batch of images to classify
}


def test_only_heads_ask_labels_for_their_shape():
    found = {}
    for path in sorted((ROOT / "retrain").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("retrain/heads/"):
            continue
        count = len(re.findall(r"\bndim\b", path.read_text()))
        if count:
            found[relative] = count
    assert found == NDIM_ALLOWED, "ndim outside retrain/heads/: ask the Head instead"
