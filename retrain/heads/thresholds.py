"""The thresholds file of a multi-label classifier: beside its labels file L, the file
`L.thresholds` (`thresholds_path`) holds one threshold per line, in the order of the labels; a
label is predicted where its probability is at least its threshold. The SavedModel holds it as
`assets/labels.txt.thresholds`. Importing this module does not import TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from retrain.utils.atomic import atomic_write_text

SUFFIX = ".thresholds"


def thresholds_path(labels_path: str | os.PathLike) -> str:
    """Where the thresholds of the labels file `labels_path` are: its name + '.thresholds'."""
    return os.fspath(labels_path) + SUFFIX


def write_thresholds(thresholds: Sequence[float], labels_path: str | os.PathLike) -> str:
    """Write `thresholds` (one per line, exactly as floats print) beside the labels file
    `labels_path`, atomically; returns the path written."""
    path = thresholds_path(labels_path)
    atomic_write_text(path, "".join(f"{float(t)!r}\n" for t in thresholds), "thresholds")
    return path


def read_thresholds(labels_path: str | os.PathLike) -> list[float] | None:
    """The thresholds beside the labels file `labels_path`, or None when there is no such
    file. Raises OSError when it cannot be read, ValueError (naming the line) when a line is
    not a number in [0, 1]."""
    path = thresholds_path(labels_path)
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [(n, line.strip()) for n, line in enumerate(handle, 1) if line.strip()]
    except FileNotFoundError:
        return None
    thresholds = []
    for n, text in lines:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{path} line {n}: {text!r} is not a threshold in [0, 1]")
        thresholds.append(value)
    return thresholds
