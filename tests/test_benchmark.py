"""scripts/benchmark.py's measuring of commands: wall time and each command's own peak RSS."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import benchmark  # noqa: E402

ALLOCATE_200_MB = "import numpy; numpy.ones(200 * 2**20 // 8).sum()"


def test_peak_rss_is_the_commands_own_not_this_process():
    """Linux carries the peak RSS over exec(): started directly, a tiny command would report at
    least this process's 400 MB."""
    ballast = np.ones(400 * 2**20 // 8)  # touched, so resident
    small = benchmark.timed_run([sys.executable, "-c", "pass"])
    large = benchmark.timed_run([sys.executable, "-c", ALLOCATE_200_MB])
    assert ballast.sum() > 0
    assert small["peak_rss_mb"] < 100
    assert 200 < large["peak_rss_mb"] < 300
    assert 0 < small["seconds"] < large["seconds"] + 5


def test_runs_in_cwd_and_logs_stderr(tmp_path):
    log = tmp_path / "run.log"
    code = "import sys; open('made', 'w'); print('to the log', file=sys.stderr)"
    benchmark.timed_run([sys.executable, "-c", code], log=log, cwd=tmp_path)
    assert (tmp_path / "made").exists()
    assert log.read_text().strip() == "to the log"


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        ([sys.executable, "-c", "import sys; sys.exit('it broke')"], r"failed \(1\):\nit broke"),
        (["no-such-command-here"], r"failed \(127\):\nno-such-command-here: No such file"),
    ],
)
def test_a_failing_command_raises_with_its_stderr(cmd, expected):
    with pytest.raises(RuntimeError, match=expected):
        benchmark.timed_run(cmd)


def test_export_suite_measures_the_test_split_it_links(tmp_path):
    photos = tmp_path / "photos"
    for name in ("a", "b", "c"):
        (photos / "cats").mkdir(parents=True, exist_ok=True)
        (photos / "cats" / f"{name}.jpg").write_bytes(b"x" * 1024)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,label,split\n"
        f"{photos / 'cats' / 'a.jpg'},cats,testing\n"
        f"{photos / 'cats' / 'b.jpg'},cats,training\n"
        f"{photos / 'cats' / 'c.jpg'},cats,testing\n"
    )
    skipped = {str(photos / "cats" / "c.jpg")}
    folder = benchmark._test_split_folder(manifest, skipped, tmp_path / "test")
    assert [p.name for p in (folder / "cats").iterdir()] == ["a.jpg"]
    assert benchmark._size_mb(photos) == round(3 * 1024 / 2**20, 2)
