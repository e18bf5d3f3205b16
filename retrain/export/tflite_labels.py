"""Labels inside a .tflite file, as an associated file.

A TFLite model is a flatbuffer read from its start; bytes after it are ignored by every
interpreter. retrain appends a zip archive holding `labels.txt` (and, for a multi-label model,
`labels.txt.thresholds`), stored uncompressed: the layout of the associated files that the
TFLITE_METADATA flatbuffer names (see retrain.export.tflite_metadata) and MediaPipe Tasks reads
(it refuses a compressed archive), so `unzip -l model.tflite` lists them and any zip reader gets
them back. Files written before the metadata (compressed, no flatbuffer) read the same. Importing
this module does not import TensorFlow.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence

from retrain.heads.thresholds import SUFFIX

LABELS_FILE = "labels.txt"
THRESHOLDS_FILE = LABELS_FILE + SUFFIX


def with_labels(
    model: bytes, labels: Sequence[str], thresholds: Sequence[float] | None = None
) -> bytes:
    """`model` (a .tflite flatbuffer) with `labels` (one per output, in order) and a
    multi-label head's `thresholds` appended as associated files."""
    buffer = io.BytesIO(model)
    buffer.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buffer, "a", zipfile.ZIP_STORED) as archive:
        archive.writestr(LABELS_FILE, "".join(f"{label}\n" for label in labels))
        if thresholds is not None:
            archive.writestr(THRESHOLDS_FILE, "".join(f"{float(t)!r}\n" for t in thresholds))
    return buffer.getvalue()


def embedded_labels(
    path: str | os.PathLike, labels_file: str = LABELS_FILE, thresholds_file: str = THRESHOLDS_FILE
) -> tuple[list[str], list[float] | None] | None:
    """(labels, thresholds or None) carried by the .tflite file at `path` in the associated
    files named `labels_file` and `thresholds_file`, or None when it carries no labels (or they
    cannot be read: a damaged archive counts as none). Raises OSError when the file cannot be
    read."""
    with open(path, "rb") as handle:
        try:
            with zipfile.ZipFile(handle) as archive:
                names = set(archive.namelist())
                if labels_file not in names:
                    return None
                labels = archive.read(labels_file).decode("utf-8").splitlines()
                thresholds = None
                if thresholds_file in names:
                    text = archive.read(thresholds_file).decode("utf-8")
                    thresholds = [float(line) for line in text.split()]
        except (zipfile.BadZipFile, UnicodeDecodeError, ValueError, EOFError):
            return None
    return [label.rstrip() for label in labels if label.strip()], thresholds
