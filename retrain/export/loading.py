"""Loading and running what retrain exports: a frozen graph (.pb), a TFLite model (.tflite)
or a SavedModel folder, each as a classifier mapping float32 images [n, h, w, 3] in [0, 1] to
scores [n, k].

Shared by label-image and the check of every exported model after a run (retrain.export.check).
The format is told by content, not by name: a folder holding saved_model.pb is a SavedModel, a
file carrying TFLite's identifier is a .tflite, anything else is parsed as a GraphDef. Every
problem with a model is a ModelLoadError of one line. Importing this module, and loading and
running a .tflite, never import TensorFlow (label-image's cold start).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from retrain.errors import first_line
from retrain.export.tflite_metadata import FLOAT_MEAN, FLOAT_STD, carried
from retrain.models.tflite import SignatureError, TFLiteModel, is_tflite_file

FROZEN_GRAPH, SAVED_MODEL, TFLITE = "frozen_graph", "saved_model", "tflite"
DEFAULT_INPUT, DEFAULT_OUTPUT = "Placeholder", "final_result"  # retrain's frozen graphs'
SAVED_MODEL_LABELS = Path("assets") / "labels.txt"


class ModelLoadError(Exception):
    """The model cannot be used; the message (one line) says why."""


class Classifier(Protocol):
    """What every loaded model offers."""

    format: str  # FROZEN_GRAPH, SAVED_MODEL or TFLITE
    labels: list[str] | None  # carried by the model itself (TFLite, SavedModel), if any
    thresholds: list[float] | None  # a multi-label model's, carried with its labels
    # (mean, std) that predict maps images in [0, 1] with first, as a .tflite's metadata says;
    # None: they go in as they are. A caller that normalizes for the model sets it to None.
    normalization: tuple[np.ndarray, np.ndarray] | None

    def input_size(self) -> tuple[int | None, int | None]: ...

    def output_width(self) -> int | None: ...

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


def model_format(path: str | os.PathLike) -> str:
    """FROZEN_GRAPH, SAVED_MODEL or TFLITE, by the content at `path`; raises ModelLoadError
    when it cannot be read or is a folder without a SavedModel."""
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return SAVED_MODEL
        raise ModelLoadError(f"{path} is a folder without a SavedModel (no saved_model.pb)")
    try:
        return TFLITE if is_tflite_file(path) else FROZEN_GRAPH
    except OSError as err:
        raise ModelLoadError(f"cannot read {path}: {err.strerror or err}") from None


def open_model(
    path: str | os.PathLike, input_layer: str | None = None, output_layer: str | None = None
) -> Classifier:
    """The classifier at `path`, whatever its format (see model_format). `input_layer` and
    `output_layer` name the input and output (a frozen graph's nodes, a SavedModel signature's
    keys); None takes the model's own (retrain's names, or the only candidate). A .tflite has
    one input and one output: naming others is an error. Raises ModelLoadError."""
    kind = model_format(path)
    if kind == TFLITE:
        for flag, name in (("input_layer", input_layer), ("output_layer", output_layer)):
            if name is not None:
                raise ModelLoadError(f"--{flag}: a .tflite model has one input and one output")
        return TFLiteClassifier(path)
    if kind == SAVED_MODEL:
        return SavedModelClassifier(path, input_layer, output_layer)
    return FrozenGraphClassifier(path, input_layer, output_layer)


def _pick(flag: str, wanted: str | None, default: str | None, candidates: list[str], path) -> str:
    """The node (or key) named `wanted`, else `default` if there, else the only candidate."""
    if wanted is None and default in candidates:
        return default
    if wanted is None and len(candidates) == 1:
        return candidates[0]
    if wanted is not None and wanted in candidates:
        return wanted
    shown = ", ".join(sorted(candidates)[:10]) or "none"
    what = f"no {wanted!r} in {path}" if wanted is not None else f"which one in {path}?"
    raise ModelLoadError(f"--{flag}: {what}; candidates: {shown}")


class FrozenGraphClassifier:
    """A frozen GraphDef run the TF1 way: import_graph_def + Session, like label_image.py."""

    format = FROZEN_GRAPH
    labels = thresholds = normalization = None

    def __init__(self, path: str | os.PathLike, input_layer: str | None, output_layer: str | None):
        import tensorflow as tf
        from google.protobuf.message import DecodeError

        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise ModelLoadError(f"cannot read {path}: {err.strerror}") from None
        graph_def = tf.compat.v1.GraphDef()
        try:
            graph_def.ParseFromString(data)
        except (DecodeError, RuntimeWarning, ValueError):
            graph_def.Clear()
        if not graph_def.node:
            raise ModelLoadError(
                f"{path} is not a model: neither a TensorFlow GraphDef (.pb) nor a .tflite, "
                "or a damaged one"
            )
        placeholders = [n.name for n in graph_def.node if n.op == "Placeholder"]
        consumed = {i.lstrip("^").split(":")[0] for n in graph_def.node for i in n.input}
        sinks = [n.name for n in graph_def.node if n.name not in consumed and n.op != "NoOp"]
        names = {n.name for n in graph_def.node}
        if input_layer in names:
            placeholders.append(input_layer)
        if output_layer in names:
            sinks.append(output_layer)
        input_name = _pick("input_layer", input_layer, DEFAULT_INPUT, placeholders, path)
        output_name = _pick("output_layer", output_layer, DEFAULT_OUTPUT, sinks, path)
        self.graph = tf.Graph()
        with self.graph.as_default():
            try:
                tf.compat.v1.import_graph_def(graph_def, name="")
            except (ValueError, tf.errors.OpError) as err:
                raise ModelLoadError(f"cannot load {path}: {first_line(err)}") from None
        self.input = self.graph.get_tensor_by_name(f"{input_name}:0")
        self.output = self.graph.get_tensor_by_name(f"{output_name}:0")
        self.session = tf.compat.v1.Session(graph=self.graph, config=_lean_session_config(tf))

    def input_size(self) -> tuple[int | None, int | None]:
        """(height, width) of the input placeholder, None where not fixed."""
        shape = self.input.shape
        if shape.rank != 4:
            return None, None
        return shape[1], shape[2]

    def output_width(self) -> int | None:
        """Scores per image, if the graph fixes it."""
        return self.output.shape[-1] if self.output.shape.rank else None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Scores [n, classes] for a float32 batch [n, h, w, 3]; an empty batch is not run
        (TensorFlow's oneDNN kernels fail on zero images on some CPUs)."""
        if len(batch) == 0:
            return np.zeros((0, self.output.shape[-1] or 0), np.float32)
        return self.session.run(self.output, {self.input: batch})


def _lean_session_config(tf):
    """A session that runs a frozen graph as it is. Grappler's rewrites and the classic graph
    optimizer cost a frozen Lite0 graph about 1 s and 200 MB on its first call and, on this
    project's CPU, made later batches slower, not faster; scores agree to 5e-7 either way
    (docs/benchmarks.md)."""
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    config.graph_options.optimizer_options.opt_level = tf.compat.v1.OptimizerOptions.L0
    return config


class SavedModelClassifier:
    """A SavedModel's serving signature (`serving_default`: float images in, scores out), with
    the labels its assets hold (assets/labels.txt and its thresholds)."""

    format = SAVED_MODEL
    normalization = None

    def __init__(
        self,
        path: str | os.PathLike,
        input_layer: str | None = None,
        output_layer: str | None = None,
        signature: str = "serving_default",
    ):
        import tensorflow as tf

        try:
            self._loaded = tf.saved_model.load(os.fspath(path))
        except Exception as err:  # noqa: BLE001 - protobuf, OS and TensorFlow errors alike
            raise ModelLoadError(f"cannot load SavedModel {path}: {first_line(err)}") from None
        signatures = self._loaded.signatures
        if signature not in signatures:
            raise ModelLoadError(
                f"{path} has no signature {signature!r}; it has: {', '.join(signatures) or 'none'}"
            )
        self._function = signatures[signature]
        inputs = self._function.structured_input_signature[1]
        outputs = self._function.structured_outputs
        self._input = _pick("input_layer", input_layer, None, list(inputs), path)
        self._output = _pick("output_layer", output_layer, DEFAULT_OUTPUT, list(outputs), path)
        self._input_shape = inputs[self._input].shape
        self._output_shape = outputs[self._output].shape
        self.labels, self.thresholds = _saved_model_labels(Path(path))

    def input_size(self) -> tuple[int | None, int | None]:
        """(height, width) of the signature's input, None where not fixed."""
        if self._input_shape.rank != 4:
            return None, None
        return self._input_shape[1], self._input_shape[2]

    def output_width(self) -> int | None:
        """Scores per image, if the signature fixes it."""
        return self._output_shape[-1] if self._output_shape.rank else None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Scores [n, classes] for a float32 batch [n, h, w, 3]; an empty batch is not run."""
        if len(batch) == 0:
            return np.zeros((0, self.output_width() or 0), np.float32)
        result = self._function(**{self._input: np.asarray(batch, np.float32)})
        return result[self._output].numpy()


def _saved_model_labels(path: Path) -> tuple[list[str] | None, list[float] | None]:
    from retrain.heads.thresholds import read_thresholds

    labels_file = path / SAVED_MODEL_LABELS
    try:
        text = labels_file.read_text(encoding="utf-8")
        thresholds = read_thresholds(labels_file)
    except (OSError, UnicodeDecodeError, ValueError):
        return None, None
    return [line.rstrip() for line in text.splitlines() if line.strip()], thresholds


class TFLiteClassifier:
    """A TFLite model mapping images ``[n, h, w, 3]`` to scores ``[n, classes]`` (quantized
    int8 input and output are quantized and dequantized, see TFLiteModel), with the labels,
    thresholds and input normalization it carries (see retrain.export.tflite_metadata): a float
    input whose metadata says another normalization than retrain's (pixel values divided by
    255) gets the images normalized as it says.

    Raises ModelLoadError (one line) for a missing, unreadable or unusable file. Calls from
    several threads are run one at a time.
    """

    format = TFLITE

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError:
            raise ModelLoadError(
                f"{path}: .tflite models need the ai-edge-litert package "
                "(pip install ai-edge-litert)"
            ) from None
        try:
            is_tflite = is_tflite_file(path)
            carries = carried(path) if is_tflite else None
        except OSError as err:
            raise ModelLoadError(f"cannot read {path}: {err.strerror or err}") from None
        if not is_tflite:
            raise ModelLoadError(f"{path} is not a TFLite (.tflite) model file")
        try:
            self._model = TFLiteModel(path, num_threads)
        except SignatureError as err:
            raise ModelLoadError(_signature_problem(path, err)) from None
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"cannot load {path}: {first_line(err)}") from None
        self.path = self._model.path
        self._shape = list(self._model.input_signature)
        self.labels, self.thresholds = carries.labels, carries.thresholds
        self.normalization = _normalization(carries.normalization, self._model)

    def input_size(self) -> tuple[int | None, int | None]:
        """(height, width) of the model's input, None where not fixed."""
        height, width = self._shape[1], self._shape[2]
        return (height if height > 0 else None, width if width > 0 else None)

    def output_width(self) -> int:
        """Scores per image."""
        return self._model.output_width

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Scores [n, classes] for a float32 batch [n, h, w, 3]."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"expected a batch [n, h, w, 3], got shape {list(batch.shape)}")
        if len(batch) and (
            batch.shape[3] != 3
            or any(
                want > 0 and got != want for want, got in zip(self._shape[1:3], batch.shape[1:3])
            )
        ):
            raise ValueError(
                f"expected a batch [n, {self._shape[1]}, {self._shape[2]}, 3], "
                f"got shape {list(batch.shape)}"
            )
        if self.normalization is not None:
            mean, std = self.normalization
            batch = (batch * np.float32(255) - mean) / std
        return self._model.run(batch)


def _normalization(said, model: TFLiteModel) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) that images in [0, 1] are normalized with for `model`, as its metadata
    `said`; None where they go in as they are (retrain's own, a quantized input, none said)."""
    if said is None or model.quantized_input or said == ((FLOAT_MEAN,), (FLOAT_STD,)):
        return None
    mean, std = (np.asarray(values, np.float32) for values in said)
    return mean, std


def _signature_problem(path: str | os.PathLike, err: SignatureError) -> str:
    """The wording of a .tflite whose inputs or outputs cannot be used."""
    if err.part == "count":
        return (
            f"{path}: expected one input and one output, "
            f"found {len(err.inputs)} and {len(err.outputs)}"
        )
    if err.part == "input":
        (tensor,) = err.inputs
        shape = [int(d) for d in tensor["shape_signature"]]
        return (
            f"{path}: input is {np.dtype(tensor['dtype']).name} "
            f"{shape}, not float32 images [n, h, w, 3]"
        )
    (tensor,) = err.outputs
    return f"{path}: output shape {list(tensor['shape'])} is not [n, k]"


__all__ = [
    "FROZEN_GRAPH",
    "SAVED_MODEL",
    "TFLITE",
    "Classifier",
    "FrozenGraphClassifier",
    "ModelLoadError",
    "SavedModelClassifier",
    "TFLiteClassifier",
    "model_format",
    "open_model",
]
