"""scripts/side_by_side.py: patching retrain.py, reading its log, judging the ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import side_by_side  # noqa: E402

# The lines of TF Hub's retrain.py (commit 0163eda) that the patches touch, verbatim.
RETRAIN_PY_EXCERPT = '''\
import numpy as np
import tensorflow as tf
import tensorflow_hub as hub

FLAGS = None

# The location where variable checkpoints will be stored.
CHECKPOINT_NAME = '/tmp/_retrain_checkpoint'


def create_module_graph(module_spec):
  """Creates a graph and loads Hub Module into it."""
  height, width = hub.get_expected_image_size(module_spec)
  with tf.Graph().as_default() as graph:
    resized_input_tensor = tf.placeholder(tf.float32, [None, height, width, 3])
    m = hub.Module(module_spec)
    bottleneck_tensor = m(resized_input_tensor)
  return graph, bottleneck_tensor, resized_input_tensor


def add_jpeg_decoding(module_spec):
  input_height, input_width = hub.get_expected_image_size(module_spec)
  input_depth = hub.get_num_image_channels(module_spec)


def add_input_distortions(module_spec):
  input_height, input_width = hub.get_expected_image_size(module_spec)
  input_depth = hub.get_num_image_channels(module_spec)


def main(_):
  module_spec = hub.load_module_spec(FLAGS.tfhub_module)
'''


def test_patch_leaves_no_hub_call_and_imports_the_frozen_module(tmp_path):
    graph = tmp_path / "module.pb"
    patched = side_by_side.patch_retrain_py(RETRAIN_PY_EXCERPT, graph, (224, 224))
    compile(patched, "retrain.py", "exec")
    code = [line.split("#")[0] for line in patched.splitlines()]
    assert not [line for line in code if "hub." in line or "tensorflow_hub" in line]
    assert "import tensorflow.compat.v1 as tf" in patched
    assert f"FROZEN_MODULE_GRAPH = {str(graph)!r}" in patched
    assert "module_spec = FROZEN_MODULE_GRAPH" in patched
    assert patched.count("input_height, input_width = MODULE_IMAGE_SIZE") == 2
    assert "input_map={'Placeholder:0': resized_input_tensor}" in patched


@pytest.mark.parametrize(
    "source, number",
    [
        ("print('not retrain.py')\n", 1),
        (RETRAIN_PY_EXCERPT.replace("  module_spec = hub.load_module_spec", "  x = 1 #"), 5),
    ],
)
def test_patch_refuses_another_file_naming_the_change(source, number):
    with pytest.raises(side_by_side.PatchError, match=f"change {number} expects"):
        side_by_side.patch_retrain_py(source, Path("m.pb"), (224, 224))


def test_patch_refuses_a_file_with_hub_calls_left():
    source = RETRAIN_PY_EXCERPT + "  spec = hub.resolve(FLAGS.tfhub_module)\n"
    with pytest.raises(side_by_side.PatchError, match="tensorflow_hub is left"):
        side_by_side.patch_retrain_py(source, Path("m.pb"), (224, 224))


def test_log_gives_bottleneck_rate_and_test_accuracy():
    log = "\n".join(
        [
            "INFO:tensorflow:Creating bottleneck at /b/1.jpg_x.txt",
            "I1122 19:24:10.000000 1405 retrain.py:372] Creating bottleneck at /b/1.jpg_x.txt",
            "I1122 19:24:10.500000 1405 retrain.py:372] Creating bottleneck at /b/2.jpg_x.txt",
            "I1122 19:24:12.000000 1405 retrain.py:372] Creating bottleneck at /b/3.jpg_x.txt",
            "I1122 19:29:55.2 1405 retrain.py:872] Final test accuracy = 91.5% (N=93)",
        ]
    )
    parsed = side_by_side.parse_retrain_py_log(log)
    assert parsed["bottlenecks_created"] == 3
    assert parsed["extraction_images_per_second"] == pytest.approx(2 / 2.0)
    assert parsed["test_accuracy"] == pytest.approx(0.915)
    assert side_by_side.parse_retrain_py_log("")["extraction_images_per_second"] is None


def _runs(empty, filled, rss, rate):
    run = {"peak_rss_mb": rss, "bottleneck_images_per_second": rate and rate * 0.9}
    return {
        "empty": {**run, "seconds": empty, "extraction_images_per_second": rate},
        "filled": {**run, "seconds": filled, "extraction_images_per_second": None},
    }


def test_summary_takes_medians_and_judges_each_target():
    ours = [_runs(20, 10, 800, 100), _runs(30, 9, 820, 130), _runs(25, 8, 810, 120)]
    theirs = [_runs(300, 150, 900, 30), _runs(330, 140, 910, 30)]
    result = side_by_side.summary(ours, theirs)
    ratios = result["ratios"]
    assert result["retrain_median"]["empty_seconds"] == 25
    assert result["retrain_median"]["bottleneck_phase_images_per_second"] == pytest.approx(108)
    assert ratios["empty_cache_wall_ratio"]["value"] == pytest.approx(25 / 315, abs=1e-4)
    assert ratios["empty_cache_wall_ratio"]["met"] is True
    assert ratios["filled_cache_wall_ratio"]["met"] is False  # 9/145 > 1/18
    assert ratios["extraction_speedup"] == {"value": 4.0, "target": ">= 4", "met": True}
    assert ratios["peak_rss_ratio"]["met"] is True


def test_retrain_py_gets_an_absolute_image_dir(tmp_path, monkeypatch):
    """retrain.py runs in its own folder: a relative --image_dir must not point elsewhere."""
    monkeypatch.chdir(tmp_path)
    cmd = side_by_side.retrain_py_command(Path("/r/retrain.py"), Path("photos"), Path("/w"), [])
    assert f"--image_dir={tmp_path / 'photos'}" in cmd


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--retrain_py", "{tmp}/no"], "--retrain_py: cannot read"),
        (["--retrain_py", "{tmp}/no", "--image_dir", "{tmp}/none"], "--image_dir: "),
    ],
)
def test_bad_flags_are_usage_errors(tmp_path, flags, message):
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "side_by_side.py"), *flags],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert message in done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr
