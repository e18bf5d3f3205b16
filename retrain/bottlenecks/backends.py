"""Bottleneck extraction backends: the module run by TensorFlow, or converted once to TFLite.

On a CPU the TFLite interpreter (XNNPACK, all cores) runs the bundled EfficientNet-Lite0 about
2-3x faster than TensorFlow with features equal to about 1e-5. ``choose_backend`` picks one:
``auto`` takes TFLite on a CPU only after checking on a few real images that it reproduces
TensorFlow's features, and says why when it does not.

``tflite_int8`` (asked for by name, or by ``auto`` on a CPU with int8 dot products: see
``retrain.bottlenecks.auto``) runs the module quantized to int8
(weights and activations; float32 input and output) with XNNPACK. Its activation ranges are
calibrated on a ``Calibration``: a seeded pick of the run's own training images, named by a
hash of their contents, which also names the conversion in the module cache and the vectors'
folder in the bottleneck cache, so int8 vectors are never mixed with float ones.

Importing this module does not import TensorFlow, nor does ``tflite_backend``: only conversion,
``tensorflow_backend`` and ``choose_backend`` do.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrain.bottlenecks.cache import file_content_key
from retrain.config import EXTRACTION_BACKENDS, INT8
from retrain.errors import RetrainError, StorageError, first_line
from retrain.models.loading import ImageModule
from retrain.models.module_cache import (
    TFLITE_INT8_CONVERSION_VERSION,
    tflite_int8_model_path,
    tflite_model_path,
    tflite_verified_path,
)
from retrain.models.tflite import TFLiteModel, is_tflite_file
from retrain.utils.atomic import atomic_open, atomic_write_text, exclusive
from retrain.utils.runtime import quiet_stderr

__all__ = [
    "ALL_BACKENDS",
    "BACKENDS",
    "INT8",
    "TFLITE_BATCH",
    "TOLERANCE",
    "BackendError",
    "Calibration",
    "Extractor",
    "TFLiteOptions",
    "calibration_set",
    "choose_backend",
    "convert_to_int8",
    "convert_to_tflite",
    "empty_features",
    "gpu_present",
    "tensorflow_backend",
    "tflite_backend",
]

ALL_BACKENDS = EXTRACTION_BACKENDS
BACKENDS = tuple(b for b in ALL_BACKENDS if b != INT8)  # without int8: the Beam pipeline's
# The seed of the pick of training images the int8 ranges are calibrated on (as many as for the
# int8 export: quantize.CALIBRATION_IMAGES): fixed, so --random_seed changes no vectors.
CALIBRATION_SEED = 0
# Images per TFLite invocation: as fast as larger batches on CPU, with a far smaller arena.
TFLITE_BATCH = 8
# Largest feature difference from TensorFlow that `auto` accepts for TFLite, relative to the
# largest feature (absolute for features under 1).
TOLERANCE = 1e-4

_log = logging.getLogger(__name__)


class BackendError(RetrainError):
    """The requested extraction backend cannot be used; the message says why in one line."""


class Extractor(Protocol):
    """Maps float32 images ``[N, H, W, 3]`` in ``[0, 1]`` (np.ndarray or tf.Tensor) to
    float32 features ``[N, D]`` as an np.ndarray."""

    def __call__(self, images: Any, /) -> np.ndarray: ...


# ----------------------------------------------------------------------------- TensorFlow


def tensorflow_backend(module_object: Any) -> Extractor:
    """Run a loaded image feature-vector module on batches, in a tf.function."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def features(images: tf.Tensor) -> tf.Tensor:
        return module_object(images)

    def extract(images: Any) -> np.ndarray:
        images = tf.convert_to_tensor(images, tf.float32)
        if images.shape[0] == 0:
            return empty_features(features, images.shape)
        return features(images).numpy()

    return extract


def empty_features(features: Any, image_shape: Any) -> np.ndarray:
    """The float32 ``[0, D]`` result of the tf.function ``features`` for an empty batch of
    ``image_shape`` ``[0, H, W, C]``, without running it: D is the static width of its output,
    traced for ``[None, H, W, C]``.

    TensorFlow's oneDNN kernels (on by default on AVX-512 CPUs) fail on a batch of zero images
    ("Incompatible shapes: [0,224,224,3] vs. [32]"), so no module is ever run on one.
    """
    import tensorflow as tf

    spec = tf.TensorSpec([None, *list(image_shape)[1:]], tf.float32)
    output = features.get_concrete_function(spec).structured_outputs
    dim = output.shape[-1] if output.shape.rank == 2 else None
    if dim is None:
        raise ValueError(f"the module's output {output.shape} has no static feature dimension")
    return np.zeros((0, int(dim)), np.float32)


def gpu_present() -> bool:
    """Whether TensorFlow sees a GPU (imports TensorFlow)."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


# ----------------------------------------------------------------------------- conversion


def convert_to_tflite(
    module: ImageModule,
    cache_dir: str | os.PathLike[str] | None = None,
    module_object: Any = None,
) -> Path:
    """The module as a float32 TFLite model with a resizable batch dimension; converted on the
    first call (about 10 s), then read from the cache (``module_cache.tflite_model_path``).
    Raises BackendError.

    The file is written atomically by one process at a time: runs started at once convert
    once, and what a conversion killed midway left is removed before the next one.
    ``module_object``, if given, saves loading the SavedModel again.
    """
    path = _conversion_path(module, cache_dir, None)
    return _cached_conversion(module, module_object, path, "TFLite")


def _conversion_path(
    module: ImageModule, cache_dir: str | os.PathLike[str] | None, calibration: Calibration | None
) -> Path:
    """Where the module's float conversion (``calibration`` None) or int8 one is cached."""
    if calibration is None:
        return tflite_model_path(cache_dir, module.fingerprint)
    return tflite_int8_model_path(cache_dir, module.fingerprint, calibration.identity)


@dataclass(frozen=True)
class Calibration:
    """The images an int8 conversion's activation ranges are calibrated on."""

    paths: tuple[str, ...]
    identity: str  # a hash of the images' contents, in order: names the conversion and vectors
    max_pixels: int  # images with more pixels are skipped, as extraction skips them

    @property
    def recipe(self) -> str:
        """What int8 vectors are made with, for the bottleneck cache's key."""
        return f"{INT8}-v{TFLITE_INT8_CONVERSION_VERSION}-{self.identity}"


def calibration_set(
    training_paths: Sequence[str],
    max_pixels: int,
    count: int | None = None,
) -> Calibration:
    """A seeded pick of ``count`` (default: ``quantize.CALIBRATION_IMAGES``, as for the int8
    export) of ``training_paths`` (all if fewer; the same pick for the
    same paths), named by a sha256 of their contents (an unreadable file counts as empty;
    the conversion skips it). Reads every picked file once."""
    from retrain.models.quantize import CALIBRATION_IMAGES, calibration_paths  # imports TensorFlow

    count = CALIBRATION_IMAGES if count is None else count
    paths = tuple(calibration_paths(list(training_paths), count, CALIBRATION_SEED))
    digest = hashlib.sha256(str(len(paths)).encode())
    for path in paths:
        try:
            digest.update(file_content_key(path))
        except OSError:
            digest.update(b"unreadable")
    return Calibration(paths, digest.hexdigest()[:16], max_pixels)


def convert_to_int8(
    module: ImageModule,
    calibration: Calibration,
    cache_dir: str | os.PathLike[str] | None = None,
    module_object: Any = None,
) -> Path:
    """The module as a full-integer int8 TFLite model (float32 input and output), its
    activations calibrated on ``calibration``'s images; converted on the first call (about a
    minute for 300 images), then read from the cache (``module_cache.tflite_int8_model_path``),
    written as ``convert_to_tflite`` writes. Raises BackendError, also when no calibration
    image is given."""
    if not calibration.paths:
        raise BackendError(f"{INT8} needs training images to calibrate the int8 model on")
    path = _conversion_path(module, cache_dir, calibration)
    return _cached_conversion(
        module, module_object, path, "int8 TFLite", lambda c: _calibrate(c, module, calibration)
    )


def _calibrate(converter: Any, module: ImageModule, calibration: Calibration) -> None:
    from retrain.models import quantize

    images = quantize.representative_dataset(
        calibration.paths, module.input_size, calibration.max_pixels
    )
    quantize.configure(converter, "int8", images)


Setup = Callable[[Any], None]  # readies a tf.lite.TFLiteConverter before it converts


def _cached_conversion(
    module: ImageModule, module_object: Any, path: Path, kind: str, setup: Setup | None = None
) -> Path:
    """``path``, converting the module to it first (``setup`` readies the converter) if it is
    not there yet."""
    if _has_tflite_identifier(path):
        return path
    with exclusive(path):  # runs started at once convert once; the others wait and use it
        if not _has_tflite_identifier(path):
            _write_conversion(module, module_object, path, kind, setup)
    return path


def _write_conversion(
    module: ImageModule, module_object: Any, path: Path, kind: str, setup: Setup | None
) -> None:
    """Convert the module and write it to ``path`` atomically. Raises BackendError, or
    StorageError when the cache's file system fails."""
    try:
        data = _convert(module, module_object, setup)
    except BackendError:
        raise
    except Exception as exc:  # converter errors come in many types; all mean "cannot convert"
        raise BackendError(
            f"cannot convert module {module.handle!r} to {kind}: {first_line(exc)}"
        ) from exc
    try:
        with atomic_open(path, "wb", "TFLite conversion", len(data)) as handle:
            os.fchmod(handle.fileno(), 0o644)  # shareable like the module cache
            handle.write(data)
    except OSError as exc:
        raise BackendError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _convert(module: ImageModule, module_object: Any, setup: Setup | None = None) -> bytes:
    """Convert ``module_object.__call__`` (what the TensorFlow backend runs) for float32
    ``[None, H, W, 3]``; fall back to the SavedModel's serving signature. ``setup``, if
    given, readies each converter first."""
    import tensorflow as tf

    height, width = module.input_size
    obj = module_object if module_object is not None else module.load()
    spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="images")
    with quiet_stderr():
        try:
            function = tf.function(lambda images: obj(images)).get_concrete_function(spec)
            converter = tf.lite.TFLiteConverter.from_concrete_functions([function], obj)
            data = _run(converter, setup)
        except Exception:
            converter = tf.lite.TFLiteConverter.from_saved_model(
                os.fspath(module.path), signature_keys=["serving_default"]
            )
            data = _run(converter, setup)
    return bytes(data)


def _run(converter: Any, setup: Setup | None) -> bytes:
    if setup is not None:
        setup(converter)
    return converter.convert()


def _has_tflite_identifier(path: Path) -> bool:
    try:
        return is_tflite_file(path)
    except OSError:
        return False


# ----------------------------------------------------------------------------- TFLite


class _TFLiteExtractor:
    """The Extractor over a TFLiteModel: features ``[N, D]`` for images of the model's shape."""

    def __init__(self, model: TFLiteModel) -> None:
        self.model = model
        self.image_shape = model.input_shape[1:]
        self.feature_dim = model.output_width

    def __call__(self, images: Any, /) -> np.ndarray:
        if not isinstance(images, np.ndarray) and hasattr(images, "numpy"):
            images = images.numpy()  # a tf.Tensor, without importing TensorFlow here
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise ValueError(
                f"expected images [N, {', '.join(map(str, self.image_shape))}], "
                f"got {list(images.shape)}"
            )
        return self.model.run(images)


def tflite_backend(
    model_path: str | os.PathLike[str],
    num_threads: int | None = None,
    batch_size: int = TFLITE_BATCH,
) -> Extractor:
    """Run a TFLite feature-vector model with LiteRT (XNNPACK) on ``num_threads`` threads
    (default: every CPU this process may use), ``batch_size`` images per invocation.

    Accepts np.ndarray (or anything with ``.numpy()``); does not import TensorFlow. Raises
    BackendError if ai-edge-litert is missing or the file is not a usable model.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _require_litert()
    path = Path(model_path)
    try:
        return _TFLiteExtractor(TFLiteModel(path, num_threads, batch_size, np.float32))
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError for unusable models
        raise BackendError(f"cannot load TFLite model {path}: {first_line(exc)}") from exc


def _require_litert() -> None:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError as exc:
        raise BackendError(
            f"the tflite backend needs ai-edge-litert (pip install ai-edge-litert): {exc}"
        ) from exc


# ----------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class TFLiteOptions:
    """How a TFLite backend runs: ``batch_size`` images per invocation on ``num_threads``
    threads (None: every CPU this process may use); and how close ``auto`` wants its features
    to TensorFlow's before it takes TFLite (``tolerance``, see ``_check``)."""

    batch_size: int = TFLITE_BATCH
    num_threads: int | None = None
    tolerance: float = TOLERANCE


def choose_backend(
    requested: str,
    module: ImageModule,
    module_object: Any,
    sample_images: Any,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    calibration: Calibration | None = None,
    tflite: TFLiteOptions = TFLiteOptions(),
) -> tuple[Extractor, str, str]:
    """(extractor, backend used, reason) for ``requested`` in ``ALL_BACKENDS``.

    ``tensorflow``: TensorFlow. ``tflite``: the cached conversion (BackendError if it cannot be
    made or loaded). ``tflite_int8``: the cached int8 conversion calibrated on
    ``calibration`` (BackendError without one). ``auto``: TensorFlow if a GPU is visible; else
    TFLite if, on ``sample_images`` (a few real preprocessed images, float32
    ``[k, H, W, 3]``), its features are within ``tflite.tolerance`` of TensorFlow's (see
    ``_check``); else TensorFlow, with the reason logged. TFLite runs as ``tflite`` says.
    """
    log = log or _log
    if requested not in ALL_BACKENDS:
        raise BackendError(
            f"unknown extraction backend {requested!r}; choose one of {', '.join(ALL_BACKENDS)}"
        )
    if requested == "tensorflow":
        return tensorflow_backend(module_object), "tensorflow", "requested"
    if requested == INT8:
        return _int8_backend(module, module_object, log, cache_dir, calibration, tflite)
    if requested == "tflite":
        extractor = _load_tflite(module, module_object, cache_dir, tflite)
        log.info("Extraction backend: tflite (requested)")
        return extractor, "tflite", "requested"

    if gpu_present():
        log.info("Extraction backend: tensorflow (GPU present)")
        return tensorflow_backend(module_object), "tensorflow", "GPU present"
    return _auto_on_cpu(module, module_object, sample_images, log, cache_dir, tflite)


def _int8_backend(
    module: ImageModule,
    module_object: Any,
    log: logging.Logger | logging.LoggerAdapter,
    cache_dir: str | os.PathLike[str] | None,
    calibration: Calibration | None,
    tflite: TFLiteOptions,
) -> tuple[Extractor, str, str]:
    """``tflite_int8``: the int8 conversion calibrated on ``calibration``."""
    if calibration is None:
        raise BackendError(f"{INT8} needs calibration images")
    if not _has_tflite_identifier(_conversion_path(module, cache_dir, calibration)):
        log.info(
            "Converting the module to int8, calibrated on %d training images (once for "
            "these images; about a minute)",
            len(calibration.paths),
        )
    extractor = _load_tflite(module, module_object, cache_dir, tflite, calibration)
    reason = f"calibrated on {len(calibration.paths)} training images"
    log.info("Extraction backend: %s (%s, %s)", INT8, reason, calibration.identity)
    return extractor, INT8, reason


def _auto_on_cpu(
    module: ImageModule,
    module_object: Any,
    sample_images: Any,
    log: logging.Logger | logging.LoggerAdapter,
    cache_dir: str | os.PathLike[str] | None,
    tflite: TFLiteOptions,
) -> tuple[Extractor, str, str]:
    """``auto`` without a GPU: TFLite if it was checked against TensorFlow before (its marker
    in the module cache) or passes the check on ``sample_images`` now; else TensorFlow, with
    the reason logged as a warning."""
    try:
        extractor = _load_tflite(module, module_object, cache_dir, tflite)
        marker = tflite_verified_path(cache_dir, module.fingerprint)
        if marker.exists():
            earlier = marker.read_text().removeprefix("CPU; ")  # markers before 1c37c06 had it
            ok, reason = True, f"CPU; checked against TensorFlow earlier: {earlier}"
        else:
            ok, reason = _check(extractor, module_object, sample_images, tflite.tolerance)
            if ok:
                with contextlib.suppress(OSError, StorageError):  # a read-only cache: next time
                    atomic_write_text(marker, reason.removeprefix("CPU; "))
    except (BackendError, StorageError) as exc:
        reason = f"tflite unavailable: {exc}"
    except Exception as exc:  # the interpreter failing on real images: fall back, say why
        reason = f"tflite failed on the sample images: {first_line(exc)}"
    else:
        if ok:
            log.info("Extraction backend: tflite (%s)", reason)
            return extractor, "tflite", reason
    log.warning("Extraction backend: tensorflow, not tflite: %s", reason)
    return tensorflow_backend(module_object), "tensorflow", reason


def _load_tflite(
    module: ImageModule,
    module_object: Any,
    cache_dir: str | os.PathLike[str] | None,
    tflite: TFLiteOptions,
    calibration: Calibration | None = None,
) -> Extractor:
    """Convert (or reuse the cached conversion): float, or int8 calibrated on
    ``calibration``; and load it. A cached file that fails to load is converted again, once."""
    _require_litert()  # before spending seconds on a conversion

    def convert() -> Path:
        if calibration is None:
            return convert_to_tflite(module, cache_dir, module_object)
        return convert_to_int8(module, calibration, cache_dir, module_object)

    cached = _has_tflite_identifier(_conversion_path(module, cache_dir, calibration))
    path = convert()
    try:
        return tflite_backend(path, tflite.num_threads, tflite.batch_size)
    except BackendError:
        if not cached:
            raise
        with contextlib.suppress(OSError):
            path.unlink()
        return tflite_backend(convert(), tflite.num_threads, tflite.batch_size)


def _check(
    extractor: Extractor, module_object: Any, samples: Any, tolerance: float
) -> tuple[bool, str]:
    """Whether the TFLite features on ``samples`` are TensorFlow's to ``tolerance`` times the
    largest of them (at least 1: features of a few units, activations of tens), and how close
    they are (or why they cannot be compared)."""
    import tensorflow as tf

    if not isinstance(samples, np.ndarray) and hasattr(samples, "numpy"):
        samples = samples.numpy()
    samples = np.asarray(samples, np.float32)
    if samples.ndim != 4 or len(samples) == 0:
        return False, "no sample images to check tflite against TensorFlow"
    expected = np.asarray(module_object(tf.constant(samples)))
    got = extractor(samples)
    if got.shape != expected.shape:
        return False, f"tflite features have shape {got.shape}, TensorFlow's {expected.shape}"
    diff = float(np.max(np.abs(got - expected)))
    allowed = tolerance * max(1.0, float(np.max(np.abs(expected))))
    if not diff <= allowed:  # also catches NaN
        return False, f"tflite features differ from TensorFlow's by {diff:.1e} > {allowed:.1e}"
    return True, f"CPU; matches TensorFlow's features to {diff:.1e} on {len(samples)} images"


# ----------------------------------------------------------------------------- helpers
