"""The "TensorFlow for Poets" retrain.py's own flags, mapped onto retrain's.

Its forks and Dockerfiles run `retrain.py --architecture mobilenet_0.50_224 --model_dir
tf_files/models ...`. `--architecture` names a TF1 network the script downloaded; retrain maps
every one to its bundled default module (no network), and a `*_quantized` one also writes an
int8 `.tflite` beside the frozen graph: the quantized model that TF 1's fake-quantized modules
were for. `--model_dir` was where the script kept its downloads; retrain downloads nothing for
a bundled module, so it is ignored with a warning (the module cache is `--module_cache_dir`).
"""

from __future__ import annotations

import re
from pathlib import PurePath

from retrain.cli.compat_argv import Rewritten
from retrain.errors import UsageError

# The Poets retrain.py's names, mobilenet_<width>_<size>[_quantized] and inception_v3, and the
# variants its forks added (mobilenet_v2_1.4_224): every one a TF1 network retrain cannot fetch.
ARCHITECTURE = re.compile(r"^(?:mobilenet|inception)[\w.]*?(?P<quantized>_quantized)?$")
DEFAULT_GRAPH = "/tmp/output_graph.pb"  # retrain.py's --output_graph default


def poets_argv(rewritten: Rewritten, bundled: str) -> list[str]:
    """The argv absl reads with the Poets flags of `rewritten` mapped: `--architecture` to
    `--tfhub_module=bundled` (unless a module is given), its `_quantized` also to
    `--quantize=int8` and `--output_tflite` beside the graph (unless given). Appends one
    warning per Poets flag to `rewritten.warnings`; raises UsageError for an architecture the
    Poets script did not know."""
    argv, given, warn = list(rewritten.argv), rewritten.given, rewritten.warnings.append
    if "model_dir" in rewritten.poets:
        warn(
            f"ignored --model_dir {rewritten.poets['model_dir']}: retrain downloads no module "
            "for a bundled one (converted modules are kept in --module_cache_dir)"
        )
    name = rewritten.poets.get("architecture")
    if name is None:
        return argv
    match = ARCHITECTURE.match(name)
    if given.get("tfhub_module"):
        warn(f"ignored --architecture {name}: --tfhub_module {given['tfhub_module']} is given")
        return argv
    if match is None:
        raise UsageError(
            f"--architecture {name}: not a name the Poets retrain.py knew "
            "(mobilenet_<width>_<size>[_quantized] or inception_v3); give --tfhub_module instead"
        )
    argv.append(f"--tfhub_module={bundled}")
    warn(f"--architecture {name}: using the bundled {bundled} instead (needs no network)")
    if match["quantized"]:
        argv += _quantized_export(name, given, warn)
    return argv


def _quantized_export(name: str, given: dict[str, str | None], warn) -> list[str]:
    """Flags that make a `*_quantized` architecture's run write an int8 .tflite beside the
    graph (those the script gave are kept)."""
    extra = []
    tflite = given.get("output_tflite")
    if not tflite:
        graph = given.get("output_graph") or DEFAULT_GRAPH
        tflite = str(PurePath(graph).with_suffix(".tflite"))
        extra.append(f"--output_tflite={tflite}")
    quantize = given.get("quantize")
    if not quantize:
        quantize = "int8"
        extra.append("--quantize=int8")
    warn(
        f"--architecture {name}: also writing a TFLite model quantized as {quantize} to "
        f"{tflite} (TF 2 quantizes after training, not during it)"
    )
    return extra


__all__ = ["ARCHITECTURE", "poets_argv"]
