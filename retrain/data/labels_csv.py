"""Multi-label data: labels read from a CSV instead of class folders (`--labels_csv`).

The file has a header `path,label1,label2,...` and one row per image: its path relative to the
image folder, then 0 or 1 for each label. The result is the same `scan.ImageSet` that class
folders give (paths, and each image's split from the same hash of its base name), with the
0/1 matrix in `targets`.

A row that cannot be used (a missing file, a value that is not 0 or 1, a path listed twice, the
wrong number of values) is left out with a reason naming its line, in `ImageSet.ignored`, and
the run goes on. What makes the file unusable (unreadable, no header, a header without labels
or with a label twice, no usable row, a label that applies to no training image) is a
ConfigError naming `data.labels_csv` (exit status 2 on the command line). Image files under
the image folder that the CSV does not name are ignored and counted (`ImageSet.unlisted`).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain.config import DataConfig
from retrain.data.scan import (
    SPLITS,
    ImageSet,
    PathList,
    _walk_images,
    display_path,
    scan_image_dir,
    split_for_file,
)
from retrain.errors import ConfigError

FIELD = "data.labels_csv"
VALUES = {"0": 0, "1": 1}


def find_images(image_dir: str | os.PathLike, data: DataConfig) -> ImageSet:
    """The images of `image_dir` with their labels and splits: from `data.labels_csv` when it
    names a file, else from the class folders (scan.scan_image_dir)."""
    if data.labels_csv:
        return read_labels_csv(
            data.labels_csv,
            image_dir,
            data.validation_percentage,
            data.testing_percentage,
            data.split_hash,
        )
    return scan_image_dir(
        image_dir,
        data.validation_percentage,
        data.testing_percentage,
        split_hash=data.split_hash,
    )


@dataclass
class _Rows:
    """The usable rows read so far, and the reasons for those left out."""

    paths: list[str] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)
    first_line: dict[str, int] = field(default_factory=dict)  # normalised path -> its line
    ignored: list[tuple[str, str]] = field(default_factory=list)


def read_labels_csv(
    csv_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    validation_percentage: float,
    testing_percentage: float,
    split_hash: str = "basename",
) -> ImageSet:
    """The multi-label ImageSet that the CSV at `csv_path` describes (see the module
    docstring), split by a hash of each file's base name or ("path") of
    os.path.join(image_dir as given, the row's path); raises ConfigError naming
    `data.labels_csv` when it cannot be used."""
    root = Path(image_dir).expanduser()
    name = display_path(csv_path)
    labels, body = _read_table(Path(csv_path).expanduser(), name)
    rows = _Rows()
    hashed = []
    for line, values in body:
        reason = _row_problem(values, labels, root, rows)
        if reason is None:
            rows.first_line[_normalised(root, values[0])] = line
            rows.paths.append(str(root / values[0].strip()))
            relative = values[0].strip()
            hashed.append(
                os.path.basename(relative)
                if split_hash == "basename"
                else os.path.join(os.fspath(image_dir), relative)
            )
            rows.targets.append([VALUES[v.strip()] for v in values[1:]])
        else:
            rows.ignored.append((f"{name} line {line}", reason + "; row skipped"))
    if not rows.paths:
        raise ConfigError(f"{{0}}: {name} has no usable row (see the warnings above)", FIELD)
    splits = np.array(
        [
            SPLITS.index(split_for_file(name, validation_percentage, testing_percentage))
            for name in hashed
        ],
        dtype=np.int8,
    )
    targets = np.array(rows.targets, dtype=np.uint8)
    _check_training_positives(labels, targets, splits, name)
    return ImageSet(
        image_dir=root,
        labels=labels,
        paths=PathList(rows.paths),
        label_indices=np.full(len(rows.paths), -1, dtype=np.int32),
        split_codes=splits,
        ignored=rows.ignored,
        targets=targets,
        unlisted=_count_unlisted(root, set(rows.first_line)),
    )


def _read_table(path: Path, name: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The labels of the header and the (line number, values) of every non-blank row."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            table = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigError(f"{{0}}: cannot read {name}: {reason}", FIELD) from None
    table = [(line, row) for line, row in table if any(v.strip() for v in row)]
    if not table:
        raise ConfigError(f"{{0}}: {name} is empty; expected a header path,label1,...", FIELD)
    header = [v.strip() for v in table[0][1]]
    if header[0].lower() != "path":
        raise ConfigError(
            f"{{0}}: {name} line {table[0][0]}: the header must start with 'path', "
            f"got {header[0]!r} (expected path,label1,label2,...)",
            FIELD,
        )
    labels = header[1:]
    if not labels:
        raise ConfigError(f"{{0}}: {name}: the header names no label after 'path'", FIELD)
    for i, label in enumerate(labels):
        if not label:
            raise ConfigError(f"{{0}}: {name}: label column {i + 2} has no name", FIELD)
        if label in labels[:i]:
            raise ConfigError(f"{{0}}: {name}: the label {label!r} is named twice", FIELD)
    return labels, table[1:]


def _row_problem(values: list[str], labels: list[str], root: Path, rows: _Rows) -> str | None:
    """Why a row cannot be used, or None when it can."""
    if len(values) != len(labels) + 1:
        return f"{len(values)} values, expected {len(labels) + 1} (path and one per label)"
    path = values[0].strip()
    if not path:
        return "no image path"
    for label, value in zip(labels, values[1:]):
        if value.strip() not in VALUES:
            return f"label {label!r} has the value {value.strip()!r}; expected 0 or 1"
    first = rows.first_line.get(_normalised(root, path))
    if first is not None:
        return f"{path} is listed again (first on line {first})"
    if not os.path.isfile(root / path):
        return f"image not found: {path}"
    return None


def _normalised(root: Path, relative: str) -> str:
    return os.path.normpath(os.path.join(root, relative.strip()))


def _check_training_positives(
    labels: list[str], targets: np.ndarray, splits: np.ndarray, name: str
) -> None:
    """Raise ConfigError naming every label that applies to no training image."""
    training = targets[splits == SPLITS.index("training")]
    never = [label for label, count in zip(labels, training.sum(axis=0)) if count == 0]
    if never:
        raise ConfigError(
            f"{{0}}: {name}: label "
            + ", ".join(repr(label) for label in never)
            + " is never 1 in the training split; it cannot be learned (label more images, "
            "drop the column, or lower {1}/{2})",
            FIELD,
            "data.validation_percentage",
            "data.testing_percentage",
        )


def _count_unlisted(root: Path, listed: set[str]) -> int:
    """How many image files under `root` are not among the `listed` (normalised) paths."""
    found = _walk_images(str(root), [])
    return sum(1 for path in found if os.path.normpath(path) not in listed)
