"""TFLite model metadata (the TFLITE_METADATA flatbuffer), so MediaPipe Tasks loads a .tflite.

MediaPipe Tasks' ImageClassifier (Android, iOS, web, Python) and TFLite Model Maker's models
describe a classifier in a `ModelMetadata` flatbuffer (metadata_schema.fbs, file identifier
M001) stored in one of the model's buffers and named TFLITE_METADATA in the model's `metadata`
list; the files it names (the labels) travel in a zip archive appended to the flatbuffer (see
retrain.export.tflite_labels). This module writes and reads the few tables a classifier needs,
with the `flatbuffers` package that TensorFlow and LiteRT already depend on: MediaPipe's own
writer needs its C++ extension, which mediapipe 1.2.3's wheel lacks, and tflite-support pins
protobuf 3.20.

Reading (label-image) never imports TensorFlow; writing re-serialises the model with
TensorFlow's flatbuffer tools, so it does.
"""

from __future__ import annotations

import importlib.metadata
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import flatbuffers
from flatbuffers.table import Table

from retrain.export.tflite_labels import (
    LABELS_FILE,
    THRESHOLDS_FILE,
    embedded_labels,
    with_labels,
)

METADATA_NAME = "TFLITE_METADATA"
METADATA_IDENTIFIER = b"M001"
# The metadata parser version this metadata needs: 1.0.0 reads every field written here.
MIN_PARSER_VERSION = "1.0.0"
# metadata_schema.fbs: union tags and enum values used here.
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2
_NORMALIZATION_OPTIONS = 1
_RGB = 1
UNKNOWN_FILE, TENSOR_AXIS_LABELS = 0, 2
# schema.fbs: the tensor types whose input takes no normalization.
_TFLITE_UINT8, _TFLITE_INT8 = 3, 9
# Our float models take RGB in [0, 1]: pixel values (0..255) divided by 255.
FLOAT_MEAN, FLOAT_STD = 0.0, 255.0


@dataclass(frozen=True)
class ModelInfo:
    """What the metadata says of a retrained classifier."""

    module: str  # the image module under the new layer (its handle)
    labels: Sequence[str]
    thresholds: Sequence[float] | None = None  # a multi-label (sigmoid) head's, per label
    # (mean, std) of a float input: it takes (pixel value - mean) / std; retrain's take [0, 1].
    normalization: tuple[float, float] = (FLOAT_MEAN, FLOAT_STD)


@dataclass(frozen=True)
class Metadata:
    """What a .tflite's TFLITE_METADATA says (of subgraph 0's first input and output)."""

    name: str | None
    description: str | None
    version: str | None
    mean: tuple[float, ...] | None  # the input's NormalizationOptions, if any
    std: tuple[float, ...] | None
    output_files: dict[str, int]  # the score output's associated files: {name: type}


@dataclass(frozen=True)
class Carried:
    """What a .tflite carries for a client: its labels, a multi-label model's thresholds, the
    input's normalization ((mean, std) of pixel values 0..255; None: none said) and the
    metadata itself (None for a file without)."""

    labels: list[str] | None
    thresholds: list[float] | None
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None
    metadata: Metadata | None


def carried(path: str | os.PathLike) -> Carried:
    """What the .tflite file at `path` carries: the labels file its metadata names as the
    scores' TENSOR_AXIS_LABELS (else labels.txt, as files written before the metadata have it),
    the thresholds file beside it, the normalization. Raises OSError when it cannot be read."""
    metadata = read_metadata(path)
    labels_file = LABELS_FILE
    if metadata is not None:
        named = [n for n, kind in metadata.output_files.items() if kind == TENSOR_AXIS_LABELS]
        labels_file = named[0] if named else LABELS_FILE
    labels, thresholds = embedded_labels(path, labels_file, f"{labels_file}.thresholds") or (
        None,
        None,
    )
    normalization = None
    if metadata is not None and metadata.mean and metadata.std:
        normalization = (metadata.mean, metadata.std)
    return Carried(labels, thresholds, normalization, metadata)


def retrain_version() -> str:
    """The installed retrain's version ("unknown" when not installed as a package)."""
    try:
        return importlib.metadata.version("retrain")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def with_metadata(model: bytes, info: ModelInfo) -> bytes:
    """`model` (a .tflite flatbuffer of one image input [1, h, w, 3] and one score output) with
    a TFLITE_METADATA buffer describing it (replacing any it had), the labels file (and a
    multi-label head's thresholds file) appended as its associated files."""
    from tensorflow.lite.tools import flatbuffer_utils

    tree = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    graph = tree.subgraphs[0]
    image = graph.tensors[graph.inputs[0]]
    size = (int(image.shape[1]), int(image.shape[2]))
    float_input = image.type not in (_TFLITE_UINT8, _TFLITE_INT8)
    _set_metadata_buffer(tree, metadata_bytes(info, size, float_input))
    return with_labels(
        flatbuffer_utils.convert_object_to_bytearray(tree), info.labels, info.thresholds
    )


def _set_metadata_buffer(tree, data: bytes) -> None:
    """Point the model's TFLITE_METADATA entry at a buffer holding `data` (a schema ModelT)."""
    import numpy as np
    from tensorflow.lite.python import schema_py_generated as schema

    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, np.uint8)
    entries = [m for m in tree.metadata or [] if m.name.decode() != METADATA_NAME]
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME.encode(), len(tree.buffers)
    tree.buffers.append(buffer)
    tree.metadata = [*entries, entry]


def describe(info: ModelInfo, size: tuple[int, int]) -> str:
    """The model's description: what it classifies, on which module, made by which retrain."""
    kind = "multi-label (sigmoid scores)" if info.thresholds is not None else "single-label"
    shown = ", ".join(info.labels[:10]) + (", ..." if len(info.labels) > 10 else "")
    # A local module's folder is named without its path: the file goes into apps.
    module = info.module if "://" in info.module else os.path.basename(info.module.rstrip("/"))
    return (
        f"Image classifier, {kind}, {len(info.labels)} classes: {shown}. Input: an RGB image "
        f"of {size[1]}x{size[0]} pixels. Retrained by retrain {retrain_version()} on the "
        f"image module {module}."
    )


def metadata_bytes(info: ModelInfo, size: tuple[int, int], float_input: bool = True) -> bytes:
    """The ModelMetadata flatbuffer (identifier M001) of a classifier whose input is an RGB
    image of `size` (height, width), float in [0, 1] (`float_input`: NormalizationOptions mean
    0, std 255) or quantized (its own quantization says how), and whose output holds a score
    per label of `info`."""
    b = flatbuffers.Builder(1024)
    model = _table(
        b,
        strings={
            0: "retrain image classifier",
            1: describe(info, size),
            2: f"retrain {retrain_version()}",
            4: "retrain",
            7: MIN_PARSER_VERSION,
        },
        tables={3: _vector(b, [_subgraph(b, info, size, float_input)])},
    )
    b.Finish(model, file_identifier=METADATA_IDENTIFIER)
    return bytes(b.Output())


def _subgraph(b: flatbuffers.Builder, info: ModelInfo, size, float_input: bool) -> int:
    return _table(
        b,
        strings={0: "image_classifier"},
        tables={
            2: _vector(b, [_image_tensor(b, size, info.normalization if float_input else None)]),
            3: _vector(b, [_score_tensor(b, info)]),
        },
    )


def _image_tensor(
    b: flatbuffers.Builder, size: tuple[int, int], normalization: tuple[float, float] | None
) -> int:
    """The input's TensorMetadata; `normalization` (mean, std) for a float input, else None."""
    how = (
        "pixel values 0..255 minus {0:g}, divided by {1:g} (NormalizationOptions mean {0:g}, "
        "std {1:g})".format(*normalization)
        if normalization
        else "pixel values 0..255 divided by 255, then quantized with the tensor's own "
        "scale and zero point"
    )
    description = f"Input image to be classified: RGB, {size[1]}x{size[0]} pixels; {how}."
    image_size = _table(b, uint32s={0: size[1], 1: size[0]})
    properties = _table(b, int8s={0: _RGB}, tables={1: image_size})
    content = _table(b, uint8s={0: _IMAGE_PROPERTIES}, tables={1: properties})
    tables = {3: content}
    if normalization:
        mean, std = _floats(b, [normalization[0]]), _floats(b, [normalization[1]])
        options = _table(b, tables={0: mean, 1: std})
        unit = _table(b, uint8s={0: _NORMALIZATION_OPTIONS}, tables={1: options})
        tables[4] = _vector(b, [unit])
        low, high = ((value - normalization[0]) / normalization[1] for value in (0, 255))
        tables[5] = _table(b, tables={0: _floats(b, [high]), 1: _floats(b, [low])})
    return _table(b, strings={0: "image", 1: description}, tables=tables)


def _score_tensor(b: flatbuffers.Builder, info: ModelInfo) -> int:
    count = len(info.labels)
    files = [
        _file(b, LABELS_FILE, f"The {count} labels, one per line, in the order of the scores.", 2)
    ]
    if info.thresholds is None:
        description = f"Probabilities of the {count} labels (a softmax: they add up to 1)."
    else:
        description = (
            f"Sigmoid probabilities of the {count} labels, each on its own: a label applies "
            f"when its score is at least its threshold, line for line in {THRESHOLDS_FILE}."
        )
        files.append(
            _file(
                b,
                THRESHOLDS_FILE,
                f"Per-label decision thresholds, one number per line in the order of "
                f"{LABELS_FILE}: a label applies when its score is at least its threshold.",
                UNKNOWN_FILE,
            )
        )
    content = _table(b, uint8s={0: _FEATURE_PROPERTIES}, tables={1: _table(b)})
    stats = _table(b, tables={0: _floats(b, [1.0]), 1: _floats(b, [0.0])})
    return _table(
        b,
        strings={0: "probability", 1: description},
        tables={3: content, 5: stats, 6: _vector(b, files)},
    )


def _file(b: flatbuffers.Builder, name: str, description: str, kind: int) -> int:
    return _table(b, strings={0: name, 1: description}, int8s={2: kind})


def _floats(b: flatbuffers.Builder, values: Sequence[float]) -> int:
    b.StartVector(4, len(values), 4)
    for value in reversed(values):
        b.PrependFloat32(float(value))
    return b.EndVector()


def _vector(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return b.EndVector()


def _table(
    b: flatbuffers.Builder,
    strings: dict[int, str] | None = None,
    tables: dict[int, int] | None = None,
    int8s: dict[int, int] | None = None,
    uint8s: dict[int, int] | None = None,
    uint32s: dict[int, int] | None = None,
) -> int:
    """A table of the given fields, by slot: strings (created here), offsets of tables or
    vectors made before, and scalars. Flatbuffers builds children before their parent."""
    offsets = {slot: b.CreateString(s) for slot, s in (strings or {}).items()}
    offsets.update(tables or {})
    slots = max([*offsets, *(int8s or {}), *(uint8s or {}), *(uint32s or {}), -1]) + 1
    b.StartObject(slots)
    for slot, offset in offsets.items():
        b.PrependUOffsetTRelativeSlot(slot, offset, 0)
    for slot, value in (uint32s or {}).items():
        b.PrependUint32Slot(slot, value, 0)
    for slot, value in (int8s or {}).items():
        b.PrependInt8Slot(slot, value, 0)
    for slot, value in (uint8s or {}).items():
        b.PrependUint8Slot(slot, value, 0)
    return b.EndObject()


def read_metadata(path: str | os.PathLike) -> Metadata | None:
    """The TFLITE_METADATA of the .tflite file at `path`, or None when it has none (or it
    cannot be parsed: a damaged one counts as none). Raises OSError when the file cannot be
    read. Does not import TensorFlow."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        buffer = _metadata_buffer(data)
        return None if buffer is None else _parse(buffer)
    except (IndexError, struct.error, UnicodeDecodeError, ValueError):
        return None


def _metadata_buffer(data: bytes) -> bytes | None:
    model = _root(data)
    buffers = _tables(model, 4)
    for entry in _tables(model, 6):
        if _string(entry, 0) == METADATA_NAME:
            buffer = buffers[_scalar(entry, 1, "<I")]
            start = buffer.Offset(4)
            if start:
                return bytes(buffer.Bytes[buffer.Vector(start) :][: buffer.VectorLen(start)])
            offset, size = _scalar(buffer, 1, "<Q"), _scalar(buffer, 2, "<Q")
            return data[offset : offset + size] if offset > 1 else None
    return None


def _parse(buffer: bytes) -> Metadata | None:
    if buffer[4:8] != METADATA_IDENTIFIER:
        return None
    model = _root(buffer)
    subgraphs = _tables(model, 3)
    mean = std = None
    files: dict[str, int] = {}
    if subgraphs:
        inputs, outputs = _tables(subgraphs[0], 2), _tables(subgraphs[0], 3)
        for unit in _tables(inputs[0], 4) if inputs else []:
            options = _table_at(unit, 1)
            if _scalar(unit, 0, "<B") == _NORMALIZATION_OPTIONS and options is not None:
                mean, std = _float_vector(options, 0), _float_vector(options, 1)
        for file in _tables(outputs[0], 6) if outputs else []:
            files[_string(file, 0) or ""] = _scalar(file, 2, "<b")
    return Metadata(_string(model, 0), _string(model, 1), _string(model, 2), mean, std, files)


def _root(data: bytes) -> Table:
    return Table(bytearray(data), struct.unpack_from("<I", data, 0)[0])


def _scalar(table: Table, slot: int, fmt: str) -> int:
    at = table.Offset(4 + 2 * slot)
    return struct.unpack_from(fmt, table.Bytes, table.Pos + at)[0] if at else 0


def _string(table: Table, slot: int) -> str | None:
    at = table.Offset(4 + 2 * slot)
    return table.String(table.Pos + at).decode("utf-8") if at else None


def _table_at(table: Table, slot: int) -> Table | None:
    at = table.Offset(4 + 2 * slot)
    return Table(table.Bytes, table.Indirect(table.Pos + at)) if at else None


def _tables(table: Table, slot: int) -> list[Table]:
    at = table.Offset(4 + 2 * slot)
    if not at:
        return []
    start = table.Vector(at)
    return [Table(table.Bytes, table.Indirect(start + 4 * i)) for i in range(table.VectorLen(at))]


def _float_vector(table: Table, slot: int) -> tuple[float, ...] | None:
    at = table.Offset(4 + 2 * slot)
    if not at:
        return None
    start, count = table.Vector(at), table.VectorLen(at)
    return struct.unpack_from(f"<{count}f", table.Bytes, start)
