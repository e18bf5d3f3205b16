"""Shared fixtures: generated images, a copy of the bundled example, CLI runners."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(__file__).resolve().parent / "data"


def _test_photos() -> Path:
    """A folder of the example photos that the tests use: the 79 listed in
    tests/data/test_photos.txt (the example's first version, on which the tests' figures were
    set; the README's example has more). Built once per content, atomically, in the temp dir."""
    names = (DATA_DIR / "test_photos.txt").read_text().split()
    source = ROOT / "examples" / "flower_photos"
    tag = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"retrain-test-photos-{tag}"
    if not folder.is_dir():
        staging = Path(tempfile.mkdtemp(prefix="retrain-test-photos-"))
        for name in names:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, staging / name)
        try:
            staging.rename(folder)
        except OSError:  # another session made it first
            shutil.rmtree(staging)
    return folder


EXAMPLE_DIR = _test_photos()


# Test workers (pytest-xdist's `-n auto`, set in pyproject.toml): many tests wait on a child
# `retrain` process or on TensorFlow's single-threaded import, so two share two cores well
# (CI on 2 cores: 1,054 -> 677 s); more than four would hold several GB each for little gain.
MAX_TEST_WORKERS = 4


def pytest_xdist_auto_num_workers(config) -> int:
    return max(2, min(len(os.sched_getaffinity(0)), MAX_TEST_WORKERS))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest(tmp_path_factory):
    """Child processes put their temporary files in pytest's own (rotated) folder, not /tmp:
    runs the tests kill on purpose cannot clean up (TensorFlow's autograph files, for one)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))
        yield


def retrain_args(image_dir: Path, out: Path, *extra: str, steps: int = 300) -> list[str]:
    """argv for a `retrain` run on image_dir with every output under `out`."""
    return [
        "retrain",
        f"--image_dir={image_dir}",
        f"--bottleneck_dir={out / 'bottlenecks'}",
        f"--summaries_dir={out / 'logs'}",
        f"--output_graph={out / 'graph.pb'}",
        f"--output_labels={out / 'labels.txt'}",
        f"--metrics_json={out / 'metrics.json'}",
        f"--how_many_training_steps={steps}",
        *extra,
    ]


def write_image(path: Path, size=(64, 48), color=(200, 30, 30), fmt=None, mode="RGB") -> Path:
    """A small real image with a gradient, so that it is not trivially compressible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    ramp = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]
    pixels = (np.array(color, np.uint16)[None, None, :] + ramp) % 256
    image = Image.fromarray(np.broadcast_to(pixels, (h, w, 3)).astype(np.uint8))
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


def example_subset(target: Path, per_class: int = 6, labels=("daisy", "roses")) -> Path:
    """The first `per_class` example photos of each of `labels`, copied into `target`: the
    smallest real set that fills every split."""
    for label in labels:
        (target / label).mkdir(parents=True)
        for photo in sorted((EXAMPLE_DIR / label).iterdir())[:per_class]:
            shutil.copy(photo, target / label)
    return target


@pytest.fixture
def example_copy(tmp_path: Path) -> Path:
    """A private copy of the bundled example photos."""
    target = tmp_path / "flower_photos"
    shutil.copytree(EXAMPLE_DIR, target)
    return target
