# ------------------------------------------------------------ retrain.export.loading

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from retrain.bottlenecks import backends
from retrain.bottlenecks.backends import (
    BackendError,
    calibration_set,
    choose_backend,
    convert_to_int8,
    convert_to_tflite,
    tensorflow_backend,
    tflite_backend,
)
from retrain.bottlenecks.stage import open_cache
from retrain.data.decode import decode_image
from retrain.data.preprocess import to_module_input
from retrain.data.resize import resize_bilinear
from retrain.errors import RetrainError
from retrain.export.loading import ModelLoadError, TFLiteClassifier
from retrain.models.loading import resolve_module
from retrain.models.module_cache import tflite_model_path, tflite_verified_path
from tests.conftest import EXAMPLE_DIR
from tests.tflite_models import TinyClassifier, write_tiny_classifier

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = sorted(EXAMPLE_DIR.glob("*/*.jpg"))
LOG = logging.getLogger("test_backends")


@pytest.fixture(scope="module")
def module():
    return resolve_module("efficientnet_lite0")


@pytest.fixture(scope="module")
def module_object(module):
    return module.load()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("retrain_cache")


@pytest.fixture(scope="module")
def tflite_path(module, module_object, cache_dir) -> Path:
    return convert_to_tflite(module, cache_dir, module_object)


@pytest.fixture(scope="module")
def photos(module) -> np.ndarray:
    """33 real photos, decoded and resized as extraction does: float32 [33, 224, 224, 3]."""
    size = module.input_size
    images = [to_module_input(decode_image(p, size), size).numpy() for p in PHOTOS[::2][:33]]
    return np.stack(images).astype(np.float32)


@pytest.fixture(scope="module")
def reference(module_object, photos) -> np.ndarray:
    """TensorFlow's features for `photos`."""
    return tensorflow_backend(module_object)(photos)


# ----------------------------------------------------------------------------- conversion


def _broken_converter(*args):
    raise RuntimeError("converter exploded\nwith details")


def test_conversion_is_cached(module, module_object, cache_dir, tflite_path):
    assert tflite_path == tflite_model_path(cache_dir, module.fingerprint)
    assert tflite_path.parent == cache_dir / "tflite"
    assert module.fingerprint in tflite_path.name
    assert tflite_path.read_bytes()[4:8] == b"TFL3"
    others = [p for p in tflite_path.parent.iterdir() if p != tflite_path]
    assert [p.name for p in others] == [f".{tflite_path.name}.lock"]  # no temp files
    mtime = tflite_path.stat().st_mtime_ns
    start = time.perf_counter()
    assert convert_to_tflite(module, cache_dir, module_object) == tflite_path
    assert time.perf_counter() - start < 0.5
    assert tflite_path.stat().st_mtime_ns == mtime


def test_conversion_failure_is_a_backend_error(module, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "_convert", _broken_converter)
    with pytest.raises(BackendError, match=r"^cannot convert module .*: converter exploded$"):
        convert_to_tflite(module, tmp_path)
    assert issubclass(BackendError, RetrainError)
    left = (tmp_path / "tflite").glob("*") if (tmp_path / "tflite").exists() else []
    assert [p.name for p in left if not p.name.endswith(".lock")] == []  # lock files stay


def test_a_broken_cached_conversion_is_redone(
    module, module_object, tflite_path, tmp_path, monkeypatch
):
    broken = tflite_model_path(tmp_path, module.fingerprint)
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\0\0\0\0TFL3" + b"\xff" * 64)  # looks cached, does not load
    calls = []

    def convert(*args):
        calls.append(args)
        return tflite_path.read_bytes()

    monkeypatch.setattr(backends, "_convert", convert)
    extractor, name, _ = choose_backend(
        "tflite", module, module_object, None, LOG, cache_dir=tmp_path
    )
    assert (name, len(calls)) == ("tflite", 1)
    assert broken.read_bytes() == tflite_path.read_bytes()
    assert extractor(np.zeros((1, 224, 224, 3), np.float32)).shape == (1, 1280)


def test_default_cache_dir(module, module_object, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backends, "_convert", lambda *args: b"\0\0\0\0TFL3")
    assert convert_to_tflite(module, None, module_object).parent == tmp_path / "tflite"


# ----------------------------------------------------------------------------- tflite extractor


def test_tflite_features_match_tensorflow(tflite_path, photos, reference):
    features = tflite_backend(tflite_path, batch_size=32)(photos)
    assert features.shape == reference.shape == (33, 1280)
    assert features.dtype == np.float32
    assert np.max(np.abs(features - reference)) <= 1e-4


@pytest.mark.parametrize("rows", [0, 1, 5, 33])
def test_tflite_odd_batch_sizes(tflite_path, photos, reference, rows):
    extractor = tflite_backend(tflite_path, batch_size=4)
    features = extractor(photos[:rows])
    assert features.shape == (rows, 1280)
    assert np.max(np.abs(features - reference[:rows]), initial=0.0) <= 1e-4
    # the interpreter is resized back after a short chunk
    assert np.max(np.abs(extractor(photos[:4]) - reference[:4])) <= 1e-4


def test_tflite_accepts_tensors_and_rejects_wrong_shapes(tflite_path, photos, reference):
    extractor = tflite_backend(tflite_path, num_threads=1, batch_size=2)
    features = extractor(tf.constant(photos[:3]))
    assert np.max(np.abs(features - reference[:3])) <= 1e-4
    with pytest.raises(ValueError, match="expected images"):
        extractor(np.zeros((1, 100, 100, 3), np.float32))


def test_tflite_backend_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\0\0\0\0TFL3" + b"\x01" * 100)
    with pytest.raises(BackendError, match="cannot load TFLite model"):
        tflite_backend(bad)


# ----------------------------------------------------------------------------- choose_backend


def _forget_verification(module, cache_dir):
    tflite_verified_path(cache_dir, module.fingerprint).unlink(missing_ok=True)


def test_auto_picks_tflite_on_cpu(module, module_object, cache_dir, photos, reference, caplog):
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible: auto picks TensorFlow")
    caplog.set_level(logging.INFO)
    _forget_verification(module, cache_dir)
    extractor, name, reason = choose_backend(
        "auto", module, module_object, photos[:4], LOG, cache_dir=cache_dir
    )
    assert name == "tflite"
    assert reason.startswith("CPU; matches TensorFlow's features to ")
    assert reason.endswith(" on 4 images")
    assert np.max(np.abs(extractor(photos[4:9]) - reference[4:9])) <= 1e-4
    assert "Extraction backend: tflite" in caplog.text
    # The check is remembered: later runs need neither the samples nor the TensorFlow module.
    _, name, reason = choose_backend("auto", module, None, None, LOG, cache_dir=cache_dir)
    assert name == "tflite" and "checked against TensorFlow earlier" in reason


def test_auto_falls_back_when_features_differ(
    module, module_object, cache_dir, photos, monkeypatch, caplog
):
    monkeypatch.setattr(backends, "gpu_present", lambda: False)
    real = backends.tflite_backend

    def perturbed(*args, **kwargs):
        extractor = real(*args, **kwargs)
        return lambda images: extractor(images) + np.float32(3e-3)

    monkeypatch.setattr(backends, "tflite_backend", perturbed)
    _forget_verification(module, cache_dir)
    extractor, name, reason = choose_backend(
        "auto", module, module_object, photos[:2], LOG, cache_dir=cache_dir
    )
    assert name == "tensorflow"
    assert reason.startswith("tflite features differ from TensorFlow's by 3.0e-03 > ")
    allowed = float(reason.rsplit("> ", 1)[1])  # 1e-4 of the largest feature (at least 1)
    assert 1e-4 <= allowed < 3e-3
    assert reason in caplog.text
    assert extractor(photos[:1]).shape == (1, 1280)


def test_auto_falls_back_when_conversion_fails(module, module_object, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "gpu_present", lambda: False)
    monkeypatch.setattr(backends, "_convert", _broken_converter)
    _, name, reason = choose_backend(
        "auto", module, module_object, np.zeros((1, 224, 224, 3)), LOG, cache_dir=tmp_path
    )
    assert name == "tensorflow"
    assert reason.startswith("tflite unavailable: cannot convert module")
    assert "\n" not in reason
    # asked for explicitly, the same failure is an error
    with pytest.raises(BackendError, match="cannot convert module"):
        choose_backend("tflite", module, module_object, None, LOG, cache_dir=tmp_path)


def test_auto_needs_sample_images(module, module_object, cache_dir, monkeypatch):
    monkeypatch.setattr(backends, "gpu_present", lambda: False)
    _forget_verification(module, cache_dir)
    _, name, reason = choose_backend(
        "auto",
        module,
        module_object,
        np.zeros((0, 224, 224, 3), np.float32),
        LOG,
        cache_dir=cache_dir,
    )
    assert (name, reason) == ("tensorflow", "no sample images to check tflite against TensorFlow")


def test_auto_on_gpu_and_explicit_choices(module, module_object, cache_dir, monkeypatch):
    monkeypatch.setattr(backends, "gpu_present", lambda: True)
    assert choose_backend("auto", module, module_object, None, LOG)[1:] == (
        "tensorflow",
        "GPU present",
    )
    assert choose_backend("tensorflow", module, module_object, None, LOG)[1] == "tensorflow"
    _, name, _ = choose_backend("tflite", module, module_object, None, LOG, cache_dir=cache_dir)
    assert name == "tflite"
    with pytest.raises(BackendError, match="unknown extraction backend 'onnx'"):
        choose_backend("onnx", module, module_object, None, LOG)


# ----------------------------------------------------------------------------- int8


@pytest.fixture(scope="module")
def int8_calibration() -> backends.Calibration:
    """Four of the test photos: enough to calibrate, cheap to convert with (the backend's own
    pick is 300 training images)."""
    return calibration_set([str(p) for p in PHOTOS], 10**8, count=4)


@pytest.fixture(scope="module")
def int8_path(module, module_object, cache_dir, int8_calibration) -> Path:
    return convert_to_int8(module, int8_calibration, cache_dir, module_object)


def test_calibration_is_a_seeded_pick_named_by_content(tmp_path):
    photos = []
    for i, photo in enumerate(PHOTOS[:6]):
        photos.append(tmp_path / f"{i}.jpg")
        photos[-1].write_bytes(photo.read_bytes())
    paths = [str(p) for p in photos]
    first = calibration_set(paths, 1000, count=4)
    assert len(first.paths) == 4 and set(first.paths) <= set(paths)
    assert first == calibration_set(paths, 1000, count=4)
    assert calibration_set(paths, 1000).paths == tuple(paths)  # fewer than asked: all of them
    assert first.recipe == f"tflite_int8-v1-{first.identity}"
    Path(first.paths[0]).write_bytes(PHOTOS[10].read_bytes())  # same names, other contents
    again = calibration_set(paths, 1000, count=4)
    assert again.paths == first.paths and again.identity != first.identity
    Path(first.paths[0]).unlink()  # an unreadable image still names a calibration
    assert calibration_set(paths, 1000, count=4).identity not in (first.identity, again.identity)


@pytest.mark.slow  # converting Lite0 to int8 takes 15-30 s
def test_int8_conversion_is_full_integer_and_cached(
    module, module_object, cache_dir, int8_calibration, int8_path, monkeypatch
):
    name = f"{module.fingerprint}-int8-{int8_calibration.identity}-v1.tflite"
    assert int8_path == cache_dir / "tflite" / name
    assert int8_path != tflite_model_path(cache_dir, module.fingerprint)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(int8_path))
    kinds = [op["op_name"] for op in interpreter._get_ops_details()]
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    convolutions = [
        op for op in interpreter._get_ops_details() if op["op_name"].endswith("CONV_2D")
    ]
    assert len(convolutions) > 40  # every convolution of the network, in int8
    assert all(dtypes[op["inputs"][0]] == np.int8 for op in convolutions)
    assert (kinds[0], kinds[-1]) == ("QUANTIZE", "DEQUANTIZE")  # float32 in, float32 out
    monkeypatch.setattr(backends, "_convert", _broken_converter)  # cached: not converted again
    assert convert_to_int8(module, int8_calibration, cache_dir, module_object) == int8_path


@pytest.mark.slow  # converting Lite0 to int8 takes 15-30 s
def test_int8_features_are_close_to_float(
    module, module_object, cache_dir, int8_calibration, int8_path, photos, reference
):
    extractor, name, reason = choose_backend(
        "tflite_int8",
        module,
        module_object,
        None,
        LOG,
        cache_dir=cache_dir,
        calibration=int8_calibration,
    )
    assert (name, reason) == ("tflite_int8", "calibrated on 4 training images")
    features = extractor(photos)
    assert features.shape == reference.shape and features.dtype == np.float32
    cosine = np.sum(features * reference, 1) / (
        np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() > 0.85 and np.median(cosine) > 0.95
    assert not np.allclose(features, reference, atol=1e-3)  # really another model
    np.testing.assert_array_equal(extractor(photos[:5]), features[:5])  # deterministic


def test_int8_needs_calibration_images(module, module_object, tmp_path):
    with pytest.raises(BackendError, match="tflite_int8 needs calibration images"):
        choose_backend("tflite_int8", module, module_object, None, LOG, cache_dir=tmp_path)
    nothing = calibration_set([], 10**8)
    with pytest.raises(BackendError, match="tflite_int8 needs training images to calibrate"):
        choose_backend(
            "tflite_int8", module, module_object, None, LOG, cache_dir=tmp_path, calibration=nothing
        )
    assert "tflite_int8" in backends.ALL_BACKENDS
    assert "tflite_int8" not in backends.BACKENDS  # not offered by Beam


def test_int8_vectors_have_a_cache_folder_of_their_own(module, int8_calibration, tmp_path):
    floats = open_cache(tmp_path, module)
    int8 = open_cache(tmp_path, module, int8_calibration)
    other = open_cache(tmp_path, module, calibration_set([str(p) for p in PHOTOS], 10**8, 5))
    assert len({floats.folder, int8.folder, other.folder}) == 3
    described = json.loads((int8.folder / "module.json").read_text())
    assert described["precision"] == "int8"
    assert described["extraction"] == int8_calibration.recipe
    assert described["calibration_images"] == 4
    assert "precision" not in json.loads((floats.folder / "module.json").read_text())
    assert open_cache(tmp_path, module).folder == floats.folder


def test_int8_vectors_are_computed_and_cached_apart(tmp_path, caplog):
    """Float, then int8 vectors of the same images (and of their distorted copies) with a
    small module: two cache folders, vectors close but not equal, the second int8 run reusing
    the conversion and every vector."""
    from retrain.bottlenecks.stage import LazyModule, compute_bottlenecks, load_module
    from retrain.config import DistortionConfig, ModuleConfig
    from retrain.data.scan import scan_image_dir
    from tests.fault_tools import save_tiny_module

    save_tiny_module(tmp_path / "tiny")
    for i, photo in enumerate(PHOTOS[:12]):
        target = tmp_path / "images" / "ab"[i % 2] / f"{i}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(photo.read_bytes())
    image_set = scan_image_dir(tmp_path / "images", 0, 0)

    def run(backend: str):
        settings = ModuleConfig(
            handle=str(tmp_path / "tiny"),
            extraction_backend=backend,
            cache_dir=str(tmp_path / "modules"),
        )
        module = load_module(settings)
        where = (tmp_path / "b", settings, 10**8)
        copies = DistortionConfig(flip_left_right=True, copies=1)
        b = compute_bottlenecks(image_set, module, LazyModule(module), *where, distortions=copies)
        return b, b.training().load().x

    floats, float_x = run("tensorflow")
    caplog.set_level(logging.INFO, logger="retrain")
    int8, int8_x = run("tflite_int8")
    assert "Converting the module to int8, calibrated on 12 training images" in caplog.text
    assert (int8.computed, int8.copies.computed) == (12, 12)
    assert int8.cache.folder != floats.cache.folder
    assert json.loads((int8.cache.folder / "module.json").read_text())["precision"] == "int8"
    assert [p.name for p in (tmp_path / "modules" / "tflite").glob("*-int8-*.tflite")]
    difference = np.abs(int8_x - float_x).max()
    assert 0 < difference < 0.02  # averages of [0, 1] pixels, in steps of about 1/255
    caplog.clear()
    again, again_x = run("tflite_int8")
    assert "Converting" not in caplog.text
    assert "Extraction backend: tflite_int8" not in caplog.text  # nothing to compute
    assert (again.computed, again.copies.computed) == (0, 0)
    np.testing.assert_array_equal(again_x, int8_x)


# ------------------------------------------------------------ retrain.export.loading


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[Path, TinyClassifier]:
    return write_tiny_classifier(tmp_path_factory.mktemp("classifier") / "tiny.tflite")


def test_tflite_classifier_predicts(classifier):
    path, model = classifier
    clf = TFLiteClassifier(path)
    assert clf.input_size() == (12, 10)
    rng = np.random.default_rng(1)
    for rows in (1, 3, 1):
        batch = rng.random((rows, 12, 10, 3), dtype=np.float32)
        scores = clf.predict(batch)
        assert scores.shape == (rows, 4)
        np.testing.assert_allclose(scores, model(batch).numpy(), atol=1e-5)
    assert clf.predict(np.zeros((0, 12, 10, 3), np.float32)).shape == (0, 4)
    with pytest.raises(ValueError, match="expected a batch"):
        clf.predict(np.zeros((1, 10, 12, 3), np.float32))


def test_tflite_paths_do_not_import_tensorflow(classifier, tflite_path):
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from retrain.export.loading import TFLiteClassifier
        from retrain.data.resize import resize_bilinear
        assert "tensorflow" not in sys.modules, "import"
        scores = TFLiteClassifier({str(classifier[0])!r}).predict(np.zeros((2, 12, 10, 3)))
        assert scores.shape == (2, 4), scores.shape
        from retrain.bottlenecks.backends import tflite_backend
        features = tflite_backend({str(tflite_path)!r})(np.zeros((1, 224, 224, 3), np.float32))
        assert features.shape == (1, 1280), features.shape
        assert "tensorflow" not in sys.modules, "run"
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "XNNPACK" not in done.stderr  # LiteRT's notice is silenced


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, not a model\n", b"\0\0\0\0TFL3" + bytes(range(256)) * 4, "truncated"],
)
def test_corrupt_tflite_is_a_model_load_error(classifier, tmp_path, content):
    path = tmp_path / "model.tflite"
    if content == "truncated":
        content = classifier[0].read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        TFLiteClassifier(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_tflite_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot read .*missing.tflite: No such file"):
        TFLiteClassifier(tmp_path / "missing.tflite")


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((170, 256, 3), (224, 224)),
        ((500, 375, 3), (224, 224)),
        ((7, 3, 3), (5, 9)),
        ((1, 1, 3), (224, 224)),
        ((333, 500, 3), (224, 224)),
        ((224, 224, 3), (224, 224)),
    ],
)
def test_resize_bilinear_is_tensorflows(shape, size):
    pixels = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    expected = tf.image.resize(tf.cast(pixels, tf.float32), size, method="bilinear").numpy()
    resized = resize_bilinear(pixels, size)
    assert resized.dtype == np.float32
    np.testing.assert_array_equal(resized, expected)  # bit for bit, not merely close
    for photo in PHOTOS:
        pixels = decode_image(photo, (224, 224))
        np.testing.assert_array_equal(
            resize_bilinear(pixels, (224, 224)) / np.float32(255),
            to_module_input(pixels, (224, 224)).numpy(),
        )
