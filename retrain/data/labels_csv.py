"""Multi-label data: labels read from a CSV instead of class folders (`--labels_csv`).

The file has a header `path,label1,label2,...` and one row per image: its path relative to the
image folder, then 0 or 1 for each label. The result is the same `scan.ImageSet` that class
folders give (paths, and each image's split from the same hash of its base name), with the
0/1 matrix in `targets`. A column named `split` (anywhere after `path`) gives a row's split
instead: training, validation or testing, or an alias of `layout.SPLIT_NAMES` (train, val,
test, ...); a row with no value there is split by the hash.

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
from retrain.data.layout import (
    SPLIT_NAMES,
    check_split_from,
    find_split_folders,
    scan_split_folders,
    split_name,
)
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
    names a file, else from the class folders, inside split folders when `data.split_from`
    finds them (layout.find_split_folders), else at the top (scan.scan_image_dir)."""
    if data.labels_csv:
        return read_labels_csv(
            data.labels_csv,
            image_dir,
            data.validation_percentage,
            data.testing_percentage,
            data.split_hash,
            data.split_from,
        )
    folders = find_split_folders(image_dir, data.split_from)
    if folders:
        return scan_split_folders(
            image_dir,
            folders,
            data.validation_percentage,
            data.testing_percentage,
            split_hash=data.split_hash,
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
    hashed: list[str] = field(default_factory=list)  # what each row's hash split hashes
    given: list[str | None] = field(default_factory=list)  # each row's split column, if any


def read_labels_csv(
    csv_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    validation_percentage: float,
    testing_percentage: float,
    split_hash: str = "basename",
    split_from: str = "auto",
) -> ImageSet:
    """The multi-label ImageSet that the CSV at `csv_path` describes (see the module
    docstring). A row's split is its `split` column's value where the CSV has one and
    `split_from` is not "hash"; else a hash of the file's base name or ("path") of
    os.path.join(image_dir as given, the row's path). Raises ConfigError naming
    `data.labels_csv` when the file cannot be used, or `data.split_from` when it is "folders"
    and the CSV has no split column."""
    check_split_from(split_from)
    root = Path(image_dir).expanduser()
    name = display_path(csv_path)
    labels, split_column, body = _read_table(Path(csv_path).expanduser(), name)
    if split_from == "folders" and split_column is None:
        raise ConfigError(
            f"{{0}} is folders, but {name} has no split column (path,split,label1,...)",
            "data.split_from",
        )
    rows = _Rows()
    for line, values in body:
        values, given, reason = _take_split(values, split_column, len(labels), split_from)
        reason = reason or _row_problem(values, labels, root, rows)
        if reason is None:
            rows.first_line[_normalised(root, values[0])] = line
            rows.paths.append(str(root / values[0].strip()))
            relative = values[0].strip()
            rows.hashed.append(
                os.path.basename(relative)
                if split_hash == "basename"
                else os.path.join(os.fspath(image_dir), relative)
            )
            rows.given.append(given)
            rows.targets.append([VALUES[v.strip()] for v in values[1:]])
        else:
            rows.ignored.append((f"{name} line {line}", reason + "; row skipped"))
    if not rows.paths:
        raise ConfigError(f"{{0}}: {name} has no usable row (see the warnings above)", FIELD)
    splits = np.array(
        [
            SPLITS.index(given or split_for_file(hashed, validation_percentage, testing_percentage))
            for hashed, given in zip(rows.hashed, rows.given)
        ],
        dtype=np.int8,
    )
    targets = np.array(rows.targets, dtype=np.uint8)
    _check_training_positives(labels, targets, splits, name)
    image_set = ImageSet(
        image_dir=root,
        labels=labels,
        paths=PathList(rows.paths),
        label_indices=np.full(len(rows.paths), -1, dtype=np.int32),
        split_codes=splits,
        ignored=rows.ignored,
        targets=targets,
        unlisted=_count_unlisted(root, set(rows.first_line)),
    )
    if split_column is not None and split_from != "hash":
        from_column = sum(given is not None for given in rows.given)
        image_set.split_note = (
            f"{name}: {from_column} row(s) take their split from its split column, "
            f"{len(rows.given) - from_column} (no value) the hash"
        )
    return image_set


def _take_split(
    values: list[str], column: int | None, labels: int, split_from: str
) -> tuple[list[str], str | None, str | None]:
    """A row without its split value (`column`, None: the CSV has none), the split that value
    names (None: no value, or `split_from` is "hash": the hash decides) and why the row cannot
    be used (None: it can)."""
    if column is None:
        return values, None, None
    if len(values) != labels + 2:
        reason = f"{len(values)} values, expected {labels + 2} (path, split and one per label)"
        return values, None, reason
    value = values[column].strip() if split_from != "hash" else ""
    rest = values[:column] + values[column + 1 :]
    split = split_name(value)
    if value and split is None:
        names = ", ".join(SPLITS) + " (or " + ", ".join(sorted(set(SPLIT_NAMES) - set(SPLITS)))
        return rest, None, f"split {value!r} is not one of {names}; empty: by the hash)"
    return rest, split, None


def _read_table(path: Path, name: str) -> tuple[list[str], int | None, list[tuple[int, list[str]]]]:
    """The labels of the header, the position of its split column (None: it has none) and the
    (line number, values) of every non-blank row."""
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
    split_columns = [i for i, value in enumerate(header) if i and value.lower() == "split"]
    if len(split_columns) > 1:
        raise ConfigError(f"{{0}}: {name}: the header names the split column twice", FIELD)
    split_column = split_columns[0] if split_columns else None
    labels: list[str] = []
    for i, label in enumerate(header):
        if i in (0, split_column):
            continue
        if not label:
            raise ConfigError(f"{{0}}: {name}: label column {i + 1} has no name", FIELD)
        if label in labels:
            raise ConfigError(f"{{0}}: {name}: the label {label!r} is named twice", FIELD)
        labels.append(label)
    if not labels:
        raise ConfigError(f"{{0}}: {name}: the header names no label after 'path'", FIELD)
    return labels, split_column, table[1:]


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
