"""The audit of the photos (`retrain --audit`): suspect labels, duplicates and outliers found
on built folders, and none on a clean one."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrain
from retrain.cli import retrain as cli
from retrain.config import (
    AuditConfig,
    CacheConfig,
    DataConfig,
    HeadTrainingConfig,
    ModuleConfig,
    RetrainConfig,
)
from tests.fault_tools import save_tiny_module

pytest.importorskip("cleanlab")
pytest.importorskip("faiss")


def photo(path: Path, main_channel: int, seed: int) -> Path:
    """A 224x224 image of 4x4 random cells, bright in `main_channel` (0 red, 1 green, 2 blue)."""
    rng = np.random.default_rng(seed)
    cells = rng.uniform(0.0, 0.35, (4, 4, 3))
    cells[..., main_channel] = rng.uniform(0.5, 1.0, (4, 4))
    pixels = np.kron(cells, np.ones((56, 56, 1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "module"
    save_tiny_module(path)
    return path


def clean_folder(root: Path, count: int = 20) -> Path:
    for i in range(count):
        photo(root / "red" / f"r{i}.png", 0, seed=i)
        photo(root / "blue" / f"b{i}.png", 2, seed=100 + i)
    return root


def audit_config(image_dir: Path, out: Path, tiny_module: Path) -> RetrainConfig:
    return RetrainConfig(
        image_dir=str(image_dir),
        data=DataConfig(testing_percentage=20, validation_percentage=20),
        module=ModuleConfig(handle=str(tiny_module), extraction_backend="tensorflow"),
        cache=CacheConfig(bottleneck_dir=str(out / "bottlenecks")),
        training=HeadTrainingConfig(how_many_training_steps=200, learning_rate=0.1),
        audit=AuditConfig(output_dir=str(out / "audit"), duplicate_similarity=0.999),
    )


def test_planted_problems_are_found(tmp_path, tiny_module):
    root = clean_folder(tmp_path / "images")
    photo(root / "blue" / "filed_wrong.png", 0, seed=999)  # a red photo under blue
    shutil.copy(root / "red" / "r3.png", root / "blue" / "copy_of_r3.png")  # two classes
    photo(root / "red" / "off_topic.png", 1, seed=7)  # green: neither class
    report = retrain.audit_photos(audit_config(root, tmp_path, tiny_module))

    top = {Path(row["path"]).name for row in report.suspects[:3]}
    assert "filed_wrong.png" in top
    wrong = next(r for r in report.suspects if r["path"].endswith("filed_wrong.png"))
    assert (wrong["label"], wrong["expected"]) == ("blue", "red") and wrong["p_expected"] > 0.5
    (copy,) = [r for r in report.duplicates if r["finding"] == "identical file"]
    assert {Path(copy["path_a"]).name, Path(copy["path_b"]).name} == {"r3.png", "copy_of_r3.png"}
    assert copy["label_a"] != copy["label_b"] and copy["similarity"] == 1.0
    assert [Path(r["path"]).name for r in report.outliers][:1] == ["off_topic.png"]
    files = {kind: Path(path) for kind, path in report.files.items()}
    assert set(files) == {"suspects", "duplicates", "outliers"}
    assert files["suspects"].read_text().startswith("path,finding,label,expected,p_label")
    assert len(files["duplicates"].read_text().splitlines()) == 1 + len(report.duplicates)


def test_a_clean_folder_gives_no_false_alarms(tmp_path, tiny_module):
    report = retrain.audit_photos(
        audit_config(clean_folder(tmp_path / "images"), tmp_path, tiny_module)
    )
    assert report.images == 40
    assert len(report.suspects) <= 2  # at most 5%
    assert report.duplicates == [] and report.outliers == []


def test_command_line_audit_writes_csvs_and_metrics(tmp_path, tiny_module):
    root = clean_folder(tmp_path / "images", count=10)
    shutil.copy(root / "red" / "r1.png", root / "red" / "r1_again.png")
    status = cli.main(
        [
            "retrain",
            "--audit",
            f"--image_dir={root}",
            f"--tfhub_module={tiny_module}",
            "--extraction_backend=tensorflow",
            f"--bottleneck_dir={tmp_path / 'b'}",
            f"--audit_dir={tmp_path / 'audit'}",
            f"--metrics_json={tmp_path / 'metrics.json'}",
            f"--output_graph={tmp_path / 'graph.pb'}",
            "--how_many_training_steps=100",
        ]
    )
    assert status == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["audit"]
    assert metrics["images"] == 21 and metrics["duplicates"] >= 1
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == [
        "duplicates.csv",
        "outliers.csv",
        "suspects.csv",
    ]
    assert not (tmp_path / "graph.pb").exists()  # an audit trains and exports nothing


def test_a_training_run_hints_at_identical_files_across_splits(tmp_path, tiny_module, caplog):
    import logging

    from retrain.data.scan import split_for_file

    root = clean_folder(tmp_path / "images", count=10)
    source = root / "red" / "r0.png"
    twin = next(
        f"twin{i}.png"
        for i in range(100)
        if split_for_file(f"twin{i}.png", 20, 20) != split_for_file("r0.png", 20, 20)
    )
    shutil.copy(source, root / "red" / twin)
    caplog.set_level(logging.INFO, logger="retrain")
    retrain.run(audit_config(root, tmp_path, tiny_module))
    assert any("identical files sit in different splits" in r.getMessage() for r in caplog.records)


def test_multi_label_data_is_audited_per_label(tmp_path, tiny_module):
    root = clean_folder(tmp_path / "images", count=15)
    photo(root / "odd" / "filed_wrong.png", 0, seed=999)  # red, but the CSV says blue only
    rows = ["path,red,blue"]
    rows += [f"red/r{i}.png,1,0" for i in range(15)] + [f"blue/b{i}.png,0,1" for i in range(15)]
    rows.append("odd/filed_wrong.png,0,1")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    config = audit_config(root, tmp_path, tiny_module)
    data = DataConfig(testing_percentage=20, validation_percentage=20)
    config = dataclasses.replace(
        config, data=dataclasses.replace(data, labels_csv=str(tmp_path / "labels.csv"))
    )
    report = retrain.audit_photos(config)

    assert report.images == 31
    doubted = [r for r in report.suspects if r["path"].endswith("filed_wrong.png")]
    assert doubted and report.suspects.index(doubted[0]) < 3
    assert {(r["label"], r["expected"]) for r in doubted} <= {
        ("not red", "red"),
        ("blue", "not blue"),
    }
    assert all(r["p_expected"] > 0.5 for r in doubted)
    assert len(report.suspects) <= 2 + 2 * len(doubted)  # few false alarms among 60 labels
    assert report.outliers == []


def test_the_approximate_index_finds_what_the_exact_one_finds(tmp_path, monkeypatch):
    """Beyond EXACT_SEARCH_ROWS the index is approximate (PCA, inverted lists, 8-bit codes),
    its candidates checked on the exact vectors: on 600 vectors with 12 near copies it
    reports the same pairs and nearest-centroid similarities as the exact index."""
    from retrain.bottlenecks.cache import BottleneckCache, key_array
    from retrain.bottlenecks.splits import FeatureSplit
    from retrain.heads.head import SoftmaxHead
    from retrain.reporting import audit

    rng = np.random.default_rng(0)
    n, dim = 600, 64
    labels = np.arange(n) % 3
    basis = rng.normal(size=(8, dim))  # a decaying spectrum, as image features have
    x = np.abs(rng.normal(size=(3, dim))[labels] + rng.normal(size=(n, 8)) @ basis * 0.3)
    x += np.abs(rng.normal(size=(n, dim))) * 0.3
    x[49::50] = x[48::50] + rng.normal(size=(12, dim)) * 0.05
    cache = BottleneckCache(tmp_path, "m", dim)
    keys = [i.to_bytes(16, "little") for i in range(n)]
    with cache.writer() as writer:
        writer.add_many(zip(keys, keys), x.astype(np.float32))
    features = FeatureSplit(cache, cache.locate(key_array(keys)), labels)

    def search():
        index = audit._build_index(features, seed=0)
        centroids = audit._centroids(features, index, SoftmaxHead(3))
        return index.approximate, *audit._search(features, index, centroids, 0.95, SoftmaxHead(3))

    exact_kind, exact_pairs, exact_nearest = search()
    monkeypatch.setattr(audit, "EXACT_SEARCH_ROWS", 100)
    monkeypatch.setattr(audit, "LIST_ROWS", 64)
    monkeypatch.setattr(audit, "SEARCH_DIMS", 16)
    approximate_kind, pairs, nearest = search()

    assert (exact_kind, approximate_kind) == (False, True)
    assert {(i, i + 1) for i in range(48, n, 50)} <= set(exact_pairs)
    assert sorted(pairs) == sorted(exact_pairs)
    assert np.allclose([pairs[p] for p in exact_pairs], list(exact_pairs.values()), atol=1e-5)
    assert np.allclose(nearest.nearest, exact_nearest.nearest, atol=1e-6)
    assert np.allclose(nearest.own, exact_nearest.own, atol=1e-6)


def test_outliers_are_judged_by_their_own_class_spread():
    """A tight class and a loose one: the photo a little off the tight class is an outlier
    though the loose class's ordinary photos are further from their centroid; a photo close
    to another class (a suspect label) is not; scores are in each class's own spreads."""
    from retrain.reporting import audit

    rng = np.random.default_rng(0)
    tight = 0.95 + rng.normal(size=300) * 0.005
    loose = 0.70 + rng.normal(size=300) * 0.05
    own = np.r_[tight, loose, 0.88, 0.50, 0.20]  # off the tight class; near the other; far
    nearest = own.copy()
    nearest[601] = 0.94  # its nearest centroid is the tight class's, not its own
    group = np.r_[np.zeros(300), np.ones(300), 0, 1, 1].astype(np.int64)
    closeness = audit._Closeness(nearest.astype(np.float32), own.astype(np.float32), group)
    scores = audit.outlier_scores(closeness)
    flagged = np.flatnonzero(scores > audit.OUTLIER_Z)
    assert {600, 602} <= set(flagged) and 601 not in flagged
    assert len(flagged) <= 2 + 6  # the tails of 600 normal draws give a few at most
    assert list(np.argsort(-scores)[:2]) == [600, 602]  # 14 and 10 spreads under the median


@pytest.mark.slow
def test_the_bundled_flowers_give_their_odd_photos(tmp_path):
    """The 200 example photos with the real module: a count a person can look through, the
    vaulted ceiling filed under roses among them (2026-12-07: 10 outliers, it first)."""
    from tests.conftest import ROOT

    config = RetrainConfig(
        image_dir=str(ROOT / "examples" / "flower_photos"),
        cache=CacheConfig(bottleneck_dir=str(tmp_path / "bottlenecks")),
        audit=AuditConfig(output_dir=str(tmp_path / "audit")),
    )
    report = retrain.audit_photos(config)
    assert 3 <= len(report.outliers) <= 20
    names = [Path(row["path"]).name for row in report.outliers[:3]]
    assert "17953368844_be3d18cf30_m.jpg" in names
