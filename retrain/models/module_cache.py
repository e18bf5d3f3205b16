"""The module cache's folder layout: where everything derived from an image module is kept.

One root holds a folder per kind of derived file, each name ending in the version of the recipe
that made it, so a changed recipe makes new files instead of reusing stale ones::

    <root>/                       cache_dir if given, else $RETRAIN_CACHE_DIR, else ~/.cache/retrain
        modules/
            <name>-<weights sha256[:12]>-v<CONVERTER_VERSION>/   a bundled model as a SavedModel
                saved_model.pb, variables/, retrain_module.json
        tflite/
            <fingerprint>-v<TFLITE_CONVERSION_VERSION>.tflite            the module for LiteRT
            <fingerprint>-v<TFLITE_CONVERSION_VERSION>.tflite.verified   it matched TensorFlow
            <fingerprint>-int8-<calibration>-v<TFLITE_INT8_CONVERSION_VERSION>.tflite
                                  the module quantized to int8, calibrated on one set of images
        frozen/
            <fingerprint>-v<FROZEN_MODULE_VERSION>.pb            the module as a frozen GraphDef

``<fingerprint>`` is ``ImageModule.fingerprint`` (a sha256 of the SavedModel's files). Derived
files live here, not in the module's folder, which may be read-only or a TF Hub cache entry.
Importing this module imports no TensorFlow.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CONVERTER_VERSION",
    "FROZEN_MODULE_VERSION",
    "TFLITE_CONVERSION_VERSION",
    "TFLITE_INT8_CONVERSION_VERSION",
    "cache_root",
    "converted_module_dir",
    "default_cache_dir",
    "frozen_module_path",
    "tflite_int8_model_path",
    "tflite_model_path",
    "tflite_verified_path",
]

# Bump one of these when its recipe changes: files made by the old one are then not reused.
CONVERTER_VERSION = 1  # bundled weights -> SavedModel
TFLITE_CONVERSION_VERSION = 1  # SavedModel -> .tflite
FROZEN_MODULE_VERSION = 1  # SavedModel -> frozen GraphDef
TFLITE_INT8_CONVERSION_VERSION = 1  # SavedModel + calibration images -> int8 .tflite

CacheDir = str | os.PathLike[str] | None


def default_cache_dir() -> Path:
    """``$RETRAIN_CACHE_DIR`` (``~`` expanded) if set and not empty, else ``~/.cache/retrain``."""
    env = os.environ.get("RETRAIN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "retrain"


def cache_root(cache_dir: CacheDir = None) -> Path:
    """The cache's root folder: ``cache_dir`` with ``~`` expanded, or ``default_cache_dir()``
    when it is None or an empty string."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def converted_module_dir(cache_dir: CacheDir, name: str, weights_sha256: str) -> Path:
    """The folder of bundled model ``name`` converted to a SavedModel from the weights whose
    sha256 hex digest is ``weights_sha256``."""
    return cache_root(cache_dir) / "modules" / f"{name}-{weights_sha256[:12]}-v{CONVERTER_VERSION}"


def tflite_model_path(cache_dir: CacheDir, fingerprint: str) -> Path:
    """The TFLite conversion of the module with ``fingerprint``."""
    return cache_root(cache_dir) / "tflite" / f"{fingerprint}-v{TFLITE_CONVERSION_VERSION}.tflite"


def tflite_int8_model_path(cache_dir: CacheDir, fingerprint: str, calibration: str) -> Path:
    """The int8 TFLite conversion of the module with ``fingerprint``, its activations calibrated
    on the images whose identity (``backends.Calibration.identity``) is ``calibration``."""
    name = f"{fingerprint}-int8-{calibration}-v{TFLITE_INT8_CONVERSION_VERSION}.tflite"
    return cache_root(cache_dir) / "tflite" / name


def tflite_verified_path(cache_dir: CacheDir, fingerprint: str) -> Path:
    """The marker file saying that the module's TFLite conversion reproduced TensorFlow's
    features on real images (it holds how closely)."""
    path = tflite_model_path(cache_dir, fingerprint)
    return path.with_name(path.name + ".verified")


def frozen_module_path(cache_dir: CacheDir, fingerprint: str) -> Path:
    """The module with ``fingerprint`` as a frozen GraphDef (``.pb``)."""
    return cache_root(cache_dir) / "frozen" / f"{fingerprint}-v{FROZEN_MODULE_VERSION}.pb"
