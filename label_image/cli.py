"""`label-image`: print the top labels for images, using any model retrain exports.

Flags follow TensorFlow's label_image.py example: --graph, --labels, --image, --input_layer,
--output_layer, --input_height/--input_width, --input_mean, --input_std, plus --top_k,
--batch_size and --json. --graph is a frozen graph (.pb), a .tflite or a SavedModel folder, told
by content; --image takes files and folders (walked as retrain walks a class folder). The labels
come from --labels, else from the model itself (a .tflite's or SavedModel's own).

Exit status: 0 when every image was classified; 1 when some image could not be read (each is one
line on stderr, the others are classified); 2 for a usage error, a model that cannot be loaded or
a labels file that does not fit the model (one line, nothing classified); 130 on Ctrl-C.

A multi-label model (trained with --labels_csv) has a thresholds file beside its labels file
(`L.thresholds` for --labels L, see retrain.heads.thresholds): then every label whose score is at
least its threshold is printed, best first (`label score`), and with an explicit --top_k also
the other labels among the k best scores, marked `(below threshold T)`.
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
from absl import flags

from label_image import compat
from retrain.data.decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageDecodeError,
    decode_image,
    skip_reason,
)
from retrain.data.resize import resize_bilinear
from retrain.data.scan import display_path, walk_images
from retrain.errors import UsageError
from retrain.heads.thresholds import read_thresholds, thresholds_path
from retrain.utils.runtime import import_tensorflow_quietly, usable_cpus

PROG = "label-image"


def define_flags(f: flags.FlagValues) -> None:
    """Define label-image's flags on `f`."""
    flags.DEFINE_string(
        "graph",
        "/tmp/output_graph.pb",
        "The model: a frozen graph (.pb), a .tflite or a SavedModel folder (told by content).",
        flag_values=f,
    )
    flags.DEFINE_string(
        "labels",
        None,
        "Labels file, one per line, as many as the model has outputs (default: the labels the "
        "model carries, a .tflite's or SavedModel's, else output_labels.txt, "
        "retrained_labels.txt or the graph's name with .txt, beside the graph).",
        flag_values=f,
    )
    flags.DEFINE_multi_string(
        "image",
        [],
        "Image files or folders to classify; repeat the flag or list more after the flags.",
        flag_values=f,
    )
    flags.DEFINE_string(
        "input_layer",
        None,
        "Name of the input node (frozen graph) or signature input (SavedModel); default: "
        "Placeholder, or the only one.",
        flag_values=f,
    )
    flags.DEFINE_string(
        "output_layer",
        None,
        "Name of the output node (frozen graph) or signature output (SavedModel); default: "
        "final_result, or the only one.",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "input_height", None, "Input height (default: from the graph).", flag_values=f
    )
    flags.DEFINE_integer(
        "input_width", None, "Input width (default: from the graph).", flag_values=f
    )
    flags.DEFINE_float(
        "input_mean", 0.0, "Subtracted from each pixel value (0..255).", flag_values=f
    )
    flags.DEFINE_float(
        "input_std", 255.0, "Pixel values are divided by this after the mean.", flag_values=f
    )
    flags.DEFINE_integer(
        "top_k",
        5,
        "How many labels to print per image (a multi-label model: every label over its "
        "threshold, and given this flag, also the rest of the k best).",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "batch_size",
        32,
        "Images per model call; the next batch is decoded while the model runs.",
        flag_values=f,
    )
    flags.DEFINE_boolean(
        "json",
        False,
        'One JSON object per image on stdout: {"file", "labels", "scores"} with the top_k best '
        '(a multi-label model adds "predicted"), or {"file", "error"}.',
        flag_values=f,
    )


def read_labels(path: str) -> list[str]:
    """Labels, one per line (trailing whitespace removed)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return [line.rstrip() for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--labels: cannot read {path}: {err}") from None


def read_label_thresholds(labels_path: str, count: int) -> np.ndarray | None:
    """The thresholds beside the labels file (one per label), or None for a single-label
    model (no thresholds file); a thresholds file that cannot be used is a UsageError."""
    try:
        thresholds = read_thresholds(labels_path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"--labels: {getattr(err, 'strerror', None) or err}") from None
    if thresholds is not None and len(thresholds) != count:
        raise UsageError(
            f"--labels: {thresholds_path(labels_path)} has {len(thresholds)} thresholds for "
            f"{count} labels"
        )
    return None if thresholds is None else np.array(thresholds)


def multi_label_lines(
    scores: np.ndarray, labels: list[str], thresholds: np.ndarray, top_k: int | None
) -> list[str]:
    """A multi-label model's lines for one image: `label score` for every label at or over its
    threshold, best first, then, with `top_k`, the others among the `top_k` best scores,
    marked `(below threshold T)`."""
    order = np.argsort(-scores, kind="stable")
    over = [i for i in order if scores[i] >= thresholds[i]]
    lines = [f"{labels[i]} {scores[i]:.5f}" for i in over]
    if top_k:
        lines += [
            f"{labels[i]} {scores[i]:.5f} (below threshold {thresholds[i]:.5f})"
            for i in order[:top_k]
            if scores[i] < thresholds[i]
        ]
    return lines or ["(no label over its threshold)"]


def preprocess(pixels: np.ndarray, size: tuple[int, int], mean: float, std: float) -> np.ndarray:
    """Resize uint8 pixels bilinearly (as retrain did for training), then (x - mean) / std."""
    image = resize_bilinear(pixels, size)  # float32, a fresh array: normalise it in place
    image -= np.float32(mean)
    image /= np.float32(std)
    return image


def load_model(f: flags.FlagValues):
    """The classifier behind --graph (see retrain.export.loading): a .tflite needs no TensorFlow."""
    from retrain.export.loading import TFLITE, ModelLoadError, model_format, open_model

    try:
        if model_format(f.graph) != TFLITE:
            import_tensorflow_quietly()
            return open_named_layers(f, open_model)
        for name in ("input_layer", "output_layer"):
            if f[name].value is not None:
                warn(f"ignored --{name} {f[name].value}: a .tflite has one input and one output")
        return open_model(f.graph)
    except ModelLoadError as err:
        raise UsageError(f"--graph: {err}") from None


def open_named_layers(f: flags.FlagValues, open_model: Callable):
    """A graph or SavedModel opened with the layers TensorFlow's scripts name (`final_result:0`
    is `final_result`); an input a retrain graph lacks (an old graph's `Mul`, `input`,
    `DecodeJpeg`) is its `Placeholder`, with a warning."""
    from retrain.export.loading import ModelLoadError

    input_layer, output_layer = compat.layer_name(f.input_layer), compat.layer_name(f.output_layer)
    try:
        return open_model(f.graph, input_layer, output_layer)
    except ModelLoadError as err:
        if input_layer is None or not str(err).startswith("--input_layer: no "):
            raise
        model = open_model(f.graph, None, output_layer)
        if input_name(model) != compat.RETRAIN_INPUT:
            raise err from None
        warn(compat.missing_input_warning(input_layer))
        return model


def input_name(model) -> str | None:
    """The name of a graph's input node or a SavedModel's input key (None for a .tflite)."""
    tensor = getattr(model, "input", None)
    return tensor.op.name if tensor is not None else getattr(model, "_input", None)


def takes_unit_pixels(model) -> bool:
    """Whether the model is retrain's (or retrain.py's): its input takes pixels in [0, 1]
    (a .tflite: one that carries labels and no other normalization than retrain's)."""
    name = input_name(model)
    if name is not None:
        return name == compat.RETRAIN_INPUT
    return model.labels is not None and getattr(model, "normalization", None) is None


def warn(line: str) -> None:
    """One warning line on stderr."""
    print(f"{PROG}: warning: {line}", file=sys.stderr)


def model_labels(f: flags.FlagValues, model) -> tuple[list[str], np.ndarray | None, str]:
    """(labels, a multi-label model's thresholds or None, where they came from): --labels if
    given, else those the model carries, else a labels file beside the graph (see
    labels_file_beside). A count that does not fit the model's outputs is a UsageError."""
    if f.labels is None and model.labels is not None:
        labels, source = model.labels, f"the labels inside {f.graph}"
        thresholds = None if model.thresholds is None else np.array(model.thresholds)
    else:
        path = f.labels or labels_file_beside(f.graph)
        labels, source = read_labels(path), f"--labels: {path}"
        thresholds = read_label_thresholds(path, len(labels))
    check_label_count(len(labels), model.output_width(), source)
    return labels, thresholds, source


def labels_file_beside(graph: str) -> str:
    """The labels file beside `graph` (retrain.py's output_labels.txt, the Poets'
    retrained_labels.txt, or the graph's name with .txt), never one of another run elsewhere;
    a UsageError naming where it looked if there is none."""
    candidates = compat.labels_beside(graph)
    for path in candidates:
        if path.is_file():
            return str(path)
    looked = ", ".join(str(path) for path in candidates)
    raise UsageError(f"--labels: {graph} carries no labels and none are beside it ({looked})")


def check_label_count(count: int, outputs: int | None, source: str) -> None:
    """Raise UsageError unless `count` labels fit `outputs` scores (None: not known yet)."""
    if outputs is not None and count != outputs:
        raise UsageError(f"{source} has {count} labels for a model with {outputs} outputs")


def expand_images(args: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files of `args` (a folder stands for the image files under it, walked as
    retrain walks a class folder) and (path, reason) of what cannot be classified: a folder
    without images, files left out under a folder. Files named are kept as they are: reading
    them tells what is wrong with them."""
    images, problems = [], []
    for arg in args:
        if not os.path.isdir(arg):
            images.append(arg)
            continue
        found, ignored = walk_images(arg)
        images += found
        problems += ignored
        if not found:
            problems.append((arg, "no image files in this folder"))
    return images, problems


def top_labels(scores: np.ndarray, labels: list[str], k: int) -> list[tuple[str, float]]:
    """The k best (label, score) pairs, best first."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [(labels[i] if i < len(labels) else str(i), float(scores[i])) for i in order]


def prepared_batches(
    paths: Sequence[str], batch_size: int, prepare: Callable, pool: Executor
) -> Iterator[list[tuple[str, object]]]:
    """(path, prepare(path)) in order, batch by batch; the pool works on the next batch while
    the caller uses this one, and never more than two batches are held."""
    ahead: deque[list] = deque()
    for start in range(0, len(paths), batch_size):
        ahead.append([(p, pool.submit(prepare, p)) for p in paths[start : start + batch_size]])
        if len(ahead) > 1:
            yield [(p, future.result()) for p, future in ahead.popleft()]
    while ahead:
        yield [(p, future.result()) for p, future in ahead.popleft()]


def classify(f: flags.FlagValues, args: list[str]) -> int:
    """Classify the images of `args` (files and folders); print results; return the exit
    status (1 if some image could not be classified, else 0)."""
    model = load_model(f)
    unit_pixels = takes_unit_pixels(model)
    if not unit_pixels and (f["input_mean"].present or f["input_std"].present):
        model.normalization = None  # the flags normalize for the model, not its metadata
    labels, thresholds, source = model_labels(f, model)
    height, width = input_size(f, model)
    mean, std = f.input_mean, f.input_std
    if unit_pixels:
        given = f["input_mean"].present or f["input_std"].present
        mean, std, warning = compat.unit_scaling(mean, std, given)
        if warning:
            warn(warning)
    images, problems = expand_images(args)
    for path, reason in problems:
        report_error(f, path, reason)

    def prepare(path: str) -> np.ndarray | str:
        """The model's input for one image, or why it cannot be read."""
        try:
            with open(path, "rb"):  # decode_image words a file it cannot open as undecodable
                pass
            pixels = decode_image(path, (height, width), DEFAULT_MAX_IMAGE_PIXELS)
        except (ImageDecodeError, OSError) as err:
            return skip_reason(err)
        return preprocess(pixels, (height, width), mean, std)

    show_names = len(images) > 1 or len(args) > 1 or os.path.isdir(args[0])
    failed = bool(problems)
    with ThreadPoolExecutor(usable_cpus()) as pool:  # Pillow and NumPy release the GIL
        for batch in prepared_batches(images, f.batch_size, prepare, pool):
            for path, reason in batch:
                if isinstance(reason, str):
                    report_error(f, path, reason)
                    failed = True
            kept = [(path, x) for path, x in batch if isinstance(x, np.ndarray)]
            if not kept:
                continue
            scores = model.predict(np.stack([x for _, x in kept]))
            check_label_count(len(labels), scores.shape[1], source)
            for (path, _), row in zip(kept, scores):
                print_result(f, path, row, labels, thresholds, show_names)
    return 1 if failed else 0


def input_size(f: flags.FlagValues, model) -> tuple[int, int]:
    """(height, width) the images are resized to: the graph's where it fixes them (a
    contradicting --input_height/--input_width is ignored with a warning), else the flags'."""
    graph = model.input_size()
    warning = compat.size_warning((f.input_height, f.input_width), graph)
    if warning:
        warn(warning)
    height, width = graph[0] or f.input_height, graph[1] or f.input_width
    if not height or not width:
        raise UsageError(
            "--input_height/--input_width: the graph does not fix its input size; give both"
        )
    return height, width


def report_error(f: flags.FlagValues, path: str, reason: str) -> None:
    """One line on stderr for an image that cannot be classified (and with --json, an
    {"file", "error"} object on stdout)."""
    print(f"{PROG}: error: --image {display_path(path)}: {reason}", file=sys.stderr)
    if f.json:
        print(json.dumps({"file": display_path(path), "error": reason}))


def print_result(
    f: flags.FlagValues,
    path: str,
    scores: np.ndarray,
    labels: list[str],
    thresholds: np.ndarray | None,
    show_name: bool,
) -> None:
    """One image's result: a JSON object with --json, else `label score` lines (after a
    `path:` line when several images are classified)."""
    top = top_labels(scores, labels, f.top_k)
    if f.json:
        result = {
            "file": display_path(path),
            "labels": [label for label, _ in top],
            "scores": [score for _, score in top],
        }
        if thresholds is not None:
            over = np.flatnonzero(scores >= thresholds)
            result["predicted"] = [labels[i] for i in over[np.argsort(-scores[over])]]
        print(json.dumps(result))
        return
    if show_name:
        print(f"{display_path(path)}:")
    if thresholds is not None:
        top_k = f.top_k if f["top_k"].present else None
        print("\n".join(multi_label_lines(scores, labels, thresholds, top_k)))
        return
    for label, score in top:
        print(f"{label} {score:.5f}")


def main(argv: list[str] | None = None) -> int:
    """Run label-image with `argv` (default sys.argv); returns the exit status."""
    argv, warnings = compat.rewrite_argv(list(sys.argv if argv is None else argv))
    f = flags.FlagValues()
    define_flags(f)
    if any(arg in ("-h", "--help", "-help", "--helpfull", "-helpfull") for arg in argv[1:]):
        print(f"usage: {PROG} --graph G.pb --labels L.txt --image IMG [IMG ...]\n\n{f.get_help()}")
        return 0
    try:
        try:
            rest = f(argv)
        except flags.Error as err:
            raise UsageError(str(err).splitlines()[0]) from None
        for line in warnings:
            warn(line)
        images = list(f.image) + rest[1:]
        if not images:
            raise UsageError("--image: give at least one image file")
        for name in ("top_k", "batch_size"):
            if f[name].value <= 0:
                raise UsageError(f"--{name} must be positive, got {f[name].value}")
        if f.input_std == 0:
            raise UsageError("--input_std must not be 0")
        for name in ("input_height", "input_width"):
            if f[name].value is not None and f[name].value <= 0:
                raise UsageError(f"--{name} must be positive, got {f[name].value}")
        return classify(f, images)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
