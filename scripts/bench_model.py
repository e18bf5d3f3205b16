"""The benchmark suites of the module itself (scripts/benchmark.py): raw images/s per
extraction backend, end-to-end extraction, distortions next to the module, and int8 against
float."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from bench_measure import (
    _cpu_ms_per_image,
    _rate,
    _sample_batch,
    retrain_command,
    timed_run,
)


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


def suite_whole_run(args) -> dict:
    """The default command from an empty cache, then with the cache filled: wall seconds, peak
    RSS and every phase (the metrics' phase_seconds), against the module's raw TFLite rate
    measured in this process right after: `wall_over_raw` is wall / (images / raw rate), 1.0
    being a run that costs nothing but the module."""
    from retrain.bottlenecks import backends
    from retrain.models.loading import resolve_module

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cmd = retrain_command(args.image_dir, work, args.tfhub_module, args.retrain_flag)
        for cache in ("empty_cache", "filled_cache"):
            measured = timed_run(cmd)
            metrics = json.loads((work / "metrics.json").read_text())
            result[cache] = {
                **measured,
                "images": sum(metrics["images"].values()),
                "bottlenecks_computed": metrics["bottlenecks_computed"],
                "wall_seconds_by_itself": metrics["wall_seconds"],
                "phase_seconds": metrics["phase_seconds"],
                "test_accuracy": metrics["test_accuracy"],
            }
    module = resolve_module(args.tfhub_module)
    extractor = backends.tflite_backend(backends.convert_to_tflite(module))
    raw = _rate(extractor, _sample_batch(args.image_dir, module.input_size))
    result["raw_images_per_second"] = round(raw, 1)
    empty = result["empty_cache"]
    empty["module_seconds"] = round(empty["images"] / raw, 2)
    empty["wall_over_raw"] = round(empty["seconds"] / empty["module_seconds"], 3)
    return result
