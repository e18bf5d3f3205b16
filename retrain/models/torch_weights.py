"""Read PyTorch *legacy* (pre-zip) ``.pth`` state dicts with numpy only, safely.

The legacy format (``torch.save(..., _use_new_zipfile_serialization=False)``) is a sequence of
pickles followed by raw storage bytes:

1. magic number ``0x1950a86a20f9469cfc6c``, 2. protocol version ``1001``, 3. a system-info dict,
4. the object (here an ``OrderedDict`` name -> tensor), 5. the sorted list of storage keys,
6. per key: an int64 element count followed by that many elements.

Tensors in pickle 4 are ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
calls whose storages are persistent ids ``('storage', StorageType, key, location, numel, view)``.
Every pickle is read with a restricted unpickler that only knows those few globals, so a crafted
file cannot run code. Strides are honoured (many converted conv kernels are non-contiguous).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LEGACY_MAGIC_NUMBER",
    "LEGACY_PROTOCOL_VERSION",
    "CorruptWeightsError",
    "UnsafeWeightsError",
    "WeightsError",
    "load_legacy_state_dict",
]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# numpy dtype (without byte order) of each torch storage class.
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",  # decoded to float32 after reading
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "UntypedStorage": "u1",
}


class WeightsError(ValueError):
    """A weights file that cannot be read."""


class UnsafeWeightsError(WeightsError):
    """The file references a Python global outside the small allow-list."""


class CorruptWeightsError(WeightsError):
    """The file is truncated, corrupt or not in PyTorch's legacy format."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> str:
        return _STORAGE_DTYPES[self.name]


@dataclass(frozen=True)
class _StorageRef:
    key: str
    storage_type: _StorageType
    numel: int
    view: tuple[int, int] | None  # (offset, size) into the root storage, for legacy views


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise CorruptWeightsError("tensor does not reference a storage")
    return _TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a legacy state dict needs."""

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeWeightsError(
            f"refusing to load weights: the file references the global '{module}.{name}', "
            "which is not allowed in a state dict"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CorruptWeightsError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise CorruptWeightsError(f"storage {key!r} has no storage type")
        view = None
        if view_metadata is not None:
            _view_key, view_offset, view_size = view_metadata
            view = (int(view_offset), int(view_size))
        return _StorageRef(str(key), storage_type, int(numel), view)


def _unpickle(stream: io.BytesIO, what: str, unpickler=_RestrictedUnpickler):
    try:
        return unpickler(stream).load()
    except WeightsError:
        raise
    except Exception as exc:  # any failure on untrusted bytes means a corrupt file
        raise CorruptWeightsError(f"cannot read the {what} ({type(exc).__name__}: {exc})") from None


def _read_storages(
    stream: io.BytesIO, keys: list[str], refs: Mapping[str, _StorageRef], byteorder: str
) -> dict[str, np.ndarray]:
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        ref = refs.get(key)
        if ref is None:
            raise CorruptWeightsError(f"storage {key!r} is listed but never referenced")
        header = stream.read(8)
        if len(header) != 8:
            raise CorruptWeightsError(f"file is truncated before storage {key!r}")
        (numel,) = struct.unpack(byteorder + "q", header)
        dtype = np.dtype(byteorder + ref.storage_type.dtype)
        if numel < 0:
            raise CorruptWeightsError(f"storage {key!r} has a negative size")
        data = stream.read(numel * dtype.itemsize)
        if len(data) != numel * dtype.itemsize:
            raise CorruptWeightsError(f"file is truncated inside storage {key!r}")
        array = np.frombuffer(data, dtype=dtype)
        if ref.storage_type.name == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        storages[key] = array.astype(array.dtype.newbyteorder("="), copy=False)
    missing = set(refs) - set(storages)
    if missing:
        raise CorruptWeightsError(f"storages {sorted(missing)[:5]} are referenced but missing")
    return storages


def _materialize(tensor: _TensorRef, storages: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    storage = storages[tensor.storage.key]
    if tensor.storage.view is not None:
        view_offset, view_size = tensor.storage.view
        storage = storage[view_offset : view_offset + view_size]
    if len(tensor.size) != len(tensor.stride) or any(s < 0 for s in tensor.size + tensor.stride):
        raise CorruptWeightsError(f"tensor {name!r} has an invalid size/stride")
    if any(s == 0 for s in tensor.size):
        return np.zeros(tensor.size, dtype=storage.dtype)
    extent = zip(tensor.size, tensor.stride, strict=True)
    last = tensor.offset + sum((n - 1) * st for n, st in extent)
    if tensor.offset < 0 or last >= storage.size:
        raise CorruptWeightsError(f"tensor {name!r} reaches past the end of its storage")
    base = storage[tensor.offset :]
    strides = tuple(st * storage.itemsize for st in tensor.stride)
    return np.lib.stride_tricks.as_strided(base, shape=tensor.size, strides=strides).copy()


def load_legacy_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a legacy-format PyTorch state dict into ``{name: numpy array}`` (PyTorch layouts).

    Raises ``UnsafeWeightsError`` if the file references any global outside the allow-list and
    ``CorruptWeightsError`` (both ``ValueError``) if it is truncated or not in the legacy format.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return _parse(raw)
    except CorruptWeightsError as exc:
        raise CorruptWeightsError(f"{os.fspath(path)}: {exc}") from None


def _parse(raw: bytes) -> dict[str, np.ndarray]:
    if raw[:4] == b"PK\x03\x04":
        raise CorruptWeightsError("PyTorch zip serialization is not supported, only the legacy one")
    stream = io.BytesIO(raw)
    if _unpickle(stream, "magic number") != LEGACY_MAGIC_NUMBER:
        raise CorruptWeightsError("not a PyTorch legacy weights file (bad magic number)")
    protocol = _unpickle(stream, "protocol version")
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise CorruptWeightsError(f"unsupported protocol version {protocol!r}")
    sys_info = _unpickle(stream, "system info")
    little_endian = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    byteorder = "<" if little_endian else ">"

    refs: dict[str, _StorageRef] = {}

    class _Recording(_RestrictedUnpickler):
        def persistent_load(self, pid):
            ref = super().persistent_load(pid)
            refs.setdefault(ref.key, ref)
            return ref

    obj = _unpickle(stream, "state dict", _Recording)
    if not isinstance(obj, Mapping):
        raise CorruptWeightsError("the pickled object is not a state dict")
    state: dict[str, _TensorRef] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise CorruptWeightsError(f"state dict entry {name!r:.60} is not a tensor")
        state[name] = value
    keys = _unpickle(stream, "storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CorruptWeightsError("malformed storage key list")
    storages = _read_storages(stream, keys, refs, byteorder)
    return {name: _materialize(tensor, storages, name) for name, tensor in state.items()}
