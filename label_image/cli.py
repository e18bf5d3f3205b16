"""`label-image`: print the top labels for images, using a graph exported by retrain.

Flags follow TensorFlow's label_image.py example: --graph, --labels, --image, --input_layer,
--output_layer, --input_height/--input_width, --input_mean, --input_std, plus --top_k.

A multi-label model (trained with --labels_csv) has a thresholds file beside its labels file
(`L.thresholds` for --labels L, see retrain.thresholds): then every label whose score is at
least its threshold is printed, best first (`label score`), and with an explicit --top_k also
the other labels among the k best scores, marked `(below threshold T)`.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
from absl import flags

from retrain.decode import DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, decode_image, skip_reason
from retrain.errors import UsageError
from retrain.resize import resize_bilinear
from retrain.runtime import import_tensorflow_quietly, usable_cpus
from retrain.scan import display_path
from retrain.thresholds import read_thresholds, thresholds_path

PROG = "label-image"


def define_flags(f: flags.FlagValues) -> None:
    """Define label-image's flags on `f`."""
    flags.DEFINE_string(
        "graph", "/tmp/output_graph.pb", "Frozen graph (.pb) or .tflite model.", flag_values=f
    )
    flags.DEFINE_string(
        "labels", "/tmp/output_labels.txt", "Labels file, one per line.", flag_values=f
    )
    flags.DEFINE_multi_string(
        "image",
        [],
        "Image file(s) to classify; repeat the flag or list more files after the flags.",
        flag_values=f,
    )
    flags.DEFINE_string("input_layer", "Placeholder", "Name of the input node.", flag_values=f)
    flags.DEFINE_string("output_layer", "final_result", "Name of the output node.", flag_values=f)
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
    """The classifier behind --graph: a .tflite (no TensorFlow needed) or a frozen graph."""
    from label_image.models import ModelLoadError

    try:
        if str(f.graph).endswith(".tflite"):
            from label_image.tflite import TFLiteClassifier

            return TFLiteClassifier(f.graph)
        import_tensorflow_quietly()
        from label_image.models import FrozenGraphClassifier

        return FrozenGraphClassifier(f.graph, f.input_layer, f.output_layer)
    except ModelLoadError as err:
        raise UsageError(f"--graph: {err}") from None


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


def classify(f: flags.FlagValues, images: list[str]) -> int:
    """Classify `images`; print results; return the exit status."""
    labels = read_labels(f.labels)
    thresholds = read_label_thresholds(f.labels, len(labels))
    model = load_model(f)
    graph_h, graph_w = model.input_size()
    height = f.input_height or graph_h
    width = f.input_width or graph_w
    if not height or not width:
        raise UsageError(
            "--input_height/--input_width: the graph does not fix its input size; give both"
        )

    def prepare(path: str) -> np.ndarray | str:
        """The model's input for one image, or why it cannot be read."""
        try:
            pixels = decode_image(path, (height, width), DEFAULT_MAX_IMAGE_PIXELS)
        except (ImageDecodeError, OSError) as err:
            return skip_reason(err)
        return preprocess(pixels, (height, width), f.input_mean, f.input_std)

    status = 0
    with ThreadPoolExecutor(usable_cpus()) as pool:  # Pillow and NumPy release the GIL
        for batch in prepared_batches(images, f.batch_size, prepare, pool):
            kept = [(path, x) for path, x in batch if isinstance(x, np.ndarray)]
            for path, reason in batch:
                if isinstance(reason, str):
                    print(f"{PROG}: error: --image {display_path(path)}: {reason}", file=sys.stderr)
                    status = 1
            if not kept:
                continue
            scores = model.predict(np.stack([x for _, x in kept]))
            for (path, _), row in zip(kept, scores):
                if len(images) > 1:
                    print(f"{display_path(path)}:")
                if thresholds is not None:
                    top_k = f.top_k if f["top_k"].present else None
                    print("\n".join(multi_label_lines(row, labels, thresholds, top_k)))
                    continue
                for label, score in top_labels(row, labels, f.top_k):
                    print(f"{label} {score:.5f}")
    return status


def main(argv: list[str] | None = None) -> int:
    """Run label-image with `argv` (default sys.argv); returns the exit status."""
    argv = list(sys.argv if argv is None else argv)
    f = flags.FlagValues()
    define_flags(f)
    if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
        print(f"usage: {PROG} --graph G.pb --labels L.txt --image IMG [IMG ...]\n\n{f.get_help()}")
        return 0
    try:
        try:
            rest = f(argv)
        except flags.Error as err:
            raise UsageError(str(err).splitlines()[0]) from None
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
