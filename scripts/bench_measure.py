"""What the benchmark suites measure with (scripts/benchmark.py, scripts/side_by_side.py):
generated photos, batches of decoded images, rates and CPU time, and timed `retrain` runs with
each command's own peak RSS."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def generate_images(folder: Path, count: int, classes: int = 5, size=(320, 240)) -> Path:
    """Write `count` JPEG photos-like images (noise over colour gradients) in `classes` folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None]
    for i in range(count):
        label = i % classes
        base = np.array([(label * 50) % 255, (label * 90) % 255, (label * 130) % 255])
        pixels = base * ramp + rng.normal(0, 40, (h, w, 3))
        folder.joinpath(f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / f"class{label}" / f"img{i:07d}.jpg", quality=85
        )
    return folder


def _images_in(image_dir: Path) -> list[str]:
    return sorted(
        str(p) for p in image_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )


def _sample_batch(image_dir: Path, size: tuple[int, int], n: int = 32) -> np.ndarray:
    from retrain.data.decode import decode_image
    from retrain.data.preprocess import to_module_input

    files = _images_in(image_dir)
    files = (files * (n // max(len(files), 1) + 1))[:n]
    return np.stack([to_module_input(decode_image(p, size), size).numpy() for p in files])


def _rate(fn, batch: np.ndarray, repeats: int = 5) -> float:
    fn(batch)  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(batch)
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_ms_per_image(fn, images: int) -> float:
    """CPU time (all threads) that fn() spends per image, in milliseconds."""
    start = _cpu_seconds()
    fn()
    return 1000 * (_cpu_seconds() - start) / images


# Linux carries a process's peak RSS over exec(), so a command started by this process (often
# large: TensorFlow and a model loaded by an earlier suite) would report at least our RSS. This
# small Python process starts the command instead, times it and prints its figures on stdout.
_MEASURE = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout carries the figures alone
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    except OSError as err:
        print(f"{sys.argv[1]}: {err.strerror}", file=sys.stderr, flush=True)
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def timed_run(cmd: list[str], log: Path | None = None, cwd: Path | None = None) -> dict:
    """Run `cmd`, its stderr to `log` (else kept only for an error): wall seconds and its own
    peak RSS (wait4, from a small parent). Raises RuntimeError, with the end of stderr, if it
    fails."""
    with open(log, "w+") if log else tempfile.TemporaryFile("w+") as err:
        measure = [sys.executable, "-c", _MEASURE, *cmd]
        helper = subprocess.run(measure, stdout=subprocess.PIPE, stderr=err, cwd=cwd, text=True)
        wall, peak_kb, returncode = helper.stdout.split() or (0, 0, helper.returncode)
        if int(returncode) != 0:
            err.seek(0)
            tail = err.read()[-2000:]
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({returncode}):\n{tail}")
    return {"seconds": round(float(wall), 2), "peak_rss_mb": round(int(peak_kb) / 1024, 1)}


def retrain_command(
    image_dir: Path, work: Path, module: str, extra: Sequence[str] = ()
) -> list[str]:
    """A default `retrain` run of `module` on image_dir with every output under `work`, plus
    the flags `extra`."""
    retrain = shutil.which("retrain") or str(Path(sys.executable).with_name("retrain"))
    return [
        retrain,
        f"--image_dir={image_dir}",
        f"--bottleneck_dir={work / 'bottlenecks'}",
        f"--summaries_dir={work / 'logs'}",
        f"--output_graph={work / 'graph.pb'}",
        f"--output_labels={work / 'labels.txt'}",
        f"--metrics_json={work / 'metrics.json'}",
        f"--tfhub_module={module}",
        *extra,
    ]


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 2)
