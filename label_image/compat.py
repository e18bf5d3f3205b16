"""label-image speaking the older label_image.py scripts' language: their flag names, their layer
spellings, their input names and pixel scalings, and where they found the labels file.

- TFLite's label_image.py: `--model_file`/`-m`, `--label_file`/`-l`, `-i`, `--num_threads`;
  TensorFlow's examples/image_retraining/label_image.py: `--num_top_predictions`.
- TensorFlow's `final_result:0` is the node `final_result`.
- Old graphs took `Mul`, `input` or `DecodeJpeg` in [-1, 1] (`--input_mean 128 --input_std
  128`); a retrain graph takes `Placeholder` in [0, 1] (`--input_mean 0 --input_std 255`).
- The Poets scripts kept `retrained_labels.txt` beside `retrained_graph.pb`.

Each function is pure (paths are looked at, nothing is loaded) and returns warnings as lines.
"""

from __future__ import annotations

from pathlib import Path

# Other label_image.py's flag names -> label-image's.
ALIASES = {
    "model_file": "graph",
    "label_file": "labels",
    "num_top_predictions": "top_k",
    "m": "graph",
    "l": "labels",
    "i": "image",
}
# TFLite's label_image.py flags that say how to run the model, not what: their value is ignored.
IGNORED = ("num_threads", "ext_delegate", "ext_delegate_options")
RETRAIN_INPUT = "Placeholder"  # the input of retrain's (and retrain.py's) graphs, in [0, 1]
UNIT_MEAN, UNIT_STD = 0.0, 255.0
LABEL_FILES = ("output_labels.txt", "retrained_labels.txt")  # retrain.py's, the Poets'


def rewrite_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv with other label_image.py's flag names as label-image's, warnings): aliases are
    renamed silently (the same meaning), IGNORED flags are dropped with a warning."""
    out, warnings, i = argv[:1], [], 1
    while i < len(argv):
        word, i = argv[i], i + 1
        if word == "--" or not word.startswith("-"):
            out.append(word)
            continue
        dashes = "--" if word.startswith("--") else "-"
        name, eq, value = word[len(dashes) :].partition("=")
        if name in IGNORED:
            if not eq and i < len(argv) and not argv[i].startswith("-"):
                value, i = argv[i], i + 1
            warnings.append(f"ignored --{name} {value}: label-image chooses its own threads")
            continue
        if name in ALIASES and (dashes == "--" or len(name) == 1):
            word = f"--{ALIASES[name]}{eq}{value}"
        out.append(word)
    return out, warnings


def layer_name(name: str | None) -> str | None:
    """A node's name as TensorFlow's scripts spell its tensor (`final_result:0`) -> the node's
    (`final_result`)."""
    return name.removesuffix(":0") if name else name


def missing_input_warning(wanted: str) -> str:
    """The warning when a retrain graph lacks the input layer `wanted` (an old graph's)."""
    return (
        f"--input_layer {wanted}: this graph has no such input; using {RETRAIN_INPUT}, which "
        f"takes pixels in [0, 1] (--input_mean {UNIT_MEAN:g} --input_std {UNIT_STD:g}, the "
        "defaults)"
    )


def unit_scaling(mean: float, std: float, given: bool) -> tuple[float, float, str | None]:
    """(mean, std, warning) for a retrain input in [0, 1]: a scaling given that maps pixels
    0..255 elsewhere (an old graph's 128/128 gives [-1, 1]) is ignored with a warning."""
    low, high = (0 - mean) / std, (255 - mean) / std
    if not given or (abs(low) < 0.01 and abs(high - 1) < 0.01):
        return mean, std, None
    return (
        UNIT_MEAN,
        UNIT_STD,
        f"ignored --input_mean {mean:g} --input_std {std:g}: they scale pixels to "
        f"[{low:.3g}, {high:.3g}], but {RETRAIN_INPUT} takes [0, 1]",
    )


def size_warning(given: tuple[int | None, int | None], graph: tuple[int | None, int | None]):
    """A warning when --input_height/--input_width contradict the graph's fixed input size
    (the images are then resized to the graph's), else None."""
    names = ("input_height", "input_width")
    wrong = [(n, f) for n, f, g in zip(names, given, graph) if None not in (f, g) and f != g]
    if not wrong:
        return None
    flags = " ".join(f"--{name} {value}" for name, value in wrong)
    return (
        f"ignored {flags}: the graph takes {graph[0]}x{graph[1]} images, so each image is "
        "resized to that"
    )


def labels_beside(graph: str) -> list[Path]:
    """Where a labels file for `graph` may be, in order: retrain.py's and the Poets' names
    beside it, then its name with `.txt` (and `_graph` read as `_labels`)."""
    path = Path(graph)
    candidates = [path.parent / name for name in LABEL_FILES]
    candidates.append(path.with_suffix(".txt"))
    if "graph" in path.stem:
        candidates.append(path.with_name(path.stem.replace("graph", "labels") + ".txt"))
    return list(dict.fromkeys(candidates))


__all__ = [
    "ALIASES",
    "RETRAIN_INPUT",
    "labels_beside",
    "layer_name",
    "missing_input_warning",
    "rewrite_argv",
    "size_warning",
    "unit_scaling",
]
