"""Tests of retrain.models.module_cache: the cache's root and the exact names of what it holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from retrain.models import module_cache
from retrain.models.module_cache import (
    cache_root,
    converted_module_dir,
    default_cache_dir,
    frozen_module_path,
    tflite_model_path,
    tflite_verified_path,
)

ROOT = Path(__file__).resolve().parent.parent
FINGERPRINT = "ab" * 32


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.setenv("RETRAIN_CACHE_DIR", "~/elsewhere")
    assert default_cache_dir() == Path.home() / "elsewhere"
    monkeypatch.setenv("RETRAIN_CACHE_DIR", "")
    assert default_cache_dir() == Path.home() / ".cache" / "retrain"
    monkeypatch.delenv("RETRAIN_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "retrain"


def test_cache_root_takes_an_explicit_folder_else_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root(None) == cache_root("") == cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    assert cache_root(str(tmp_path / "given")) == tmp_path / "given"
    assert cache_root("~/given") == Path.home() / "given"
    assert cache_root(Path("~/given")) == Path.home() / "given"


def test_layout_keeps_todays_names(tmp_path):
    """Existing caches stay valid only while these names do not change."""
    weights_sha256 = "579344248a93" + "0" * 52
    assert converted_module_dir(tmp_path, "efficientnet_lite0", weights_sha256) == (
        tmp_path / "modules" / "efficientnet_lite0-579344248a93-v1"
    )
    assert (
        tflite_model_path(tmp_path, FINGERPRINT) == tmp_path / "tflite" / f"{FINGERPRINT}-v1.tflite"
    )
    assert tflite_verified_path(tmp_path, FINGERPRINT) == (
        tmp_path / "tflite" / f"{FINGERPRINT}-v1.tflite.verified"
    )
    assert frozen_module_path(tmp_path, FINGERPRINT) == tmp_path / "frozen" / f"{FINGERPRINT}-v1.pb"


def test_every_path_follows_the_root(monkeypatch, tmp_path):
    monkeypatch.setenv("RETRAIN_CACHE_DIR", str(tmp_path))
    paths = [
        converted_module_dir(None, "m", "0" * 64),
        tflite_model_path(None, FINGERPRINT),
        tflite_verified_path(None, FINGERPRINT),
        frozen_module_path("", FINGERPRINT),
    ]
    assert [p.relative_to(tmp_path).parts[0] for p in paths] == [
        "modules",
        "tflite",
        "tflite",
        "frozen",
    ]


def test_a_version_bump_renames_its_kind_only(monkeypatch, tmp_path):
    before = tflite_model_path(tmp_path, FINGERPRINT), frozen_module_path(tmp_path, FINGERPRINT)
    monkeypatch.setattr(module_cache, "TFLITE_CONVERSION_VERSION", 2)
    after = tflite_model_path(tmp_path, FINGERPRINT), frozen_module_path(tmp_path, FINGERPRINT)
    assert after[0].name == f"{FINGERPRINT}-v2.tflite" and after[0] != before[0]
    assert after[1] == before[1]


def test_importing_the_layout_and_the_tflite_wrapper_imports_no_tensorflow():
    code = (
        "import sys, retrain.models.module_cache, retrain.models.tflite\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
