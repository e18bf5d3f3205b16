#!/usr/bin/env python3
"""retrain against TF Hub's retrain.py, side by side, on the same images and module (issue 7).

    python scripts/side_by_side.py --retrain_py ~/hub/examples/image_retraining/retrain.py \\
        --image_dir ~/flower_photos --rounds 3 [--split_hash path]

retrain.py is not part of this project: give the path of TF Hub's
`examples/image_retraining/retrain.py`, at commit 0163eda or at the last commit that has it
(HEAD). This script copies it into a scratch folder with the smallest changes that let it run
here, and nothing else changed (PATCHES):

1. `import tensorflow.compat.v1 as tf` and `tf.disable_v2_behavior()`, so it runs on TF 2;
2. no tensorflow_hub: instead of `hub.Module(...)` it imports the frozen graph of the same
   module that retrain uses (made here with `retrain.export.writer.cached_frozen_module`), so both
   programs run the same weights, and its image size constants come from that module;
3. `--tfhub_module` keeps only its other use, naming the bottleneck files;
4. HEAD only: its `from tensorflow.contrib import quantize` (gone in TF 2, and called only for
   modules instrumented for quantization, which the frozen module is not) becomes
   `contrib_quantize = None`, and its "Creating bottleneck" line, logged at DEBUG there, is
   logged at INFO as 0163eda did, so that extraction is timed the same way for both versions.

Both programs get the same `--image_dir` string (a relative one is made absolute by prefixing
the current folder, its spelling otherwise kept, since retrain.py runs in a folder of its own).
retrain.py's split hashes each file's path spelled from that string; retrain's default hashes
the base name. With `--split_hash path` retrain is given `--split_hash=path` and splits as
retrain.py does, so both train, validate and test on the same images and their test accuracies
compare (`accuracy` in the report: the median of each and the test split sizes, which must
agree). Both draw training batches the same way (a class, then an image of it: retrain's
default `--sampling auto` is class_balanced for class folders), but their random draws differ.

Each round runs retrain with an empty, then a filled cache, and retrain.py the same way (the
order alternates between rounds, so a slow spell on a shared machine hits both). Printed as
JSON: every run, the medians, and the ratios against issue 7's targets: whole run with an empty
cache at most 1/6 of retrain.py's, with a filled cache at most 1/18, extraction at least 4x its
images/s, peak RSS no more than its own. Extraction is timed alike for both: retrain.py's from
its first to its last "Creating bottleneck" log line, retrain's by its loop over the images to
compute (`extraction_images_per_second`); the whole bottleneck phase, with module loading and
the cache lookup, is reported beside it. retrain.py at HEAD is given `--checkpoint_path` in its
scratch folder; at 0163eda it keeps its checkpoint at a fixed path, /tmp/_retrain_checkpoint*,
so do not run two comparisons with that version at once.
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
from dataclasses import dataclass
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
SPLIT_HASHES = ("basename", "path")  # retrain's --split_hash choices


@dataclass(frozen=True)
class Patch:
    """One change to retrain.py: `pattern` (a regular expression, `^` and `$` at each line)
    must match a number of times in `counts` (more than one count: the versions differ), and
    each match becomes `replacement`, taken literally once {graph} (the frozen module's path)
    and {size} (its input size) are filled in."""

    what: str  # what the pattern finds, for the error message
    pattern: str
    replacement: str
    counts: tuple[int, ...] = (1,)


# Fitted to retrain.py at 0163eda and at HEAD: where the two differ, one pattern matches both
# spellings, or a count of 0 lets a version without the text through.
PATCHES: list[Patch] = [
    Patch(
        "the tensorflow and tensorflow_hub imports",
        # 0163eda: `import tensorflow as tf`; HEAD: `import tensorflow.compat.v1 as tf`.
        r"^import tensorflow(?:\.compat\.v1)? as tf\nimport tensorflow_hub as hub\n",
        "import tensorflow.compat.v1 as tf  # PATCH: TF1 API under TF 2\n"
        "tf.disable_v2_behavior()  # PATCH\n",
    ),
    Patch(
        "'FLAGS = None'",
        r"^FLAGS = None\n",
        "FLAGS = None\n"
        "FROZEN_MODULE_GRAPH = {graph!r}  # PATCH: the module, frozen by retrain\n"
        "MODULE_IMAGE_SIZE = {size!r}  # PATCH: was hub.get_expected_image_size()\n",
    ),
    Patch(
        "create_module_graph's hub.Module",
        re.escape(
            "  height, width = hub.get_expected_image_size(module_spec)\n"
            "  with tf.Graph().as_default() as graph:\n"
            "    resized_input_tensor = tf.placeholder(tf.float32, [None, height, width, 3])\n"
            "    m = hub.Module(module_spec)\n"
            "    bottleneck_tensor = m(resized_input_tensor)\n"
        ),
        "  height, width = MODULE_IMAGE_SIZE  # PATCH\n"
        "  with tf.Graph().as_default() as graph:\n"
        "    resized_input_tensor = tf.placeholder(tf.float32, [None, height, width, 3])\n"
        "    graph_def = tf.GraphDef()  # PATCH: hub.Module -> the frozen module graph\n"
        "    with tf.gfile.GFile(module_spec, 'rb') as f:\n"
        "      graph_def.ParseFromString(f.read())\n"
        "    bottleneck_tensor, = tf.import_graph_def(\n"
        "        graph_def, input_map={{'Placeholder:0': resized_input_tensor}},\n"
        "        return_elements=['bottleneck:0'])\n",
    ),
    Patch(
        "'input_height, input_width = hub.get_expected_image_size(module_spec)'",
        re.escape(
            "  input_height, input_width = hub.get_expected_image_size(module_spec)\n"
            "  input_depth = hub.get_num_image_channels(module_spec)\n"
        ),
        "  input_height, input_width = MODULE_IMAGE_SIZE  # PATCH\n  input_depth = 3  # PATCH\n",
        (2,),
    ),
    Patch(
        "'module_spec = hub.load_module_spec(FLAGS.tfhub_module)'",
        re.escape("  module_spec = hub.load_module_spec(FLAGS.tfhub_module)\n"),
        "  module_spec = FROZEN_MODULE_GRAPH  # PATCH\n",
    ),
    Patch(
        "the tensorflow.contrib.quantize import (HEAD)",
        r"^from tensorflow\.contrib import quantize as contrib_quantize\n",
        "contrib_quantize = None  # PATCH: no tf.contrib in TF 2; used for quantized modules\n",
        (0, 1),
    ),
    Patch(
        "the 'Creating bottleneck' line at DEBUG (HEAD)",
        re.escape("  logging.debug('Creating bottleneck at %s', bottleneck_path)\n"),
        "  logging.info('Creating bottleneck at %s', bottleneck_path)  # PATCH: was DEBUG\n",
        (0, 1),
    ),
]
# Comments and triple-quoted strings: what is left is the code that runs.
_NOT_CODE = re.compile(r"#.*|'''[\s\S]*?'''|\"\"\"[\s\S]*?\"\"\"")
_LEFT_BEHIND = re.compile(r"\bhub\.|\bimport tensorflow_hub\b|\btensorflow\.contrib\b")
_BOTTLENECK_AT_INFO = re.compile(r"\blogging\.info\('Creating bottleneck at ")


class PatchError(ValueError):
    """The file given is not a retrain.py these patches were written for."""


def apply_patch(source: str, patch: Patch, number: int, **values: object) -> str:
    """`source` with `patch` applied, its replacement formatted with `values`; PatchError,
    naming change `number`, if the pattern is found a number of times not in `patch.counts`."""
    pattern = re.compile(patch.pattern, re.MULTILINE)
    found = len(pattern.findall(source))
    if found not in patch.counts:
        expected = " or ".join(str(count) for count in patch.counts)
        raise PatchError(
            f"change {number} expects {expected} occurrence(s) of {patch.what}, found {found}"
        )
    replacement = patch.replacement.format(**values)
    return pattern.sub(lambda _: replacement, source)


def patch_retrain_py(source: str, frozen_graph: Path, image_size: tuple[int, int]) -> str:
    """retrain.py's source with PATCHES applied. PatchError names the first change that does
    not fit, or says what is left that cannot run here or could not be timed."""
    for number, patch in enumerate(PATCHES, 1):
        source = apply_patch(source, patch, number, graph=str(frozen_graph), size=image_size)
    code = _NOT_CODE.sub("", source)
    if _LEFT_BEHIND.search(code):
        raise PatchError("a use of tensorflow_hub or tensorflow.contrib is left after the changes")
    if not _BOTTLENECK_AT_INFO.search(code):
        raise PatchError("no 'Creating bottleneck' line logged at INFO to time extraction by")
    return source


def defined_flags(source: str) -> set[str]:
    """The flags that a retrain.py source defines (`parser.add_argument('--name', ...)`)."""
    return set(re.findall(r"add_argument\(\s*'--(\w+)'", source))


_ABSL_LINE = re.compile(r"^I(\d{4} \d\d:\d\d:\d\d\.\d+) .*?\] (.*)$")
_FINAL_TEST = re.compile(r"Final test accuracy = ([\d.]+)% \(N=(\d+)\)")


def parse_retrain_py_log(text: str) -> dict:
    """Extraction images/s (first to last "Creating bottleneck"), test accuracy and the
    number of test images from retrain.py's log (absl-format lines)."""
    created: list[datetime] = []
    accuracy = test_images = None
    for line in text.splitlines():
        match = _ABSL_LINE.match(line)
        if not match:
            continue
        stamp, message = match.groups()
        if message.startswith("Creating bottleneck at "):
            created.append(datetime.strptime(stamp, "%m%d %H:%M:%S.%f"))
        elif final := _FINAL_TEST.match(message):
            accuracy, test_images = float(final[1]) / 100, int(final[2])
    rate = None
    if len(created) > 1:
        # Each line is logged as a bottleneck starts: n lines bracket n - 1 computed ones.
        span = (created[-1] - created[0]).total_seconds()
        rate = (len(created) - 1) / span if span > 0 else None
    return {"bottlenecks_created": len(created), "extraction_images_per_second": rate,
            "test_accuracy": accuracy, "test_images": test_images}  # fmt: skip


def shared_image_dir(image_dir: str | os.PathLike) -> str:
    """The --image_dir string both programs get: `~` expanded (as a shell would), and a
    relative folder prefixed with the current one; the rest of its spelling (a trailing slash,
    say) is kept, since with `--split_hash path` it decides the split."""
    spelled = os.path.expanduser(os.fspath(image_dir))
    return spelled if os.path.isabs(spelled) else os.path.join(os.getcwd(), spelled)


def prepare_retrain_py(retrain_py: Path, work: Path) -> Path:
    """The patched copy of retrain.py in `work`, next to the frozen module it imports."""
    from retrain.models.loading import resolve_module

    module = resolve_module(MODULE)
    graph = work / "module.pb"
    # Read and patched before importing TensorFlow: a wrong file is refused at once.
    source = patch_retrain_py(retrain_py.read_text(encoding="utf-8"), graph, module.input_size)
    from retrain.export.writer import cached_frozen_module

    cached_frozen_module(graph, module.load, module.input_size)
    patched = work / "retrain_py" / "retrain.py"
    patched.parent.mkdir()
    patched.write_text(source, encoding="utf-8")
    return patched


def retrain_py_command(
    patched: Path,
    image_dir: str | os.PathLike,
    work: Path,
    extra: list[str],
    own_checkpoint: bool = False,
) -> list[str]:
    """A default retrain.py run on image_dir with every output under `work` (its checkpoint
    too if `own_checkpoint`: HEAD's --checkpoint_path). It runs in a folder of its own, so it
    gets `shared_image_dir(image_dir)`."""
    checkpoint = [f"--checkpoint_path={work / '_retrain_checkpoint'}"] if own_checkpoint else []
    return [
        sys.executable,
        str(patched),
        f"--image_dir={shared_image_dir(image_dir)}",
        f"--bottleneck_dir={work / 'bottlenecks'}",
        f"--summaries_dir={work / 'logs'}",
        f"--output_graph={work / 'graph.pb'}",
        f"--output_labels={work / 'labels.txt'}",
        f"--intermediate_output_graphs_dir={work / 'intermediate'}/",
        f"--tfhub_module={MODULE}",
        *checkpoint,
        *extra,
    ]


def run_retrain(image_dir: str, work: Path, name: str, extra: list[str]) -> dict:
    """retrain with an empty, then a filled cache in `work/name`."""
    folder = work / name
    folder.mkdir()
    # A str, not a Path: the spelling of image_dir is kept (benchmark only formats it).
    cmd = benchmark.retrain_command(image_dir, folder, MODULE, extra)
    runs = {}
    for cache in CACHES:
        runs[cache] = benchmark.timed_run(cmd, folder / f"{cache}.log")
        metrics = json.loads((folder / "metrics.json").read_text())
        for key in METRICS:
            runs[cache][key] = metrics.get(key)
        runs[cache]["test_images"] = metrics.get("images", {}).get("testing")
    return runs


def run_retrain_py(
    patched: Path,
    image_dir: str,
    work: Path,
    name: str,
    extra: list[str],
    own_checkpoint: bool = False,
) -> dict:
    """retrain.py with an empty, then a filled cache in `work/name` (see retrain_py_command)."""
    folder = work / name
    folder.mkdir()
    cmd = retrain_py_command(patched, image_dir, folder, extra, own_checkpoint)
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


def _every_run(runs: list[dict], key: str) -> list:
    return [run[cache][key] for run in runs for cache in CACHES]


def accuracy_comparison(ours: list[dict], theirs: list[dict], split_hash: str) -> dict:
    """Median test accuracy of each program over all its runs, and the test split sizes they
    reported. With split_hash "path" both tested on the same images, so the sizes must agree
    (`same_test_images`); with "basename" the splits differ and so may the sizes."""
    sizes = {
        "retrain": sorted(set(_every_run(ours, "test_images"))),
        "retrain_py": sorted(set(_every_run(theirs, "test_images"))),
    }
    return {
        "split_hash": split_hash,
        "retrain_test_accuracy_median": statistics.median(_every_run(ours, "test_accuracy")),
        "retrain_py_test_accuracy_median": statistics.median(_every_run(theirs, "test_accuracy")),
        "test_images": sizes,
        "same_test_images": len(sizes["retrain"]) == 1 and sizes["retrain"] == sizes["retrain_py"],
    }


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--retrain_py",
        type=Path,
        required=True,
        help="TF Hub's retrain.py (commit 0163eda, or the last one that has it)",
    )
    parser.add_argument(
        "--image_dir",
        default=str(benchmark.ROOT / "examples" / "flower_photos"),
        help="the images; both programs get this string (a relative one made absolute)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument(
        "--how_many_training_steps",
        type=int,
        help="passed to both, for a quick check (issue 7's figures use the default, 4,000)",
    )
    parser.add_argument(
        "--split_hash",
        choices=SPLIT_HASHES,
        default="basename",
        help="retrain's --split_hash: path splits as retrain.py does, so both programs train "
        "and test on the same images",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be positive, got {args.rounds}")
    if not os.path.isdir(os.path.expanduser(args.image_dir)):
        parser.error(f"--image_dir: {args.image_dir} is not a folder")
    return parser, args


def main() -> None:
    parser, args = parse_args()
    image_dir = shared_image_dir(args.image_dir)
    extra = []
    if args.how_many_training_steps is not None:
        extra = [f"--how_many_training_steps={args.how_many_training_steps}"]
    ours_extra = [*extra, f"--split_hash={args.split_hash}"]
    with tempfile.TemporaryDirectory(prefix="retrain-side-by-side-") as tmp:
        work = Path(tmp)
        try:
            patched = prepare_retrain_py(args.retrain_py, work)
        except (OSError, UnicodeDecodeError) as err:
            parser.error(f"--retrain_py: cannot read {args.retrain_py}: {err}")
        except PatchError as err:
            parser.error(f"--retrain_py: {args.retrain_py} is not TF Hub's retrain.py: {err}")
        own_checkpoint = "checkpoint_path" in defined_flags(patched.read_text(encoding="utf-8"))
        ours, theirs = [], []
        for round_ in range(args.rounds):
            order = ("retrain", "retrain_py") if round_ % 2 == 0 else ("retrain_py", "retrain")
            for who in order:
                name = f"{who}_{round_}"
                if who == "retrain":
                    runs = run_retrain(image_dir, work, name, ours_extra)
                    ours.append(runs)
                else:
                    runs = run_retrain_py(patched, image_dir, work, name, extra, own_checkpoint)
                    theirs.append(runs)
                print(json.dumps({name: runs}), file=sys.stderr, flush=True)
    report = {
        "cpu_count": os.cpu_count(),
        "image_dir": image_dir,
        "rounds": args.rounds,
        "retrain": ours,
        "retrain_py": theirs,
        **summary(ours, theirs),
        "accuracy": accuracy_comparison(ours, theirs, args.split_hash),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
