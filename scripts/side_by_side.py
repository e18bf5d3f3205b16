#!/usr/bin/env python3
"""retrain against TF Hub's retrain.py, side by side, on the same images and module (issue 7).

    python scripts/side_by_side.py --retrain_py ~/hub/examples/image_retraining/retrain.py \\
        --image_dir ~/flower_photos --rounds 3

retrain.py is not part of this project: give the path of TF Hub's
`examples/image_retraining/retrain.py` (checked with commit 0163eda). This script copies it into
a scratch folder with the smallest changes that let it run here, and nothing else changed:

1. `import tensorflow.compat.v1 as tf` and `tf.disable_v2_behavior()`, so it runs on TF 2;
2. no tensorflow_hub: instead of `hub.Module(...)` it imports the frozen graph of the same
   module that retrain uses (made here with `retrain.export.cached_frozen_module`), so both
   programs run the same weights, and its image size constants come from that module;
3. `--tfhub_module` keeps only its other use, naming the bottleneck files.

Each round runs retrain with an empty, then a filled cache, and retrain.py the same way (the
order alternates between rounds, so a slow spell on a shared machine hits both). Printed as
JSON: every run, the medians, and the ratios against issue 7's targets: whole run with an empty
cache at most 1/6 of retrain.py's, with a filled cache at most 1/18, extraction at least 4x its
images/s, peak RSS no more than its own. Extraction is timed alike for both: retrain.py's from
its first to its last "Creating bottleneck" log line, retrain's by its loop over the images to
compute (`extraction_images_per_second`); the whole bottleneck phase, with module loading and
the cache lookup, is reported beside it. retrain.py keeps its checkpoint at a fixed path,
/tmp/_retrain_checkpoint*, so do not run two comparisons at once.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import re
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import benchmark  # noqa: E402  (the sibling script: `retrain` command line, timed runs)

MODULE = "efficientnet_lite0"
# From retrain's --metrics_json. extraction_images_per_second (decoding, the model and cache
# writes) is what retrain.py's log gives; bottleneck_images_per_second adds module loading,
# the backend check, lookup and hashing.
METRICS = ("test_accuracy", "extraction_images_per_second", "bottleneck_images_per_second")
TARGETS = {  # issue 7, "How it is checked"
    "empty_cache_wall_ratio": ("<=", 1 / 6),
    "filled_cache_wall_ratio": ("<=", 1 / 18),
    "extraction_speedup": (">=", 4.0),
    "peak_rss_ratio": ("<=", 1.0),
}
_COMPARE = {"<=": operator.le, ">=": operator.ge}
CACHES = ("empty", "filled")

# (text in retrain.py, replacement, how many times it must occur). {graph} is the frozen module.
PATCHES: list[tuple[str, str, int]] = [
    (
        "import tensorflow as tf\nimport tensorflow_hub as hub\n",
        "import tensorflow.compat.v1 as tf  # PATCH: TF1 API under TF 2\n"
        "tf.disable_v2_behavior()  # PATCH\n",
        1,
    ),
    (
        "# The location where variable checkpoints will be stored.\n",
        "FROZEN_MODULE_GRAPH = {graph!r}  # PATCH: the module, frozen by retrain\n"
        "MODULE_IMAGE_SIZE = {size!r}  # PATCH: was hub.get_expected_image_size()\n"
        "\n"
        "# The location where variable checkpoints will be stored.\n",
        1,
    ),
    (
        "  height, width = hub.get_expected_image_size(module_spec)\n"
        "  with tf.Graph().as_default() as graph:\n"
        "    resized_input_tensor = tf.placeholder(tf.float32, [None, height, width, 3])\n"
        "    m = hub.Module(module_spec)\n"
        "    bottleneck_tensor = m(resized_input_tensor)\n",
        "  height, width = MODULE_IMAGE_SIZE  # PATCH\n"
        "  with tf.Graph().as_default() as graph:\n"
        "    resized_input_tensor = tf.placeholder(tf.float32, [None, height, width, 3])\n"
        "    graph_def = tf.GraphDef()  # PATCH: hub.Module -> the frozen module graph\n"
        "    with tf.gfile.GFile(module_spec, 'rb') as f:\n"
        "      graph_def.ParseFromString(f.read())\n"
        "    bottleneck_tensor, = tf.import_graph_def(\n"
        "        graph_def, input_map={{'Placeholder:0': resized_input_tensor}},\n"
        "        return_elements=['bottleneck:0'])\n",
        1,
    ),
    (
        "  input_height, input_width = hub.get_expected_image_size(module_spec)\n"
        "  input_depth = hub.get_num_image_channels(module_spec)\n",
        "  input_height, input_width = MODULE_IMAGE_SIZE  # PATCH\n  input_depth = 3  # PATCH\n",
        2,
    ),
    (
        "  module_spec = hub.load_module_spec(FLAGS.tfhub_module)\n",
        "  module_spec = FROZEN_MODULE_GRAPH  # PATCH\n",
        1,
    ),
]


class PatchError(ValueError):
    """The file given is not the retrain.py these patches were written for."""


def patch_retrain_py(source: str, frozen_graph: Path, image_size: tuple[int, int]) -> str:
    """retrain.py's source with PATCHES applied; PatchError names the first that does not fit."""
    for number, (old, new, count) in enumerate(PATCHES, 1):
        found = source.count(old)
        if found != count:
            first = old.strip().splitlines()[0]
            raise PatchError(
                f"change {number} expects {count} occurrence(s) of {first!r}, found {found}"
            )
        source = source.replace(old, new.format(graph=str(frozen_graph), size=image_size))
    if re.search(r"\bhub\.", re.sub(r"#.*|'''[\s\S]*?'''|\"\"\"[\s\S]*?\"\"\"", "", source)):
        raise PatchError("a call to tensorflow_hub is left after the changes")
    return source


_ABSL_LINE = re.compile(r"^I(\d{4} \d\d:\d\d:\d\d\.\d+) .*?\] (.*)$")


def parse_retrain_py_log(text: str) -> dict:
    """Extraction images/s (first to last "Creating bottleneck") and test accuracy from
    retrain.py's log (absl-format lines)."""
    created: list[datetime] = []
    accuracy = None
    for line in text.splitlines():
        match = _ABSL_LINE.match(line)
        if not match:
            continue
        stamp, message = match.groups()
        if message.startswith("Creating bottleneck at "):
            created.append(datetime.strptime(stamp, "%m%d %H:%M:%S.%f"))
        elif message.startswith("Final test accuracy = "):
            accuracy = float(message.split("=")[1].split("%")[0]) / 100
    rate = None
    if len(created) > 1:
        # Each line is logged as a bottleneck starts: n lines bracket n - 1 computed ones.
        span = (created[-1] - created[0]).total_seconds()
        rate = (len(created) - 1) / span if span > 0 else None
    return {"bottlenecks_created": len(created), "extraction_images_per_second": rate,
            "test_accuracy": accuracy}  # fmt: skip


def prepare_retrain_py(retrain_py: Path, work: Path) -> Path:
    """The patched copy of retrain.py in `work`, next to the frozen module it imports."""
    from retrain.models.loading import resolve_module

    module = resolve_module(MODULE)
    graph = work / "module.pb"
    # Read and patched before importing TensorFlow: a wrong file is refused at once.
    source = patch_retrain_py(retrain_py.read_text(encoding="utf-8"), graph, module.input_size)
    from retrain.export import cached_frozen_module

    cached_frozen_module(graph, module.load, module.input_size)
    patched = work / "retrain_py" / "retrain.py"
    patched.parent.mkdir()
    patched.write_text(source, encoding="utf-8")
    return patched


def retrain_py_command(patched: Path, image_dir: Path, work: Path, extra: list[str]) -> list[str]:
    """A default retrain.py run on image_dir with every output under `work`. It runs in a
    folder of its own, so a relative image_dir is made absolute."""
    return [
        sys.executable,
        str(patched),
        f"--image_dir={image_dir.resolve()}",
        f"--bottleneck_dir={work / 'bottlenecks'}",
        f"--summaries_dir={work / 'logs'}",
        f"--output_graph={work / 'graph.pb'}",
        f"--output_labels={work / 'labels.txt'}",
        f"--intermediate_output_graphs_dir={work / 'intermediate'}/",
        f"--tfhub_module={MODULE}",
        *extra,
    ]


def run_retrain(image_dir: Path, work: Path, name: str, extra: list[str]) -> dict:
    """retrain with an empty, then a filled cache in `work/name`."""
    folder = work / name
    folder.mkdir()
    cmd = benchmark.retrain_command(image_dir, folder, MODULE, extra)
    runs = {}
    for cache in CACHES:
        runs[cache] = benchmark.timed_run(cmd, folder / f"{cache}.log")
        metrics = json.loads((folder / "metrics.json").read_text())
        for key in METRICS:
            runs[cache][key] = metrics.get(key)
    return runs


def run_retrain_py(patched: Path, image_dir: Path, work: Path, name: str, extra: list[str]) -> dict:
    """retrain.py with an empty, then a filled cache in `work/name`."""
    folder = work / name
    folder.mkdir()
    cmd = retrain_py_command(patched, image_dir, folder, extra)
    runs = {}
    for cache in CACHES:
        log = folder / f"{cache}.log"
        runs[cache] = benchmark.timed_run(cmd, log, cwd=folder)
        runs[cache].update(parse_retrain_py_log(log.read_text(errors="replace")))
    return runs


def medians(runs: list[dict], rates: dict[str, str]) -> dict:
    """Per cache, the median wall seconds and peak RSS over `runs`; and for each `rates` item
    (name: key), the median of that key over the empty-cache runs."""
    result = {
        f"{cache}_{key}": statistics.median(run[cache][key] for run in runs)
        for cache in CACHES
        for key in ("seconds", "peak_rss_mb")
    }
    for name, key in rates.items():
        result[name] = statistics.median(run["empty"][key] for run in runs)
    return result


def summary(ours: list[dict], theirs: list[dict]) -> dict:
    """Medians over rounds, and each ratio against its target."""
    rate = "extraction_images_per_second"
    phase = {"bottleneck_phase_images_per_second": "bottleneck_images_per_second"}
    mine = medians(ours, {rate: rate, **phase})
    base = medians(theirs, {rate: rate})
    ratios = {
        "empty_cache_wall_ratio": mine["empty_seconds"] / base["empty_seconds"],
        "filled_cache_wall_ratio": mine["filled_seconds"] / base["filled_seconds"],
        "extraction_speedup": mine["extraction_images_per_second"]
        / base["extraction_images_per_second"],
        "peak_rss_ratio": max(mine["empty_peak_rss_mb"], mine["filled_peak_rss_mb"])
        / max(base["empty_peak_rss_mb"], base["filled_peak_rss_mb"]),
    }
    verdict = {}
    for name, value in ratios.items():
        compare, target = TARGETS[name]
        verdict[name] = {
            "value": round(value, 4),
            "target": f"{compare} {target:.4g}",
            "met": _COMPARE[compare](value, target),
        }
    return {"retrain_median": mine, "retrain_py_median": base, "ratios": verdict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--retrain_py", type=Path, required=True, help="TF Hub's retrain.py (commit 0163eda)"
    )
    parser.add_argument(
        "--image_dir", type=Path, default=benchmark.ROOT / "examples" / "flower_photos"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument(
        "--how_many_training_steps",
        type=int,
        help="passed to both, for a quick check (issue 7's figures use the default, 4,000)",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be positive, got {args.rounds}")
    if not args.image_dir.is_dir():
        parser.error(f"--image_dir: {args.image_dir} is not a folder")
    with tempfile.TemporaryDirectory(prefix="retrain-side-by-side-") as tmp:
        work = Path(tmp)
        try:
            patched = prepare_retrain_py(args.retrain_py, work)
        except (OSError, UnicodeDecodeError) as err:
            parser.error(f"--retrain_py: cannot read {args.retrain_py}: {err}")
        except PatchError as err:
            parser.error(f"--retrain_py: {args.retrain_py} is not TF Hub's retrain.py: {err}")
        extra = []
        if args.how_many_training_steps is not None:
            extra = [f"--how_many_training_steps={args.how_many_training_steps}"]
        ours, theirs = [], []
        for round_ in range(args.rounds):
            order = ("retrain", "retrain_py") if round_ % 2 == 0 else ("retrain_py", "retrain")
            for who in order:
                name = f"{who}_{round_}"
                if who == "retrain":
                    runs = run_retrain(args.image_dir, work, name, extra)
                    ours.append(runs)
                else:
                    runs = run_retrain_py(patched, args.image_dir, work, name, extra)
                    theirs.append(runs)
                print(json.dumps({name: runs}), file=sys.stderr, flush=True)
    report = {
        "cpu_count": os.cpu_count(),
        "image_dir": str(args.image_dir),
        "rounds": args.rounds,
        "retrain": ours,
        "retrain_py": theirs,
        **summary(ours, theirs),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
