"""Resolve a module handle (bundled name, SavedModel directory or URL) to a local image module.

Bundled models are converted once into the module cache (``retrain.models.module_cache`` draws its
layout), with a small JSON metadata file, so later resolutions read a file and hash the weights,
nothing more. TensorFlow is imported only when a module must be converted, inspected or loaded,
and ``tensorflow_hub`` only for URL handles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Any

from retrain.errors import RetrainError
from retrain.models.module_cache import CONVERTER_VERSION, converted_module_dir
from retrain.models.registry import BundledModelSpec, get_bundled_model, list_bundled_models
from retrain.models.tf1_hub import TF1HubError, convert_tf1_hub, is_tf1_hub_module
from retrain.models.torch_weights import load_legacy_state_dict
from retrain.utils.atomic import exclusive, fsync_path, writing
from retrain.utils.handles import looks_like_url

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "METADATA_FILENAME",
    "ImageModule",
    "ModuleError",
    "fingerprint_saved_model",
    "resolve_module",
]

DEFAULT_INPUT_SIZE = (224, 224)
METADATA_FILENAME = "retrain_module.json"


class ModuleError(RetrainError, ValueError):
    """A module handle that cannot be resolved to a usable image module (one-line message)."""


@dataclass(frozen=True)
class ImageModule:
    """A resolved TF2 image feature-vector SavedModel on local disk."""

    handle: str  # what the user passed (bundled name, URL or directory)
    path: pathlib.Path  # local directory of the TF2 SavedModel
    input_size: tuple[int, int]  # (height, width)
    feature_dim: int
    fingerprint: str  # sha256 hex digest of the graph and variables (a cache key)
    vector_dtype = "float32"  # what its vectors are cached as (retrain.bottlenecks.cache)

    def load(self) -> Any:
        """``tf.saved_model.load`` the module; ``obj(images)`` maps ``[N, H, W, 3]`` in ``[0, 1]``
        to ``[N, feature_dim]``."""
        import tensorflow as tf

        return tf.saved_model.load(os.fspath(self.path))


def resolve_module(
    handle: str | os.PathLike[str], cache_dir: pathlib.Path | None = None
) -> ImageModule:
    """Resolve ``handle`` to an ``ImageModule``; raise ``ModuleError`` with one clear line if not.

    ``handle`` is a bundled model name (see ``list_bundled_models()``), converted once under
    ``cache_dir`` (default ``default_cache_dir()``); a local SavedModel directory; or a URL (or
    other handle) that ``tensorflow_hub.resolve`` downloads, honouring ``TFHUB_CACHE_DIR``.
    """
    handle = os.fspath(handle)
    try:
        spec = get_bundled_model(handle)
    except KeyError:
        pass
    else:
        return _resolve_bundled(handle, spec, cache_dir)
    if looks_like_url(handle):
        return _resolve_directory(handle, _hub_resolve(handle), cache_dir)
    path = pathlib.Path(handle).expanduser()
    if path.is_dir():
        return _resolve_directory(handle, path, cache_dir)
    raise ModuleError(
        f"unknown module {handle!r}: not a bundled model ({', '.join(list_bundled_models())}), "
        "an existing SavedModel directory or a URL"
    )


# ----------------------------------------------------------------------------- bundled models


def _resolve_bundled(
    handle: str, spec: BundledModelSpec, cache_dir: pathlib.Path | None
) -> ImageModule:
    try:
        weights = spec.weights_paths()
    except FileNotFoundError as exc:
        raise ModuleError(str(exc)) from None
    weights_sha256 = _sha256_files(weights)
    target = converted_module_dir(cache_dir, spec.name, weights_sha256)
    metadata = _read_metadata(target)
    if metadata is None:
        metadata = _convert_once(spec, weights, weights_sha256, target)
    return _converted_module(handle, target, metadata)


def _convert_once(
    spec: BundledModelSpec,
    weights: tuple[pathlib.Path, ...],
    weights_sha256: str,
    target: pathlib.Path,
) -> dict[str, Any]:
    """Convert the weights into ``target`` unless another process does it first (runs started
    at once on an empty cache convert once; the others wait and use it); what a conversion
    killed midway left is removed first. Returns the module's metadata."""
    with exclusive(target):
        metadata = _read_metadata(target)
        if metadata is not None:
            return metadata
        try:
            # About the weights' size: a failure of the storage names it (StorageError).
            size = sum(path.stat().st_size for path in weights)
            with writing(target, "converted module", size):
                _convert(spec, weights, weights_sha256, target)
        except OSError as exc:
            raise ModuleError(
                f"cannot convert {spec.name!r} into {target.parent}: {exc.strerror or exc}"
            ) from None
    metadata = _read_metadata(target)
    if metadata is None:
        raise ModuleError(f"conversion of {spec.name!r} left no usable module in {target}")
    return metadata


def _read_metadata(module_dir: pathlib.Path) -> dict[str, Any] | None:
    """The metadata of a complete converted module, or None if there is none (or it is broken)."""
    try:
        metadata = json.loads((module_dir / METADATA_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    required = ("input_size", "feature_dim", "fingerprint")
    if not isinstance(metadata, dict) or any(key not in metadata for key in required):
        return None
    if not (module_dir / "saved_model.pb").is_file():
        return None
    return metadata


def _convert(
    spec: BundledModelSpec,
    weights: tuple[pathlib.Path, ...],
    weights_sha256: str,
    target: pathlib.Path,
) -> None:
    """Convert the weights into a SavedModel at ``target``, built aside then renamed in place."""
    import tensorflow as tf

    from retrain.models.savedmodel import export_image_module

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            net = spec.build([load_legacy_state_dict(path) for path in weights])
        except ValueError as exc:  # WeightsError or a state dict that does not fit
            raise ModuleError(f"cannot convert bundled model {spec.name!r}: {exc}") from None
        height, width = spec.input_size
        probe = net.features(tf.zeros([1, height, width, 3]))
        if tuple(probe.shape) != (1, spec.feature_dim):
            raise ModuleError(
                f"{spec.name}: network gives features of shape {tuple(probe.shape)}, "
                f"expected (1, {spec.feature_dim})"
            )
        export_image_module(net, staging, spec.input_size)
        metadata = {
            "name": spec.name,
            "input_size": list(spec.input_size),
            "feature_dim": spec.feature_dim,
            "fingerprint": fingerprint_saved_model(staging),
            "weights_sha256": weights_sha256,
            "pip_package": spec.pip_package,
            "converter_version": CONVERTER_VERSION,
            "tensorflow_version": tf.__version__,
        }
        (staging / METADATA_FILENAME).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp made it private; the cache is shareable like files
        _fsync_tree(staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: pathlib.Path, target: pathlib.Path) -> None:
    """Atomically rename ``staging`` to ``target``; if another process won the race, keep its.

    A broken ``target`` (no valid metadata, e.g. from an interrupted manual copy) is replaced.
    """
    for _ in range(2):
        try:
            os.rename(staging, target)
            return
        except OSError:
            if _read_metadata(target) is not None:
                return  # a concurrent conversion finished first: use its module
            if not target.exists():
                continue
            graveyard = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            with contextlib.suppress(OSError):
                os.rename(target, graveyard / "broken")
            shutil.rmtree(graveyard, ignore_errors=True)
    raise ModuleError(f"cannot move the converted module into {target}")


def _fsync_tree(root: pathlib.Path) -> None:
    """Flush every file and folder under ``root`` so a renamed module survives a crash whole."""
    for path in [*root.rglob("*"), root]:
        fsync_path(path)


# ----------------------------------------------------------------------------- directories, URLs


def _hub_resolve(handle: str) -> pathlib.Path:
    try:
        import tensorflow_hub as hub
    except ImportError as exc:
        raise ModuleError(
            f"module {handle!r} needs tensorflow_hub, which fails to import: {exc}"
        ) from None
    try:
        return pathlib.Path(hub.resolve(handle))
    except Exception as exc:  # network, HTTP and format errors all mean "cannot fetch"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModuleError(f"cannot fetch module {handle!r}: {first_line}") from None


def _resolve_directory(
    handle: str, path: pathlib.Path, cache_dir: pathlib.Path | None = None
) -> ImageModule:
    if not (path / "saved_model.pb").is_file():
        raise ModuleError(f"module {handle!r}: {path} contains no saved_model.pb")
    if is_tf1_hub_module(path):
        return _resolve_tf1_hub(handle, path, cache_dir)
    input_size, feature_dim = _inspect_saved_model(handle, path)
    return ImageModule(
        handle=handle,
        path=path,
        input_size=input_size,
        feature_dim=feature_dim,
        fingerprint=fingerprint_saved_model(path),
    )


def _resolve_tf1_hub(handle: str, source: pathlib.Path, cache_dir: pathlib.Path | None):
    """A TF1 Hub format module (retrain.py's), converted once into the module cache as a TF2
    image module (see retrain.models.tf1_hub)."""
    target = converted_module_dir(cache_dir, "tf1hub", fingerprint_saved_model(source))
    metadata = _read_metadata(target)
    if metadata is None:
        with exclusive(target):
            metadata = _read_metadata(target) or _convert_tf1_hub(handle, source, target)
    return _converted_module(handle, target, metadata)


def _convert_tf1_hub(handle: str, source: pathlib.Path, target: pathlib.Path) -> dict[str, Any]:
    """Convert the TF1 Hub module at ``source`` into ``target`` (built aside, then renamed);
    returns its metadata."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with writing(target, "converted module"):
            try:
                convert_tf1_hub(handle, source, staging)
            except TF1HubError as err:
                raise ModuleError(str(err)) from None
            input_size, feature_dim = _inspect_saved_model(handle, staging)
            metadata = {
                "name": "tf1hub",
                "handle": handle,
                "input_size": list(input_size),
                "feature_dim": feature_dim,
                "fingerprint": fingerprint_saved_model(staging),
                "converter_version": CONVERTER_VERSION,
            }
            (staging / METADATA_FILENAME).write_text(json.dumps(metadata, indent=2), "utf-8")
            os.chmod(staging, 0o755)
            _fsync_tree(staging)
            _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metadata


def _inspect_saved_model(handle: str, path: pathlib.Path) -> tuple[tuple[int, int], int]:
    """Input (height, width) and feature width, from the serving signature if it is static,
    else from ``__call__``'s input signature (default 224x224) and a one-image probe call."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except DecodeError as exc:
        raise ModuleError(f"module {handle!r}: corrupt saved_model.pb ({exc})") from None
    if not proto.meta_graphs:
        raise ModuleError(f"module {handle!r}: saved_model.pb has no graph")
    meta_graph = proto.meta_graphs[0]
    nodes = meta_graph.object_graph_def.nodes
    if not nodes or not any(child.local_name == "__call__" for child in nodes[0].children):
        raise ModuleError(
            f"module {handle!r} has no __call__: not a TF2 image feature-vector SavedModel"
        )
    input_size, feature_dim = None, None
    signature = meta_graph.signature_def.get("serving_default")
    if signature is not None and len(signature.inputs) == 1 and len(signature.outputs) == 1:
        (in_info,) = signature.inputs.values()
        (out_info,) = signature.outputs.values()
        in_dims = [d.size for d in in_info.tensor_shape.dim]
        out_dims = [d.size for d in out_info.tensor_shape.dim]
        if len(in_dims) == 4 and in_dims[1] > 0 and in_dims[2] > 0:
            input_size = (in_dims[1], in_dims[2])
        if len(out_dims) == 2 and out_dims[1] > 0:
            feature_dim = out_dims[1]
    if input_size is not None and feature_dim is not None:
        return input_size, feature_dim
    return _probe_saved_model(handle, path, input_size)


def _probe_saved_model(
    handle: str, path: pathlib.Path, input_size: tuple[int, int] | None
) -> tuple[tuple[int, int], int]:
    import tensorflow as tf

    obj = tf.saved_model.load(os.fspath(path))
    if input_size is None:
        input_size = DEFAULT_INPUT_SIZE
        for function in getattr(obj.__call__, "concrete_functions", []):
            args = function.structured_input_signature[0]
            shape = args[0].shape if args and isinstance(args[0], tf.TensorSpec) else None
            if shape is not None and shape.rank == 4 and shape[1] and shape[2]:
                input_size = (int(shape[1]), int(shape[2]))
                break
    try:
        output = obj(tf.zeros([1, *input_size, 3], tf.float32))
    except Exception as exc:  # the module's own failure: report it in one line
        raise ModuleError(f"module {handle!r} fails on a {input_size} image: {exc}") from None
    shape = getattr(output, "shape", None)
    if shape is None or shape.rank != 2:
        raise ModuleError(f"module {handle!r} returns {shape}, not a [batch, features] tensor")
    return input_size, int(shape[1])


# ----------------------------------------------------------------------------- fingerprints


def _sha256_files(paths: tuple[pathlib.Path, ...]) -> str:
    """One file's sha256, or for several a sha256 of theirs in order."""
    digests = [_sha256_file(path) for path in paths]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256(" ".join(digests).encode()).hexdigest()


def _sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_FINGERPRINTS: dict[tuple[Any, ...], str] = {}


def fingerprint_saved_model(path: str | os.PathLike[str]) -> str:
    """sha256 over ``saved_model.pb`` and ``variables/*``: sorted relative names, sizes, bytes.

    Memoised per process on the files' names, sizes and modification times.
    """
    root = pathlib.Path(path)
    files = [root / "saved_model.pb"]
    variables = root / "variables"
    if variables.is_dir():
        files += sorted(p for p in variables.rglob("*") if p.is_file())
    entries = []
    for file in files:
        stat = file.stat()
        entries.append((file.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    key = (os.fspath(root.resolve()), tuple(entries))
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    digest = hashlib.sha256()
    for file, (relative, size, _) in zip(files, entries, strict=True):
        digest.update(relative.encode("utf-8") + b"\0" + struct.pack("<Q", size))
        with open(file, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
    _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


def _converted_module(handle: str, target: pathlib.Path, metadata: dict) -> ImageModule:
    """The ImageModule of a conversion in the module cache, from its metadata."""
    return ImageModule(
        handle=handle,
        path=target,
        input_size=(int(metadata["input_size"][0]), int(metadata["input_size"][1])),
        feature_dim=int(metadata["feature_dim"]),
        fingerprint=str(metadata["fingerprint"]),
    )
