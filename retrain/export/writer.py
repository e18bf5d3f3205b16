"""Exporting the retrained classifier: frozen GraphDef, labels file and SavedModel.

The classifier is the image module followed by the new layer and its head's output (a softmax,
for retrain.py's single-label classes). Its input is
`Placeholder`, float32 [None, height, width, 3] with values in [0, 1] (what retrain.py's graphs
took), and its output is named by --final_tensor_name, so TF1-style clients such as TensorFlow's
label_image.py example load the frozen graph unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

from retrain.config import ExportConfig
from retrain.export import graph_decode
from retrain.export.tflite_metadata import ModelInfo, with_metadata
from retrain.heads.head import Head
from retrain.heads.thresholds import write_thresholds
from retrain.models import quantize
from retrain.utils.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger("retrain")

INPUT_NAME = "Placeholder"


class Classifier(tf.Module):
    """Image module + the retrained layer and its head's output, as one exportable module."""

    def __init__(
        self,
        module_object,
        head: Head,
        weights: np.ndarray,
        biases: np.ndarray,
        input_size: tuple[int, int],
        final_tensor_name: str = "final_result",
    ):
        super().__init__(name="retrained_classifier")
        self.module = module_object
        self.head = head
        self.final_weights = tf.Variable(weights.astype(np.float32), name="final_weights")
        self.final_biases = tf.Variable(biases.astype(np.float32), name="final_biases")
        self.final_tensor_name = final_tensor_name
        self.input_spec = tf.TensorSpec([None, *input_size, 3], tf.float32, name=INPUT_NAME)
        self.classify = tf.function(self._classify, input_signature=[self.input_spec])

    def _classify(self, images: tf.Tensor) -> tf.Tensor:
        features = self.module(images)
        logits = tf.matmul(features, self.final_weights) + self.final_biases
        return self.head.output(logits, self.final_tensor_name)


BOTTLENECK_NAME = "bottleneck"


def frozen_module_graph_def(module_object, input_size: tuple[int, int]) -> tf.compat.v1.GraphDef:
    """The image module alone, frozen: `Placeholder` -> `bottleneck` [None, dim]."""
    spec = tf.TensorSpec([None, *input_size, 3], tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def features(images):
        return tf.identity(module_object(images), name=BOTTLENECK_NAME)

    frozen = convert_variables_to_constants_v2(features.get_concrete_function())
    return frozen.graph.as_graph_def()


def cached_frozen_module(
    path: str | os.PathLike, load_module_object, input_size: tuple[int, int]
) -> tf.compat.v1.GraphDef:
    """The frozen module graph from `path`, made (by loading the module) and kept on a miss.

    Freezing a module takes seconds; adding the new layer to a frozen graph takes a fraction
    of one, so each module is frozen once and every export after that is graph surgery.
    """
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(Path(path).read_bytes())
        if any(node.name == BOTTLENECK_NAME for node in graph_def.node):
            return graph_def
    except (OSError, ValueError, RuntimeWarning):
        pass  # absent or damaged: make it again
    graph_def = frozen_module_graph_def(load_module_object(), input_size)
    atomic_write_bytes(path, graph_def.SerializeToString(), "frozen module graph")
    return graph_def


def classifier_graph_def(
    module_graph_def: tf.compat.v1.GraphDef,
    head: Head,
    weights: np.ndarray,
    biases: np.ndarray,
    final_tensor_name: str = "final_result",
) -> tf.compat.v1.GraphDef:
    """The frozen module followed by the new layer and `head`'s output (retrain.py's softmax,
    for the softmax head) named `final_tensor_name`."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(module_graph_def, name="")
        features = graph.get_tensor_by_name(f"{BOTTLENECK_NAME}:0")
        with tf.compat.v1.name_scope("final_retrain_ops"):
            w = tf.constant(weights.astype(np.float32), name="final_weights")
            b = tf.constant(biases.astype(np.float32), name="final_biases")
            logits = tf.matmul(features, w) + b
        head.output(logits, final_tensor_name)
    return graph.as_graph_def()


def write_frozen_graph(graph_def: tf.compat.v1.GraphDef, path: str | os.PathLike) -> None:
    """Write a frozen GraphDef to `path` (atomically)."""
    atomic_write_bytes(path, graph_def.SerializeToString(), "frozen graph")


def write_labels(labels: list[str], path: str | os.PathLike) -> None:
    """Write one label per line, in the order of the classifier's outputs."""
    atomic_write_text(path, "".join(f"{label}\n" for label in labels), "labels")


BYTES_SIGNATURE = "serving_bytes"  # the SavedModel signature taking encoded image files
BYTES_INPUT = "image_bytes"  # its input; "_bytes" lets TF Serving's REST API take base64


def write_saved_model(classifier: Classifier, labels: list[str], path: str | os.PathLike) -> None:
    """Write a SavedModel with two signatures: `serving_default` maps `images` (float32
    [n, h, w, 3] in [0, 1]) to class probabilities (named by --final_tensor_name), and
    `serving_bytes` maps `image_bytes` (string [n], each a JPEG, PNG, GIF or BMP file's bytes,
    decoded and resized in the graph, see retrain.export.graph_decode) to `scores` and `label`, the
    top label's name.

    The labels go into the model's assets (assets/labels.txt), and a multi-label head's
    thresholds beside them (assets/labels.txt.thresholds). The folder is written under a
    temporary name and swapped in, so a killed run never leaves half a model.
    """
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    assets = Path(tempfile.mkdtemp(prefix=f".{target.name}.assets.", dir=target.parent))
    try:
        labels_file = assets / "labels.txt"
        write_labels(labels, labels_file)
        classifier.labels_file = tf.saved_model.Asset(str(labels_file))
        if classifier.head.thresholds is not None:
            path = write_thresholds(classifier.head.thresholds, labels_file)
            classifier.thresholds_file = tf.saved_model.Asset(path)
        classifier.serve = _float_signature(classifier)
        classifier.serve_bytes = _bytes_signature(classifier, labels)
        signatures = {
            "serving_default": classifier.serve.get_concrete_function(),
            BYTES_SIGNATURE: classifier.serve_bytes.get_concrete_function(),
        }
        tf.saved_model.save(classifier, str(staging), signatures=signatures)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(assets, ignore_errors=True)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _float_signature(classifier: Classifier) -> tf.types.experimental.PolymorphicFunction:
    @tf.function(input_signature=[classifier.input_spec])
    def serve(images):
        return {classifier.final_tensor_name: classifier.classify(images)}

    return serve


def _bytes_signature(
    classifier: Classifier, labels: list[str]
) -> tf.types.experimental.PolymorphicFunction:
    size = tuple(classifier.input_spec.shape[1:3])
    names = tf.constant(labels)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
    def serve_bytes(image_bytes):
        images = tf.map_fn(
            lambda data: graph_decode.decode_to_input(data, size),
            image_bytes,
            fn_output_signature=tf.TensorSpec([*size, 3], tf.float32),
        )
        scores = classifier.classify(images)
        return {"scores": scores, "label": tf.gather(names, tf.argmax(scores, axis=1))}

    return serve_bytes


def _swap_in(staging: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def tflite_bytes(
    classifier: Classifier,
    quantization: str = "none",
    representative: Callable[[], Any] | None = None,
    int8_io: bool = False,
) -> bytes:
    """The classifier converted to a TFLite flatbuffer (input [1, h, w, 3] in [0, 1], or int8
    with `int8_io`), quantized as `quantization` says (see retrain.models.quantize.convert, which
    takes `representative` and `int8_io`)."""
    concrete = classifier.classify.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], classifier)
    return quantize.convert(converter, quantization, representative, int8_io)


def write_tflite(
    classifier: Classifier,
    path: str | os.PathLike,
    labels: list[str] | None = None,
    module: str = "",
    **quantization: Any,
) -> None:
    """Write the classifier as a .tflite file (atomically). With `labels`, it carries the
    TFLITE_METADATA that MediaPipe Tasks reads (naming `module`, the image module under the
    new layer; see retrain.export.tflite_metadata) and the labels (and its head's thresholds)
    as associated files (see retrain.export.tflite_labels); `quantization` is passed to
    tflite_bytes."""
    model = tflite_bytes(classifier, **quantization)
    if labels is not None:
        thresholds = classifier.head.thresholds
        model = with_metadata(model, ModelInfo(module or "unknown", labels, thresholds))
    atomic_write_bytes(path, model, "TFLite model")


@dataclass(frozen=True)
class Network:
    """The network under the new layer, each form asked for only if a file needs it:
    `graph_def()` gives it frozen, `loaded()` loaded; it takes images of `input_size`.
    `name` says what it is (the module's handle), for the .tflite's metadata."""

    graph_def: Callable[[], tf.compat.v1.GraphDef]
    loaded: Callable[[], Any]
    input_size: tuple[int, int]
    name: str = ""


@dataclass(frozen=True, eq=False)
class TrainedLayer:
    """The new layer on top: its `head` and its parameters (`weights`, `biases`)."""

    head: Head
    weights: np.ndarray
    biases: np.ndarray


def export_classifier(
    settings: ExportConfig,
    labels: list[str],
    network: Network,
    layer: TrainedLayer,
    representative: Callable[[], Any] | None = None,
) -> dict[str, str]:
    """Write the files `settings` names (frozen graph, labels, TFLite, SavedModel) for
    `network` followed by `layer` and its head's output; returns {setting: path} of each one
    written (and "thresholds": the thresholds file a head with thresholds writes beside the
    labels, see retrain.heads.thresholds). `representative` calibrates int8 quantization (see
    retrain.models.quantize)."""
    written = _write_graph_and_labels(settings, labels, network, layer)
    if not (settings.output_tflite or settings.saved_model_dir):
        return written
    classifier = Classifier(
        network.loaded(),
        layer.head,
        layer.weights,
        layer.biases,
        network.input_size,
        settings.final_tensor_name,
    )
    if settings.output_tflite:
        write_tflite(
            classifier,
            settings.output_tflite,
            labels,
            network.name,
            quantization=settings.quantize,
            representative=representative,
            int8_io=settings.tflite_int8_io,
        )
        written["output_tflite"] = settings.output_tflite
        log.info(
            "Saved the TFLite model (%s) to %s",
            quantize.describe(settings.quantize, settings.tflite_int8_io),
            settings.output_tflite,
        )
    if settings.saved_model_dir:
        write_saved_model(classifier, labels, settings.saved_model_dir)
        written["saved_model_dir"] = settings.saved_model_dir
        log.info("Saved the SavedModel to %s", settings.saved_model_dir)
    return written


def _write_graph_and_labels(
    settings: ExportConfig, labels: list[str], network: Network, layer: TrainedLayer
) -> dict[str, str]:
    """The files that need no loaded module: the frozen graph, the labels and the head's
    thresholds beside them, each logged as retrain.py did; returns {setting: path}."""
    written = {}
    if settings.output_graph:
        graph = classifier_graph_def(
            network.graph_def(),
            layer.head,
            layer.weights,
            layer.biases,
            settings.final_tensor_name,
        )
        write_frozen_graph(graph, settings.output_graph)
        written["output_graph"] = settings.output_graph
    if settings.output_labels:
        write_labels(labels, settings.output_labels)
        written["output_labels"] = settings.output_labels
        if layer.head.thresholds is not None:
            written["thresholds"] = write_thresholds(layer.head.thresholds, settings.output_labels)
            log.info("Saved the labels' thresholds to %s", written["thresholds"])
    if settings.output_graph and settings.output_labels:  # retrain.py's line, for scripts
        log.info(
            "Saved the frozen graph to %s and labels to %s",
            settings.output_graph,
            settings.output_labels,
        )
    elif settings.output_graph:
        log.info("Saved the frozen graph to %s", settings.output_graph)
    elif settings.output_labels:
        log.info("Saved the labels to %s", settings.output_labels)
    return written
