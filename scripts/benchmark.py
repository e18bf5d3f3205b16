#!/usr/bin/env python3
"""Benchmarks for retrain, printing one JSON object.

    python scripts/benchmark.py --image_dir examples/flower_photos            # all suites
    python scripts/benchmark.py --suite training
    python scripts/benchmark.py --suite cache --cache_sizes 10000,100000,1000000
    python scripts/benchmark.py --suite run --generate 1000                   # 1k made-up JPEGs
    python scripts/benchmark.py --suite audit --audit_sizes 10000,100000,1000000

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
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def generate_images(folder: Path, count: int, classes: int = 5, size=(320, 240)) -> Path:
    """Write `count` JPEG photos-like images (noise over colour gradients) in `classes` folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None]
    for i in range(count):
        label = i % classes
        base = np.array([(label * 50) % 255, (label * 90) % 255, (label * 130) % 255])
        pixels = base * ramp + rng.normal(0, 40, (h, w, 3))
        folder.joinpath(f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / f"class{label}" / f"img{i:07d}.jpg", quality=85
        )
    return folder


def _images_in(image_dir: Path) -> list[str]:
    return sorted(
        str(p) for p in image_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )


def _sample_batch(image_dir: Path, size: tuple[int, int], n: int = 32) -> np.ndarray:
    from retrain.data.decode import decode_image
    from retrain.data.preprocess import to_module_input

    files = _images_in(image_dir)
    files = (files * (n // max(len(files), 1) + 1))[:n]
    return np.stack([to_module_input(decode_image(p, size), size).numpy() for p in files])


def _rate(fn, batch: np.ndarray, repeats: int = 5) -> float:
    fn(batch)  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(batch)
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def suite_module(args) -> dict:
    from retrain.bottlenecks import backends
    from retrain.models.loading import resolve_module

    module = resolve_module(args.tfhub_module)
    module_object = module.load()
    batch = _sample_batch(args.image_dir, module.input_size)
    result = {"batch": len(batch)}
    result["tensorflow_images_per_second"] = round(
        _rate(backends.tensorflow_backend(module_object), batch), 1
    )
    try:
        path = backends.convert_to_tflite(module)
        extractor = backends.tflite_backend(path)
        result["tflite_images_per_second"] = round(_rate(extractor, batch), 1)
    except Exception as err:  # noqa: BLE001 - report, do not fail the suite
        result["tflite_error"] = str(err)
    return result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_ms_per_image(fn, images: int) -> float:
    """CPU time (all threads) that fn() spends per image, in milliseconds."""
    start = _cpu_seconds()
    fn()
    return 1000 * (_cpu_seconds() - start) / images


def suite_extraction(args) -> dict:
    """End-to-end extraction next to the raw backend, and the ceiling that decoding on the same
    cores leaves: inference CPU / (inference CPU + decode-and-resize CPU) of the raw rate."""
    from retrain.bottlenecks import backends, extract
    from retrain.bottlenecks.cache import BottleneckCache
    from retrain.data.scan import scan_image_dir
    from retrain.models.loading import resolve_module

    module = resolve_module(args.tfhub_module)
    module_object = module.load()
    files = list(scan_image_dir(args.image_dir, 10, 10).paths)
    batch = _sample_batch(args.image_dir, module.input_size)
    decode_ms = _cpu_ms_per_image(
        lambda: sum(1 for _ in extract.decoded_batches(files, module.input_size, 32, {})),
        len(files),
    )
    result = {"images": len(files), "decode_and_resize_cpu_ms_per_image": round(decode_ms, 2)}
    for name in args.backends.split(","):
        if name == "tensorflow":
            extractor = backends.tensorflow_backend(module_object)
        elif name == backends.INT8:
            extractor = backends.tflite_backend(_int8_model(module, module_object, args.image_dir))
        else:
            extractor = backends.tflite_backend(backends.convert_to_tflite(module))
        raw = _rate(extractor, batch)
        inference_ms = _cpu_ms_per_image(
            lambda run=extractor: [run(batch) for _ in range(3)], 3 * len(batch)
        )
        ceiling = inference_ms / (inference_ms + decode_ms)
        with tempfile.TemporaryDirectory() as tmp:
            cache = BottleneckCache(tmp, "bench", module.feature_dim)
            found = extract.lookup(files, cache)
            stats = extract.extract_missing(
                files, found, cache, extractor, extract.DecodedBatches(module.input_size, 32)
            )
        fraction = stats.images_per_second / raw
        result[name] = {
            "raw_images_per_second": round(raw, 1),
            "inference_cpu_ms_per_image": round(inference_ms, 2),
            "end_to_end_images_per_second": round(stats.images_per_second, 1),
            "end_to_end_fraction_of_raw": round(fraction, 3),
            "ceiling_fraction_of_raw": round(ceiling, 3),
            "end_to_end_fraction_of_ceiling": round(fraction / ceiling, 3),
        }
    return result


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


def suite_distortions(args) -> dict:
    """Distortion's costs: the module's raw batched rate next to distorting decoded batches and
    running the module on them; then whole library runs on --image_dir (steps of 100 images):
    seconds per 100 training images undistorted, with cached copies (the run that computes them
    and one that reuses them) and distorted on the fly."""
    import tensorflow as tf

    import retrain
    from retrain.bottlenecks import backends, distort
    from retrain.config import DistortionConfig
    from retrain.models.loading import resolve_module

    settings = DistortionConfig(True, 10, 10, 10, copies=args.distorted_copies)
    module = resolve_module(args.tfhub_module)
    extractor = backends.tflite_backend(backends.convert_to_tflite(module))
    batch = _sample_batch(args.image_dir, distort.source_size(settings, module.input_size))
    params = tf.constant(distort.distortion_params(range(len(batch))))
    source = tf.constant(batch)
    raw = _rate(extractor, _sample_batch(args.image_dir, module.input_size))
    distorted = _rate(
        lambda images: extractor(
            distort.distort_batch(images, params, settings, module.input_size)
        ),
        source,
    )
    result = {
        "raw_images_per_second": round(raw, 1),
        "distorted_decoded_images_per_second": round(distorted, 1),
        "distorted_fraction_of_raw": round(distorted / raw, 3),
    }
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "cached_undistorted": (DistortionConfig(), args.distortion_steps),
            "cached_copies_first_run": (settings, args.distortion_steps),
            "cached_copies_reuse": (settings, args.distortion_steps),
            "on_the_fly": (DistortionConfig(True, 10, 10, 10), args.on_the_fly_steps),
        }
        per_100 = {}
        for name, (distortions, steps) in runs.items():
            config = retrain.RetrainConfig(
                image_dir=str(args.image_dir),
                module=retrain.ModuleConfig(handle=args.tfhub_module),
                cache=retrain.CacheConfig(bottleneck_dir=tmp),
                training=retrain.HeadTrainingConfig(how_many_training_steps=steps),
                distortions=distortions,
            )
            if name == "cached_undistorted":
                retrain.run(config)  # fill the cache: only training is timed
            run = retrain.run(config)
            copies = (run.distortions or {}).get("seconds", 0.0) if distortions.copies else 0.0
            seconds = run.timings.training + copies
            per_100[name] = {
                "seconds": round(seconds, 2),
                "seconds_per_100_training_images": round(seconds / steps, 4),
                "test_accuracy": run.test.accuracy if run.test else None,
                "distortions": run.distortions,
            }
    result["runs"] = per_100
    return result


# Linux carries a process's peak RSS over exec(), so a command started by this process (often
# large: TensorFlow and a model loaded by an earlier suite) would report at least our RSS. This
# small Python process starts the command instead, times it and prints its figures on stdout.
_MEASURE = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout carries the figures alone
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    except OSError as err:
        print(f"{sys.argv[1]}: {err.strerror}", file=sys.stderr, flush=True)
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def timed_run(cmd: list[str], log: Path | None = None, cwd: Path | None = None) -> dict:
    """Run `cmd`, its stderr to `log` (else kept only for an error): wall seconds and its own
    peak RSS (wait4, from a small parent). Raises RuntimeError, with the end of stderr, if it
    fails."""
    with open(log, "w+") if log else tempfile.TemporaryFile("w+") as err:
        measure = [sys.executable, "-c", _MEASURE, *cmd]
        helper = subprocess.run(measure, stdout=subprocess.PIPE, stderr=err, cwd=cwd, text=True)
        wall, peak_kb, returncode = helper.stdout.split() or (0, 0, helper.returncode)
        if int(returncode) != 0:
            err.seek(0)
            tail = err.read()[-2000:]
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({returncode}):\n{tail}")
    return {"seconds": round(float(wall), 2), "peak_rss_mb": round(int(peak_kb) / 1024, 1)}


def retrain_command(
    image_dir: Path, work: Path, module: str, extra: Sequence[str] = ()
) -> list[str]:
    """A default `retrain` run of `module` on image_dir with every output under `work`, plus
    the flags `extra`."""
    retrain = shutil.which("retrain") or str(Path(sys.executable).with_name("retrain"))
    return [
        retrain,
        f"--image_dir={image_dir}",
        f"--bottleneck_dir={work / 'bottlenecks'}",
        f"--summaries_dir={work / 'logs'}",
        f"--output_graph={work / 'graph.pb'}",
        f"--output_labels={work / 'labels.txt'}",
        f"--metrics_json={work / 'metrics.json'}",
        f"--tfhub_module={module}",
        *extra,
    ]


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


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 2)


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


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _interleaved_rates(extractors: dict, batch: np.ndarray, rounds: int = 7) -> dict:
    """Images/s of each extractor on `batch`, the best of `rounds` rounds that time each of them
    in turn, so that a busy spell on a shared machine does not fall on one of them only."""
    best = dict.fromkeys(extractors, float("inf"))
    for run in extractors.values():
        run(batch)  # warm up
    for _ in range(rounds):
        for name, run in extractors.items():
            start = time.perf_counter()
            run(batch)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(batch) / seconds for name, seconds in best.items()}


def _without_xnnpack(path: Path, batch: np.ndarray):
    """A LiteRT run of the model at `path` on `batch`'s shape with the builtin kernels only (no
    XNNPACK delegate), every core: what the model costs if XNNPACK does not run it."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=str(path),
        num_threads=os.cpu_count(),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(batch.shape))
    interpreter.allocate_tensors()

    def run(images: np.ndarray) -> None:
        interpreter.set_tensor(index, images)
        interpreter.invoke()

    return run


def _int8_model(module, module_object, image_dir: Path) -> Path:
    """The module's int8 conversion calibrated as `retrain` calibrates it on `image_dir` with
    the default split (made now if not cached)."""
    from retrain.bottlenecks import backends
    from retrain.bottlenecks.stage import int8_calibration
    from retrain.config import DEFAULT_MAX_IMAGE_PIXELS, ModuleConfig
    from retrain.data.scan import scan_image_dir

    image_set = scan_image_dir(image_dir, 10, 10)  # retrain's default split
    settings = ModuleConfig(extraction_backend=backends.INT8)
    calibration = int8_calibration(image_set, settings, DEFAULT_MAX_IMAGE_PIXELS)
    return backends.convert_to_int8(module, calibration, None, module_object)


def suite_int8(args) -> dict:
    """int8 extraction next to float: the raw module rate of each backend on one batch of the
    image folder's photos, then a default run per TFLite backend on the folder (its test
    accuracy, and for int8 that of the exported float graph, which runs the float module)."""
    from retrain.bottlenecks import backends
    from retrain.models.loading import resolve_module

    module = resolve_module(args.tfhub_module)
    module_object = module.load()
    start = time.perf_counter()
    paths = {
        "tflite": backends.convert_to_tflite(module, None, module_object),
        "tflite_int8": _int8_model(module, module_object, args.image_dir),
    }
    conversions = time.perf_counter() - start  # about 0 when both are cached
    batch = _sample_batch(args.image_dir, module.input_size)
    every_core = {name: backends.tflite_backend(path) for name, path in paths.items()}
    rates = _interleaved_rates(
        {"tensorflow": backends.tensorflow_backend(module_object), **every_core}, batch
    )
    single = {name: backends.tflite_backend(path, num_threads=1) for name, path in paths.items()}
    one_thread = _interleaved_rates(single, batch)
    # CPU time, unlike wall time, hardly counts what other processes on the machine take.
    cpu_ms = {
        name: _cpu_ms_per_image(lambda run=run: [run(batch) for _ in range(3)], 3 * len(batch))
        for name, run in single.items()
    }
    builtin = _interleaved_rates(
        {name: _without_xnnpack(path, batch) for name, path in paths.items()}, batch, rounds=2
    )
    cosines = _cosines(every_core["tflite_int8"](batch), every_core["tflite"](batch))
    result = {
        "batch": len(batch),
        "conversions_seconds": round(conversions, 1),
        "images_per_second": {k: round(v, 1) for k, v in rates.items()},
        "int8_over_tflite": round(rates["tflite_int8"] / rates["tflite"], 2),
        "one_thread_images_per_second": {k: round(v, 1) for k, v in one_thread.items()},
        "one_thread_int8_over_tflite": round(one_thread["tflite_int8"] / one_thread["tflite"], 2),
        "one_thread_cpu_ms_per_image": {k: round(v, 2) for k, v in cpu_ms.items()},
        "cpu_ms_float_over_int8": round(cpu_ms["tflite"] / cpu_ms["tflite_int8"], 2),
        "without_xnnpack_images_per_second": {k: round(v, 1) for k, v in builtin.items()},
        "feature_cosine_to_float": {
            "min": round(float(cosines.min()), 4),
            "median": round(float(np.median(cosines)), 4),
        },
    }
    if args.int8_seeds:  # empty: speed only
        result["runs"] = _runs_per_backend(args, ("tflite", "tflite_int8"))
        accuracy = {name: run["mean_test_accuracy"] for name, run in result["runs"].items()}
        lost = accuracy["tflite"] - accuracy["tflite_int8"]
        result["accuracy_lost_points"] = round(100 * lost, 2)
    return result


def _runs_per_backend(args, names: Sequence[str]) -> dict:
    """Default runs per extraction backend in `names` on args.image_dir, one per seed of
    --int8_seeds (same split; the seed moves initialisation and batches): wall s, test
    accuracies and their mean, bottleneck phase s (with the conversion) and extraction images/s
    of the first run (None with a filled cache), the exported graph's checked accuracies."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            figures: dict = {"test_accuracy": [], "exported_graph_accuracy": []}
            for seed in (int(s) for s in args.int8_seeds.split(",")):
                work = Path(tmp) / f"{name}-{seed}"
                extra = [f"--extraction_backend={name}", f"--random_seed={seed}"]
                if args.int8_bottleneck_dir:
                    extra.append(f"--bottleneck_dir={args.int8_bottleneck_dir}")
                command = retrain_command(args.image_dir, work, args.tfhub_module, extra)
                run = timed_run([*command, *args.retrain_flag])
                metrics = json.loads((work / "metrics.json").read_text())
                checks = {c["format"]: c for c in metrics.get("export_checks", [])}
                figures["test_accuracy"].append(round(metrics["test_accuracy"], 4))
                graph = checks.get("frozen_graph", {}).get("accuracy")
                figures["exported_graph_accuracy"].append(graph and round(graph, 4))
                for key in ("bottleneck_seconds", "extraction_images_per_second"):
                    figures.setdefault(key, metrics.get(key))
                figures.setdefault("seconds", run["seconds"])
            figures["mean_test_accuracy"] = round(float(np.mean(figures["test_accuracy"])), 4)
            out[name] = figures
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
