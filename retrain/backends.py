"""Bottleneck extraction backends: the module run by TensorFlow, or converted once to TFLite.

On a CPU the TFLite interpreter (XNNPACK, all cores) runs the bundled EfficientNet-Lite0 about
2-3x faster than TensorFlow with features equal to about 1e-5. ``choose_backend`` picks one:
``auto`` takes TFLite on a CPU only after checking on a few real images that it reproduces
TensorFlow's features, and says why when it does not.

Importing this module does not import TensorFlow, nor does ``tflite_backend``: only conversion,
``tensorflow_backend`` and ``choose_backend`` do.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrain.atomic import atomic_open, atomic_write_text, exclusive
from retrain.errors import RetrainError, StorageError, first_line
from retrain.models.loading import ImageModule
from retrain.module_cache import tflite_model_path, tflite_verified_path
from retrain.runtime import quiet_stderr
from retrain.tflite_model import TFLiteModel, is_tflite_file

__all__ = [
    "BACKENDS",
    "TFLITE_BATCH",
    "TOLERANCE",
    "BackendError",
    "Extractor",
    "choose_backend",
    "convert_to_tflite",
    "empty_features",
    "tensorflow_backend",
    "tflite_backend",
]

BACKENDS = ("auto", "tensorflow", "tflite")
# Images per TFLite invocation: as fast as larger batches on CPU, with a far smaller arena.
TFLITE_BATCH = 8
# Largest absolute feature difference from TensorFlow that `auto` accepts for TFLite.
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


def _gpu_present() -> bool:
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
    path = tflite_model_path(cache_dir, module.fingerprint)
    if _has_tflite_identifier(path):
        return path
    with exclusive(path):  # runs started at once convert once; the others wait and use it
        if not _has_tflite_identifier(path):
            _write_conversion(module, module_object, path)
    return path


def _write_conversion(module: ImageModule, module_object: Any, path: Path) -> None:
    """Convert the module and write it to ``path`` atomically. Raises BackendError, or
    StorageError when the cache's file system fails."""
    try:
        data = _convert(module, module_object)
    except BackendError:
        raise
    except Exception as exc:  # converter errors come in many types; all mean "cannot convert"
        raise BackendError(
            f"cannot convert module {module.handle!r} to TFLite: {first_line(exc)}"
        ) from exc
    try:
        with atomic_open(path, "wb", "TFLite conversion", len(data)) as handle:
            os.fchmod(handle.fileno(), 0o644)  # shareable like the module cache
            handle.write(data)
    except OSError as exc:
        raise BackendError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _convert(module: ImageModule, module_object: Any) -> bytes:
    """Convert ``module_object.__call__`` (what the TensorFlow backend runs) for float32
    ``[None, H, W, 3]``; fall back to the SavedModel's serving signature."""
    import tensorflow as tf

    height, width = module.input_size
    obj = module_object if module_object is not None else module.load()
    spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="images")
    with quiet_stderr():
        try:
            function = tf.function(lambda images: obj(images)).get_concrete_function(spec)
            converter = tf.lite.TFLiteConverter.from_concrete_functions([function], obj)
            data = converter.convert()
        except Exception:
            converter = tf.lite.TFLiteConverter.from_saved_model(
                os.fspath(module.path), signature_keys=["serving_default"]
            )
            data = converter.convert()
    return bytes(data)


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


def choose_backend(
    requested: str,
    module: ImageModule,
    module_object: Any,
    sample_images: Any,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = TFLITE_BATCH,
    num_threads: int | None = None,
    tolerance: float = TOLERANCE,
) -> tuple[Extractor, str, str]:
    """(extractor, backend used, reason) for ``requested`` in ``BACKENDS``.

    ``tensorflow``: TensorFlow. ``tflite``: the cached conversion (BackendError if it cannot be
    made or loaded). ``auto``: TensorFlow if a GPU is visible; else TFLite if, on
    ``sample_images`` (a few real preprocessed images, float32 ``[k, H, W, 3]``), its features
    are within ``tolerance`` of TensorFlow's; else TensorFlow, with the reason logged.
    """
    log = log or _log
    if requested not in BACKENDS:
        raise BackendError(
            f"unknown extraction backend {requested!r}; choose one of {', '.join(BACKENDS)}"
        )
    if requested == "tensorflow":
        return tensorflow_backend(module_object), "tensorflow", "requested"
    if requested == "tflite":
        extractor = _load_tflite(module, module_object, cache_dir, num_threads, batch_size)
        log.info("Extraction backend: tflite (requested)")
        return extractor, "tflite", "requested"

    if _gpu_present():
        log.info("Extraction backend: tensorflow (GPU present)")
        return tensorflow_backend(module_object), "tensorflow", "GPU present"
    try:
        extractor = _load_tflite(module, module_object, cache_dir, num_threads, batch_size)
        marker = tflite_verified_path(cache_dir, module.fingerprint)
        if marker.exists():
            earlier = marker.read_text().removeprefix("CPU; ")  # markers before 1c37c06 had it
            ok, reason = True, f"CPU; checked against TensorFlow earlier: {earlier}"
        else:
            ok, reason = _check(extractor, module_object, sample_images, tolerance)
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
    num_threads: int | None,
    batch_size: int,
) -> Extractor:
    """Convert (or reuse the cached conversion) and load it; a cached file that fails to load
    is converted again, once."""
    _require_litert()  # before spending seconds on a conversion
    cached = _has_tflite_identifier(tflite_model_path(cache_dir, module.fingerprint))
    path = convert_to_tflite(module, cache_dir, module_object)
    try:
        return tflite_backend(path, num_threads, batch_size)
    except BackendError:
        if not cached:
            raise
        with contextlib.suppress(OSError):
            path.unlink()
        path = convert_to_tflite(module, cache_dir, module_object)
        return tflite_backend(path, num_threads, batch_size)


def _check(
    extractor: Extractor, module_object: Any, samples: Any, tolerance: float
) -> tuple[bool, str]:
    """Whether the TFLite features on ``samples`` are TensorFlow's to ``tolerance``, and how
    close they are (or why they cannot be compared)."""
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
    if not diff <= tolerance:  # also catches NaN
        return False, f"tflite features differ from TensorFlow's by {diff:.1e} > {tolerance:g}"
    return True, f"CPU; matches TensorFlow's features to {diff:.1e} on {len(samples)} images"


# ----------------------------------------------------------------------------- helpers
