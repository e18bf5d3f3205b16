"""retrain.bottlenecks.beam: the Beam extraction as a library, driven by a RetrainConfig."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrain.config import (
    CacheConfig,
    DataConfig,
    DistortionConfig,
    HeadTrainingConfig,
    ModuleConfig,
    RetrainConfig,
)
from retrain.errors import ConfigError
from tests.conftest import ROOT, write_image
from tests.fault_tools import save_tiny_module

COMMAND_LINE = (
    "argparse",
    "absl",
    "retrain.cli.flags",
    "retrain.cli.retrain",
    "retrain.cli.beam_extract",
)


def imported_names(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (`from a import b` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", ["beam.py", "beam_transforms.py"])
def test_imports_only_the_library(module):
    """No argparse, absl or command line module (Beam itself imports argparse and absl, so
    this reads the source rather than sys.modules)."""
    names = imported_names(ROOT / "retrain" / "bottlenecks" / module)
    assert not {n for n in names if n.split(".")[0] in COMMAND_LINE or n in COMMAND_LINE}


def test_importing_it_imports_no_tensorflow_and_no_command_line():
    code = (
        "import sys, retrain.bottlenecks.beam; "
        "print(sorted(m for m in ('tensorflow', 'retrain.cli.flags', 'retrain.cli.retrain') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def config_for(image_dir: Path, bottleneck_dir: Path | str | None, **module) -> RetrainConfig:
    return RetrainConfig(
        image_dir=str(image_dir),
        module=ModuleConfig(**module),
        cache=CacheConfig(bottleneck_dir=None if bottleneck_dir is None else str(bottleneck_dir)),
    )


@pytest.mark.parametrize(
    ("config", "settings", "field", "words"),
    [
        (dict(bottleneck_dir="gs://bucket/cache"), {}, "cache.bottleneck_dir", "is a URL"),
        (dict(bottleneck_dir="b", cache_dir="s3://b/m"), {}, "module.cache_dir", "is a URL"),
        (dict(bottleneck_dir=None), {}, "cache.bottleneck_dir", "is required"),
        (dict(bottleneck_dir="b", extraction_batch_size=0), {}, "module.extraction_batch_size", ""),
        (
            dict(bottleneck_dir="b", extraction_backend="tflite_int8"),
            {},
            "module.extraction_backend",
            "is not offered by the Beam pipeline",
        ),
        (dict(bottleneck_dir="b"), {"shard_rows": 0}, "shard_rows", "must be positive"),
        (dict(bottleneck_dir="b"), {"num_threads": -2}, "num_threads", "or positive, got -2"),
        (dict(bottleneck_dir="b"), {"summary_json": "/proc/version/x"}, "summary_json", "write"),
    ],
)
def test_validate_names_the_setting(tmp_path, config, settings, field, words):
    from retrain.bottlenecks.beam import BeamSettings, validate

    config = dict(config)
    bottleneck_dir = config.pop("bottleneck_dir")
    if bottleneck_dir == "b":
        bottleneck_dir = tmp_path / "b"
    with pytest.raises(ConfigError) as info:
        validate(config_for(tmp_path, bottleneck_dir, **config), BeamSettings(**settings))
    assert info.value.fields == (field,)
    assert str(info.value).startswith(field) and words in str(info.value)


def write_photos(image_dir: Path, per_class: int) -> None:
    """`per_class` red and blue PNGs, and an undecodable red/broken.jpg."""
    for i in range(per_class):
        write_image(image_dir / "red" / f"r{i}.png", color=(200 + i, 20, 20))
        write_image(image_dir / "blue" / f"b{i}.png", color=(20, 20, 200 + i))
    (image_dir / "red" / "broken.jpg").write_bytes(b"not a JPEG")


def test_extract_runs_the_direct_runner_from_a_config(tmp_path):
    """A notebook's call: a RetrainConfig in, the summary out, the cache filled; again, and
    everything is found cached (the broken file is tried and skipped again)."""
    pytest.importorskip("apache_beam")
    from apache_beam.options.pipeline_options import PipelineOptions

    from retrain.bottlenecks.beam import BeamSettings, extract
    from retrain.bottlenecks.stage import load_module, open_cache

    module_dir = tmp_path / "module"
    save_tiny_module(module_dir)
    write_photos(tmp_path / "images", per_class=3)
    config = config_for(
        tmp_path / "images",
        tmp_path / "bottlenecks",
        handle=str(module_dir),
        extraction_backend="tensorflow",
        extraction_batch_size=4,
    )
    summary_json = tmp_path / "summary.json"
    options = PipelineOptions(["--runner=DirectRunner"])
    summary = extract(config, options, BeamSettings(summary_json=str(summary_json)))
    counts = ("images", "computed", "cached", "failed")
    assert [summary[name] for name in counts] == [7, 6, 0, 1]
    assert "copies" not in summary  # none asked for
    assert json.loads(summary_json.read_text()) == summary
    cache = open_cache(tmp_path / "bottlenecks", load_module(config.module))
    assert len(cache) == 6 and summary["cache_folder"] == str(cache.folder)

    again = extract(config)  # default options: the DirectRunner
    assert [again[name] for name in counts] == [7, 0, 6, 1]


# 20% validation, 20% testing: of write_photos(6), b0 b1 b3 r0 r3 r4 and broken.jpg train.
SPLIT = DataConfig(testing_percentage=20, validation_percentage=20)
DISTORTIONS = DistortionConfig(
    True, random_crop=10, random_scale=20, random_brightness=30, copies=2
)
TRAINING = ("b0.png", "b1.png", "b3.png", "r0.png", "r3.png", "r4.png")


def copies_config(image_dir: Path, bottleneck_dir: Path, module_dir: Path) -> RetrainConfig:
    return RetrainConfig(
        image_dir=str(image_dir),
        data=SPLIT,
        module=ModuleConfig(
            handle=str(module_dir), extraction_backend="tensorflow", extraction_batch_size=4
        ),
        cache=CacheConfig(bottleneck_dir=str(bottleneck_dir)),
        training=HeadTrainingConfig(how_many_training_steps=5, train_batch_size=8),
        distortions=DISTORTIONS,
    )


def cached_vectors(config: RetrainConfig, keys: list[bytes]) -> np.ndarray:
    """The vectors of content `keys` in `config`'s cache folder; every one must be there."""
    from retrain.bottlenecks.cache import key_array
    from retrain.bottlenecks.stage import load_module, open_cache

    cache = open_cache(config.cache.bottleneck_dir, load_module(config.module))
    locations = cache.locate(key_array(keys), by="content")
    assert (locations["shard"] >= 0).all()
    vectors, ok = cache.read(locations)
    assert ok.all()
    return vectors


def test_copies_leave_retrain_nothing_to_compute(tmp_path):
    """With distortions.copies, the pipeline also caches the distorted copies of the training
    images (only those) under retrain's keys; retrain with the same settings then computes
    nothing, and the vectors are those retrain computes itself."""
    pytest.importorskip("apache_beam")
    import retrain
    from retrain.bottlenecks import distort
    from retrain.bottlenecks.beam import extract
    from retrain.bottlenecks.cache import file_content_key

    module_dir = tmp_path / "module"
    save_tiny_module(module_dir)
    image_dir = tmp_path / "images"
    write_photos(image_dir, per_class=6)
    config = copies_config(image_dir, tmp_path / "bottlenecks", module_dir)

    summary = extract(config)
    assert [summary[name] for name in ("images", "computed", "cached", "failed")] == [13, 12, 0, 1]
    total = DISTORTIONS.copies * (len(TRAINING) + 1)  # broken.jpg's copies fail
    assert summary["copies"] == {
        "per_image": 2,
        "total": total,
        "cached": 0,
        "computed": total - 2,
        "failed": 2,
    }

    result = retrain.run(config)
    assert (result.bottlenecks_computed, result.distortions["computed"]) == (0, 0)
    assert result.distortions["reused"] == total - 2

    reference = dataclasses.replace(config, cache=CacheConfig(str(tmp_path / "reference")))
    alone = retrain.run(reference)
    assert (alone.bottlenecks_computed, alone.distortions["computed"]) == (12, total - 2)
    photos = {p.name: file_content_key(p) for p in image_dir.rglob("*.png")}
    keys = list(photos.values())
    keys += [
        distort.copy_key(photos[name], DISTORTIONS, c)
        for name in TRAINING
        for c in range(DISTORTIONS.copies)
    ]
    np.testing.assert_allclose(
        cached_vectors(config, keys), cached_vectors(reference, keys), rtol=0, atol=1e-5
    )
    with_copies = cached_vectors(config, keys[len(photos) :])
    originals = cached_vectors(config, [photos[name] for name in TRAINING for _ in range(2)])
    assert np.abs(with_copies - originals).max(axis=1).min() > 1e-3  # distorted, every one

    again = extract(config)  # everything cached; broken.jpg and its copies fail again
    assert [again[name] for name in ("computed", "cached", "failed")] == [0, 12, 1]
    assert again["copies"] == {**summary["copies"], "cached": total - 2, "computed": 0}
