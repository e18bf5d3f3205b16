"""What a run reports about its data is the same whether its vectors were computed or read
from the cache (issue 36, item 7)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import retrain
from retrain.data.scan import split_for_file
from tests.conftest import write_image
from tests.fault_tools import save_tiny_module


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "module"
    save_tiny_module(path)
    return path


def test_findings_are_the_same_from_an_empty_and_a_filled_cache(tmp_path, tiny_module):
    root = tmp_path / "images"
    for i in range(12):
        write_image(root / "red" / f"r{i}.png", color=(200, 20 + 9 * i, 20))
        write_image(root / "blue" / f"b{i}.png", color=(20, 20 + 9 * i, 200))
    # A copy of r0.png under a name whose hash puts it in another split.
    twin = next(
        name
        for name in (f"twin{i}.png" for i in range(100))
        if split_for_file(name, 20, 20) != split_for_file("r0.png", 20, 20)
    )
    shutil.copy(root / "red" / "r0.png", root / "blue" / twin)
    config = retrain.RetrainConfig(
        image_dir=str(root),
        data=retrain.DataConfig(20, 20),
        module=retrain.ModuleConfig(handle=str(tiny_module), extraction_backend="tensorflow"),
        cache=retrain.CacheConfig(bottleneck_dir=str(tmp_path / "cache")),
        training=retrain.HeadTrainingConfig(how_many_training_steps=20),
    )

    empty, filled = retrain.run(config), retrain.run(config)

    assert (empty.bottlenecks_computed, filled.bottlenecks_computed) == (25, 0)
    found = [[(f.code, f.message, f.numbers) for f in r.health] for r in (empty, filled)]
    assert found[0] == found[1]
    duplicates = [f for f in filled.health if f.code == "duplicates_across_splits"]
    assert [f.numbers for f in duplicates] == [{"pairs": 1}]
