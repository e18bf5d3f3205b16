"""retrain.beam_pipeline: the Beam extraction as a library, driven by a RetrainConfig."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from retrain.config import CacheConfig, ModuleConfig, RetrainConfig
from retrain.errors import ConfigError
from tests.conftest import ROOT, write_image
from tests.fault_tools import save_tiny_module

COMMAND_LINE = ("argparse", "absl", "retrain.flags", "retrain.cli", "retrain.beam_extract")


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


def test_imports_only_the_library():
    """No argparse, absl or command line module (Beam itself imports argparse and absl, so
    this reads the source rather than sys.modules)."""
    names = imported_names(ROOT / "retrain" / "beam_pipeline.py")
    assert not {n for n in names if n.split(".")[0] in COMMAND_LINE or n in COMMAND_LINE}


def test_importing_it_imports_no_tensorflow_and_no_command_line():
    code = (
        "import sys, retrain.beam_pipeline; "
        "print(sorted(m for m in ('tensorflow', 'retrain.flags', 'retrain.cli') "
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
        (dict(bottleneck_dir="b"), {"shard_rows": 0}, "shard_rows", "must be positive"),
        (dict(bottleneck_dir="b"), {"num_threads": -2}, "num_threads", "or positive, got -2"),
        (dict(bottleneck_dir="b"), {"summary_json": "/proc/version/x"}, "summary_json", "write"),
    ],
)
def test_validate_names_the_setting(tmp_path, config, settings, field, words):
    from retrain.beam_pipeline import BeamSettings, validate

    config = dict(config)
    bottleneck_dir = config.pop("bottleneck_dir")
    if bottleneck_dir == "b":
        bottleneck_dir = tmp_path / "b"
    with pytest.raises(ConfigError) as info:
        validate(config_for(tmp_path, bottleneck_dir, **config), BeamSettings(**settings))
    assert info.value.fields == (field,)
    assert str(info.value).startswith(field) and words in str(info.value)


def test_extract_runs_the_direct_runner_from_a_config(tmp_path):
    """A notebook's call: a RetrainConfig in, the summary out, the cache filled; again, and
    everything is found cached (the broken file is tried and skipped again)."""
    pytest.importorskip("apache_beam")
    from apache_beam.options.pipeline_options import PipelineOptions

    from retrain.beam_pipeline import BeamSettings, extract
    from retrain.bottlenecks import load_module, open_cache

    module_dir = tmp_path / "module"
    save_tiny_module(module_dir)
    for i in range(3):
        write_image(tmp_path / "images" / "red" / f"r{i}.png", color=(200 + i, 20, 20))
        write_image(tmp_path / "images" / "blue" / f"b{i}.png", color=(20, 20, 200 + i))
    (tmp_path / "images" / "red" / "broken.jpg").write_bytes(b"not a JPEG")
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
    assert json.loads(summary_json.read_text()) == summary
    cache = open_cache(tmp_path / "bottlenecks", load_module(config.module))
    assert len(cache) == 6 and summary["cache_folder"] == str(cache.folder)

    again = extract(config)  # default options: the DirectRunner
    assert [again[name] for name in counts] == [7, 0, 6, 1]
