#!/usr/bin/env python3
"""Benchmarks for retrain, printing one JSON object.

    python scripts/benchmark.py --image_dir examples/flower_photos            # all suites
    python scripts/benchmark.py --suite training
    python scripts/benchmark.py --suite cache --cache_sizes 10000,100000,1000000
    python scripts/benchmark.py --suite run --generate 1000                   # 1k made-up JPEGs
    python scripts/benchmark.py --suite whole_run --image_dir PHOTOS          # phases, vs. raw
    python scripts/benchmark.py --suite audit --audit_sizes 10000,100000,1000000
    python scripts/benchmark.py --suite multilabel --multilabel_rows 800000

Suites:
  module      raw module images/s on decoded 224x224 batches, per extraction backend
  extraction  end-to-end bottleneck images/s from image files into an empty cache (--backends
              tensorflow, tflite, tflite_int8)
  training    4,000 default training steps on cached-size features (steps/s, seconds)
  run         whole `retrain` runs with an empty and with a filled cache: wall s, peak RSS
  cache       opening a bottleneck cache of N entries (seconds, RSS)
  scale       whole default runs over N cached images (N from --scale_sizes): wall s, peak RSS
  label_image label-image on an exported .tflite: one image from a cold start (s), and every
              image of --image_dir in batches (images/s) next to the raw model images/s
  audit       the audit of N cached photo-like vectors with planted near copies (N from
              --audit_sizes): wall s, peak RSS, the audit's seconds and counts, copies found
  multilabel  a labels CSV of --multilabel_rows rows and 19 labels on synthetic cached vectors
              (no image files; scripts/bench_multilabel.py): scan, lookup, training,
              evaluation and report seconds, peak RSS, the shifted labels found
  distortions distorting decoded batches + the module next to the module alone (images/s);
              seconds per 100 training images undistorted, with cached copies (computing and
              reusing them) and on the fly
  int8        the module's images/s with tensorflow, tflite (float) and tflite_int8 on the same
              decoded images (all cores, one thread, and without XNNPACK), how close the int8
              features are to the float ones, and the test accuracy of default runs on float vs
              int8 features (same split and training; --int8_bottleneck_dir reuses a filled
              cache; --int8_seeds: a run per seed)
  fine_tuning whole runs fine-tuning the whole network and from each cut of --fine_tune_cuts
              (a first run filling the cut's cache, a second reusing it): steps/s, wall s,
              peak RSS, test accuracy before and after, and the cut's speedup
  export      per exported format and --quantizations: file size (MB), the run's own check
              (accuracy, agreement with the float model), label-image's cold start for one
              image (s), its images/s over a folder and its accuracy there (--eval_dir, a folder
              of class folders; default: the run's test split)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules below

from bench_measure import (  # noqa: E402
    ROOT,
    _images_in,
    _rate,
    _sample_batch,
    _size_mb,
    generate_images,
    retrain_command,
    timed_run,
)
from bench_model import (  # noqa: E402
    suite_distortions,
    suite_extraction,
    suite_int8,
    suite_module,
    suite_whole_run,
)
from bench_multilabel import suite_multilabel  # noqa: E402


def suite_training(args) -> dict:
    from retrain.bottlenecks.splits import Split
    from retrain.config import HeadTrainingConfig
    from retrain.heads.head import SoftmaxHead
    from retrain.training.head import train_head

    rng = np.random.default_rng(0)
    n, dim, classes = args.train_rows, 1280, 5
    y = rng.integers(0, classes, n)
    x = np.abs(rng.normal(size=(classes, dim))[y] + rng.normal(size=(n, dim))).astype(np.float32)
    validation = Split(x[: n // 10], y[: n // 10])
    with tempfile.TemporaryDirectory() as tmp:
        from retrain.training.head import Summaries

        summaries = Summaries(tmp)
        start = time.perf_counter()
        result = train_head(
            Split(x, y), validation, SoftmaxHead(classes), HeadTrainingConfig(), summaries
        )
        wall = time.perf_counter() - start
        summaries.close()
    return {
        "rows": n,
        "steps": 4000,
        "seconds": round(wall, 2),
        "steps_per_second": round(4000 / wall, 1),
        "final_train_accuracy": result.history[-1]["train_accuracy"],
    }


def suite_run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmd = retrain_command(args.image_dir, tmp, args.tfhub_module, args.retrain_flag)
        empty = timed_run(cmd)
        empty_metrics = json.loads((tmp / "metrics.json").read_text())
        filled = timed_run(cmd)
        filled_metrics = json.loads((tmp / "metrics.json").read_text())
    keys = (
        "test_accuracy",
        "bottleneck_images_per_second",
        "bottleneck_seconds",
        "training_seconds",
        "images",
    )
    return {
        "empty_cache": {**empty, **{k: empty_metrics.get(k) for k in keys}},
        "filled_cache": {**filled, **{k: filled_metrics.get(k) for k in keys}},
    }


def suite_cache(args) -> dict:
    from retrain.bottlenecks.cache import DEFAULT_SHARD_ROWS, BottleneckCache

    out = {}
    dim = 1280
    for n in (int(s) for s in args.cache_sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            cache = BottleneckCache(tmp, "bench", dim)
            rng = np.random.default_rng(0)
            block = rng.normal(size=(DEFAULT_SHARD_ROWS, dim)).astype(np.float32)
            start = time.perf_counter()
            with cache.writer() as writer:
                for i in range(n):
                    writer.add(
                        i.to_bytes(16, "little"),
                        (i + n).to_bytes(16, "little"),
                        block[i % len(block)],
                    )
            write_s = time.perf_counter() - start
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.perf_counter()
            reopened = BottleneckCache(tmp, "bench", dim)
            open_s = time.perf_counter() - start
            files = len(os.listdir(Path(tmp) / "bench"))
            out[str(n)] = {
                "write_seconds": round(write_s, 2),
                "open_and_list_seconds": round(open_s, 2),
                "entries": len(reopened),
                "files_in_folder": files,
                "rss_growth_mb": round(
                    (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1
                ),
            }
    return out


def _fake_cached_images(root: Path, count: int, module, classes: int = 5) -> Path:
    """`count` tiny files whose bottlenecks are already in a cache under root/bottlenecks.

    The files are never decoded (their vectors are cached), so this measures everything but
    extraction at sizes that would take days to extract on this machine.
    """
    from retrain.bottlenecks.cache import BottleneckCache, content_key, file_key, module_cache_key
    from retrain.data.preprocess import PREPROCESSING_ID

    cache = BottleneckCache(
        root / "bottlenecks",
        module_cache_key(module.fingerprint, PREPROCESSING_ID),
        module.feature_dim,
    )
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, module.feature_dim)).astype(np.float32)
    with cache.writer() as writer:
        for i in range(count):
            label = i % classes
            path = root / "images" / f"class{label}" / f"img{i:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = i.to_bytes(8, "little")
            path.write_bytes(data)
            vector = np.abs(centres[label] + rng.normal(size=module.feature_dim) * 2)
            writer.add(content_key(data), file_key(path), vector.astype(np.float32))
    return root / "images"


def _clustered_vectors(
    dim: int, classes: int, near_copy_every: int, clusters: int = 20, rank: int = 64
) -> Iterator[np.ndarray]:
    """Photo-like vectors of image i = 0, 1, ...: its class's centre (i % classes), one of
    `clusters` sub-centres of that class, variation along `rank` directions of decaying
    spread (image features vary along few directions) and a little noise in all; image i
    with i % near_copy_every == near_copy_every - 1 is a near copy of image i - 1 (cosine
    similarity about 0.98, filed under another class)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim))
    sub = rng.normal(size=(classes, clusters, dim))
    directions = rng.normal(size=(rank, dim)) / np.sqrt(np.arange(1, rank + 1))[:, None]
    previous = np.zeros(dim)
    for i in itertools.count():
        if i % near_copy_every == near_copy_every - 1:
            vector = previous + rng.normal(size=dim) * 0.5
        else:
            label = i % classes
            vector = np.abs(centres[label] + sub[label, rng.integers(clusters)])
            vector += rng.normal(size=rank) @ directions + rng.normal(size=dim) * 0.2
        previous = vector
        yield vector.astype(np.float32)


def _planted_pairs_found(duplicates_csv: Path, near_copy_every: int) -> int:
    """Rows of the audit's duplicates.csv that pair a near copy with its original."""
    found = 0
    with open(duplicates_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            a, b = sorted(int(Path(row[k]).stem[3:]) for k in ("path_a", "path_b"))
            found += b == a + 1 and b % near_copy_every == near_copy_every - 1
    return found


_AUDIT_DIM, _AUDIT_CLASSES, _NEAR_COPY_EVERY = 1280, 5, 100


def _synthetic_cache(folder: Path, count: int) -> None:
    """A bottleneck cache in `folder` of `count` `_clustered_vectors`, written through the
    cache API (image i's keys are i)."""
    from retrain.bottlenecks.cache import BottleneckCache

    cache = BottleneckCache(folder, "synthetic", _AUDIT_DIM)
    vectors = _clustered_vectors(_AUDIT_DIM, _AUDIT_CLASSES, _NEAR_COPY_EVERY)
    with cache.writer() as writer:
        for i, vector in zip(range(count), vectors):
            key = i.to_bytes(16, "little")
            writer.add(key, key, vector)


def audit_synthetic_cache(folder: Path) -> None:
    """The audit (`audit.audit_bottlenecks`, default settings) of the cache `_synthetic_cache`
    wrote in `folder`, image i named img{i}.png in class{i % 5}, 80/10/10 random splits; its
    metrics go to folder/metrics.json and its CSVs to folder/audit."""
    from retrain.bottlenecks.cache import BottleneckCache, key_array
    from retrain.bottlenecks.stage import Bottlenecks
    from retrain.config import AuditConfig, HeadTrainingConfig
    from retrain.data import scan
    from retrain.reporting.audit import audit_bottlenecks

    cache = BottleneckCache(folder, "synthetic", _AUDIT_DIM)
    n = len(cache)
    locations = cache.locate(key_array([i.to_bytes(16, "little") for i in range(n)]))
    cache.release_index()
    splits = np.random.default_rng(0).choice(3, n, p=[0.8, 0.1, 0.1]).astype(np.int8)
    b = Bottlenecks(
        cache=cache,
        locations=locations,
        labels=np.arange(n) % _AUDIT_CLASSES,
        split_codes=splits,
        paths=scan.PathList(f"img{i:07d}.png" for i in range(n)),
        skipped=[],
        computed=0,
        seconds=0.0,
    )
    labels = [f"class{c}" for c in range(_AUDIT_CLASSES)]
    settings = AuditConfig(output_dir=str(folder / "audit"))
    report = audit_bottlenecks(b, labels, settings, HeadTrainingConfig())
    (folder / "metrics.json").write_text(json.dumps(report.metrics()))


def suite_audit(args) -> dict:
    """The audit of N cached photo-like vectors (N from --audit_sizes; every 100th a near
    copy of the one before, in another class), in a process of its own: wall seconds, peak
    RSS, the audit's own seconds, its counts, and how many of the near copies it found."""
    out = {}
    for n in (int(s) for s in args.audit_sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            start = time.perf_counter()
            _synthetic_cache(tmp, n)
            made = time.perf_counter() - start
            run = timed_run([sys.executable, __file__, f"--audit_synthetic_cache={tmp}"])
            metrics = json.loads((tmp / "metrics.json").read_text())
            found = _planted_pairs_found(tmp / "audit" / "duplicates.csv", _NEAR_COPY_EVERY)
            out[str(n)] = {
                **run,
                "setup_seconds": round(made, 1),
                "audit_seconds": metrics["seconds"],
                **{k: metrics[k] for k in ("suspect_labels", "duplicates", "outliers")},
                "near_copies_planted": n // _NEAR_COPY_EVERY,
                "near_copies_found": found,
            }
    return out


def suite_scale(args) -> dict:
    """Whole default runs with a filled cache of N entries: wall seconds and peak RSS."""
    from retrain.models.loading import resolve_module

    module = resolve_module(args.tfhub_module)
    out = {}
    for n in (int(s) for s in args.scale_sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            start = time.perf_counter()
            images = _fake_cached_images(tmp, n, module)
            made = time.perf_counter() - start
            run = timed_run(retrain_command(images, tmp, args.tfhub_module, args.retrain_flag))
            metrics = json.loads((tmp / "metrics.json").read_text())
            out[str(n)] = {
                **run,
                "setup_seconds": round(made, 1),
                "training_seconds": metrics["training_seconds"],
                "bottlenecks_computed": metrics["bottlenecks_computed"],
                "test_accuracy": metrics["test_accuracy"],
            }
    return out


def suite_label_image(args) -> dict:
    from retrain.export.loading import TFLiteClassifier

    label_image = shutil.which("label-image") or str(Path(sys.executable).with_name("label-image"))
    images = _images_in(args.image_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "classifier.tflite"
        cmd = retrain_command(args.image_dir, tmp, args.tfhub_module, args.retrain_flag)
        subprocess.run(
            [*cmd, f"--output_tflite={model}", "--how_many_training_steps=100"],
            check=True,
            capture_output=True,
        )
        base = [label_image, f"--graph={model}", f"--labels={tmp / 'labels.txt'}"]
        one = min(timed_run([*base, images[0]])["seconds"] for _ in range(3))
        batch = timed_run([*base, *images])
        classifier = TFLiteClassifier(model)
        raw = _rate(classifier.predict, _sample_batch(args.image_dir, (224, 224)))
    per_second = len(images) / max(batch["seconds"] - one, 1e-9)  # start-up counted once
    return {
        "cold_start_one_image_seconds": round(one, 2),
        "batch_images": len(images),
        "batch_seconds": batch["seconds"],
        "batch_images_per_second": round(per_second, 1),
        "raw_model_images_per_second": round(raw, 1),
        "batch_fraction_of_raw": round(per_second / raw, 3),
    }


def _test_split_folder(manifest: Path, skipped: set[str], folder: Path) -> Path:
    """A folder of class folders linking to the test images of a run's split manifest."""
    import csv

    with open(manifest, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "testing" and row["path"] not in skipped:
                link = folder / row["label"] / Path(row["path"]).name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(Path(row["path"]).resolve())
    return folder


def _label_image_figures(label_image: list[str], eval_dir: Path, one_image: str) -> dict:
    """label-image on one model: cold start for one image, then every image of `eval_dir`
    (class folders) in one call: images/s (start-up counted once) and top-1 accuracy."""
    cold = min(timed_run([*label_image, one_image])["seconds"] for _ in range(2))
    start = time.perf_counter()
    done = subprocess.run(
        [*label_image, "--json", "--top_k=1", str(eval_dir)], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    right = [Path(r["file"]).parent.name == r["labels"][0] for r in rows if "labels" in r]
    return {
        "cold_start_one_image_seconds": round(cold, 2),
        "images": len(right),
        "images_per_second": round(len(right) / max(seconds - cold, 1e-9), 1),
        "accuracy": round(float(np.mean(right)), 4) if right else None,
    }


def suite_export(args) -> dict:
    label_image = shutil.which("label-image") or str(Path(sys.executable).with_name("label-image"))
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        eval_dir = args.eval_dir
        for quantization in args.quantizations.split(","):
            work = tmp / quantization
            models = {f"tflite_{quantization}": work / "model.tflite"}
            extra = [
                f"--output_tflite={models[f'tflite_{quantization}']}",
                f"--quantize={quantization}",
                f"--split_manifest={work / 'manifest.csv'}",
            ]
            if quantization == "none":
                models["frozen_graph"] = work / "graph.pb"
                models["saved_model"] = work / "saved_model"
                extra.append(f"--saved_model_dir={models['saved_model']}")
            cmd = retrain_command(args.image_dir, work, args.tfhub_module, args.retrain_flag)
            run = timed_run([*cmd, *extra])
            metrics = json.loads((work / "metrics.json").read_text())
            if eval_dir is None:
                skipped = {entry["file"] for entry in metrics["skipped"]}
                eval_dir = _test_split_folder(work / "manifest.csv", skipped, tmp / "test_split")
            one_image = str(next(p for p in sorted(eval_dir.rglob("*")) if p.is_file()))
            checks = {c["format"]: c for c in metrics.get("export_checks", [])}
            for name, path in models.items():
                base = [label_image, f"--graph={path}", f"--labels={work / 'labels.txt'}"]
                check = checks.get("tflite" if name.startswith("tflite") else name, {})
                out[name] = {
                    "size_mb": _size_mb(path),
                    "retrain_run_seconds": run["seconds"],
                    "check": {k: check.get(k) for k in ("images", "accuracy", "agreement")},
                    "test_accuracy_float": metrics["test_accuracy"],
                    **_label_image_figures(base, eval_dir, one_image),
                }
    return out


def suite_fine_tuning(args) -> dict:
    """Whole `retrain` runs fine-tuning --fine_tune_bench_steps steps of 32: the whole network
    (images decoded at every step) and from each cut of --fine_tune_cuts (cached activations;
    a first run fills the cut's cache, a second reuses it). Steps/s as the run measured them
    (without the first step and validation), wall s and peak RSS of each run."""
    base = [
        f"--fine_tune_steps={args.fine_tune_bench_steps}",
        "--fine_tune_patience=0",
        f"--eval_step_interval={args.fine_tune_bench_steps}",
    ]
    modes = [("whole", [])] + [
        (cut, [f"--fine_tune_from={cut}"]) for cut in args.fine_tune_cuts.split(",") if cut
    ]
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmd = retrain_command(args.image_dir, tmp, args.tfhub_module, base)
        timed_run(cmd)  # fills the bottleneck cache: every mode below finds it filled
        for name, extra in modes:
            runs = ("empty_cut_cache", "filled_cut_cache") if extra else ("run",)
            for run in runs:
                figures = timed_run(cmd + extra)
                tuned = json.loads((tmp / "metrics.json").read_text())["fine_tune"]
                report.setdefault(name, {})[run] = {
                    **figures,
                    "steps_per_second": tuned["steps_per_second"],
                    "fine_tuning_seconds": tuned["seconds"],
                    "test_accuracy_before": tuned["test_accuracy_before"],
                    "test_accuracy_after": tuned["test_accuracy_after"],
                    "cut": tuned["cut"],
                }
    whole = report["whole"]["run"]["steps_per_second"]
    for name, _ in modes[1:]:
        rate = report[name]["filled_cut_cache"]["steps_per_second"]
        report[name]["speedup_over_whole"] = round(rate / whole, 2) if whole else None
    return report


SUITES = {
    "module": suite_module,
    "extraction": suite_extraction,
    "training": suite_training,
    "run": suite_run,
    "cache": suite_cache,
    "scale": suite_scale,
    "label_image": suite_label_image,
    "distortions": suite_distortions,
    "int8": suite_int8,
    "export": suite_export,
    "audit": suite_audit,
    "fine_tuning": suite_fine_tuning,
    "whole_run": suite_whole_run,
    "multilabel": suite_multilabel,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--suite", default="all", help="all or a comma list of: " + ", ".join(SUITES)
    )
    parser.add_argument("--image_dir", type=Path, default=ROOT / "examples" / "flower_photos")
    parser.add_argument(
        "--generate",
        type=int,
        default=0,
        help="benchmark on this many generated JPEGs instead of --image_dir",
    )
    parser.add_argument(
        "--generate_size",
        default="500x333",
        help="WIDTHxHEIGHT of generated images (flower_photos' typical size)",
    )
    parser.add_argument("--tfhub_module", default="efficientnet_lite0")
    parser.add_argument("--backends", default="tensorflow,tflite")
    parser.add_argument("--train_rows", type=int, default=2936)
    parser.add_argument("--cache_sizes", default="10000,100000")
    parser.add_argument("--scale_sizes", default="10000,100000")
    parser.add_argument("--audit_sizes", default="10000")
    parser.add_argument("--audit_synthetic_cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--multilabel_rows", type=int, default=800_000)
    parser.add_argument("--distorted_copies", type=int, default=5)
    parser.add_argument("--distortion_steps", type=int, default=1000)
    parser.add_argument("--on_the_fly_steps", type=int, default=50)
    parser.add_argument("--quantizations", default="none,dynamic,float16,int8")
    parser.add_argument("--fine_tune_bench_steps", type=int, default=30)
    parser.add_argument("--fine_tune_cuts", default="block12")
    parser.add_argument(
        "--eval_dir",
        type=Path,
        default=None,
        help="export suite: class folders to measure accuracy on (default: the test split)",
    )
    parser.add_argument(
        "--int8_bottleneck_dir",
        type=Path,
        default=None,
        help="int8 suite: a bottleneck folder to reuse (float and int8 vectors live apart)",
    )
    parser.add_argument(
        "--int8_seeds", default="0,1,2", help="int8 suite: a run per seed (empty: none)"
    )
    parser.add_argument(
        "--retrain_flag",
        action="append",
        default=[],
        help="extra flag for the `run` suite, e.g. --retrain_flag=--extraction_backend=tflite",
    )
    args = parser.parse_args()
    if args.audit_synthetic_cache:  # the measured process of the audit suite
        audit_synthetic_cache(args.audit_synthetic_cache)
        return
    suites = list(SUITES) if args.suite == "all" else args.suite.split(",")
    generated = None
    if args.generate:
        generated = Path(tempfile.mkdtemp(prefix="retrain-bench-"))
        width, height = (int(v) for v in args.generate_size.split("x"))
        args.image_dir = generate_images(generated / "images", args.generate, size=(width, height))
    report = {"cpu_count": os.cpu_count(), "image_dir": str(args.image_dir)}
    try:
        for name in suites:
            report[name] = SUITES[name](args)
            print(json.dumps({name: report[name]}), file=sys.stderr)
    finally:
        if generated:
            shutil.rmtree(generated, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
