"""scripts/side_by_side.py: patching retrain.py (0163eda and HEAD), reading its log, judging the
ratios, one --image_dir for both programs."""

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


def create_bottleneck_file(bottleneck_path):
  """Create a single bottleneck file."""
  tf.logging.info('Creating bottleneck at ' + bottleneck_path)


def add_jpeg_decoding(module_spec):
  input_height, input_width = hub.get_expected_image_size(module_spec)
  input_depth = hub.get_num_image_channels(module_spec)


def add_input_distortions(module_spec):
  input_height, input_width = hub.get_expected_image_size(module_spec)
  input_depth = hub.get_num_image_channels(module_spec)


def main(_):
  module_spec = hub.load_module_spec(FLAGS.tfhub_module)
'''

# The same lines at TF Hub's last commit with retrain.py (HEAD): absl logging, the compat.v1
# import, tf.contrib's quantize for quantized modules, the checkpoint comment gone, the
# bottleneck line at DEBUG and a --checkpoint_path flag.
RETRAIN_PY_HEAD_EXCERPT = (
    RETRAIN_PY_EXCERPT.replace(
        "import numpy as np\nimport tensorflow as tf\nimport tensorflow_hub as hub\n",
        "from absl import logging\n\nimport numpy as np\nimport tensorflow.compat.v1 as tf\n"
        "import tensorflow_hub as hub\n"
        "from tensorflow.contrib import quantize as contrib_quantize\n",
    )
    .replace(
        "# The location where variable checkpoints will be stored.\n"
        "CHECKPOINT_NAME = '/tmp/_retrain_checkpoint'\n",
        "MAX_NUM_IMAGES_PER_CLASS = 2 ** 27 - 1  # ~134M\n",
    )
    .replace(
        "  tf.logging.info('Creating bottleneck at ' + bottleneck_path)\n",
        "  logging.debug('Creating bottleneck at %s', bottleneck_path)\n",
    )
    + """

def add_final_retrain_ops(quantize_layer, is_training):
  if quantize_layer:
    if is_training:
      contrib_quantize.create_training_graph()
    else:
      contrib_quantize.create_eval_graph()


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument(
      '--image_dir',
      type=str,
      default='',
      help='Path to folders of labeled images.'
  )
  parser.add_argument(
      '--checkpoint_path',
      type=str,
      default='/tmp/_retrain_checkpoint',
      help='Where to save checkpoint files.'
  )
"""
)
VERSIONS = {"0163eda": RETRAIN_PY_EXCERPT, "HEAD": RETRAIN_PY_HEAD_EXCERPT}


def code_lines(source: str) -> list[str]:
    return [line.split("#")[0] for line in source.splitlines()]


@pytest.mark.parametrize("version", VERSIONS)
def test_patch_leaves_no_hub_call_and_imports_the_frozen_module(tmp_path, version):
    graph = tmp_path / "module.pb"
    patched = side_by_side.patch_retrain_py(VERSIONS[version], graph, (224, 224))
    compile(patched, "retrain.py", "exec")
    code = code_lines(patched)
    assert not [line for line in code if "hub." in line or "tensorflow_hub" in line]
    assert not [line for line in code if "contrib import" in line]
    assert code.count("import tensorflow.compat.v1 as tf  ") == 1
    assert code.count("tf.disable_v2_behavior()  ") == 1
    assert f"FROZEN_MODULE_GRAPH = {str(graph)!r}" in patched
    assert "module_spec = FROZEN_MODULE_GRAPH" in patched
    assert patched.count("input_height, input_width = MODULE_IMAGE_SIZE") == 2
    assert "input_map={'Placeholder:0': resized_input_tensor}" in patched


def test_patch_at_head_drops_contrib_and_logs_bottlenecks_at_info(tmp_path):
    """HEAD's changes: tf.contrib is gone in TF 2 (only quantized modules used it), and the
    "Creating bottleneck" line that times extraction is logged at DEBUG there."""
    patched = side_by_side.patch_retrain_py(RETRAIN_PY_HEAD_EXCERPT, tmp_path / "m.pb", (224, 224))
    assert "contrib_quantize = None  # PATCH" in patched
    assert "  logging.info('Creating bottleneck at %s', bottleneck_path)  # PATCH" in patched
    assert "logging.debug" not in patched
    # The constants follow `FLAGS = None`, which both versions have (0163eda's comment is gone).
    assert "FLAGS = None\nFROZEN_MODULE_GRAPH = " in patched


def test_patch_at_0163eda_changes_nothing_else(tmp_path):
    patched = side_by_side.patch_retrain_py(RETRAIN_PY_EXCERPT, tmp_path / "m.pb", (224, 224))
    assert "contrib_quantize" not in patched
    assert "  tf.logging.info('Creating bottleneck at ' + bottleneck_path)\n" in patched
    assert "CHECKPOINT_NAME = '/tmp/_retrain_checkpoint'\n" in patched


@pytest.mark.parametrize(
    "source, number",
    [
        ("print('not retrain.py')\n", 1),
        (RETRAIN_PY_EXCERPT.replace("FLAGS = None", "FLAGS = {}"), 2),
        (RETRAIN_PY_EXCERPT.replace("  module_spec = hub.load_module_spec", "  x = 1 #"), 5),
        (RETRAIN_PY_HEAD_EXCERPT.replace("  module_spec = hub.load_module_spec", "  x = 1 #"), 5),
        (RETRAIN_PY_HEAD_EXCERPT + RETRAIN_PY_HEAD_EXCERPT.split("import numpy")[1], 1),
    ],
)
def test_patch_refuses_another_file_naming_the_change(source, number):
    with pytest.raises(side_by_side.PatchError, match=f"change {number} expects"):
        side_by_side.patch_retrain_py(source, Path("m.pb"), (224, 224))


@pytest.mark.parametrize(
    "source, message",
    [
        (RETRAIN_PY_EXCERPT + "  spec = hub.resolve(FLAGS.tfhub_module)\n", "tensorflow_hub"),
        (RETRAIN_PY_HEAD_EXCERPT + "import tensorflow.contrib.quantize\n", "contrib is left"),
        (
            RETRAIN_PY_HEAD_EXCERPT.replace("logging.debug('Creating", "logging.vlog(1, 'Creating"),
            "no 'Creating bottleneck' line logged at INFO",
        ),
    ],
)
def test_patch_refuses_what_would_not_run_or_not_be_timed(source, message):
    with pytest.raises(side_by_side.PatchError, match=message):
        side_by_side.patch_retrain_py(source, Path("m.pb"), (224, 224))


def test_only_head_defines_a_checkpoint_path_flag():
    assert side_by_side.defined_flags(RETRAIN_PY_HEAD_EXCERPT) == {"image_dir", "checkpoint_path"}
    assert side_by_side.defined_flags(RETRAIN_PY_EXCERPT) == set()


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
    assert parsed["test_accuracy"] == pytest.approx(0.915) and parsed["test_images"] == 93
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
    assert not [arg for arg in cmd if arg.startswith("--checkpoint_path")]
    cmd = side_by_side.retrain_py_command(Path("/r/p.py"), "x", Path("/w"), [], own_checkpoint=True)
    assert "--checkpoint_path=/w/_retrain_checkpoint" in cmd


@pytest.mark.parametrize(
    ("given", "shared"),
    [
        ("/data/photos/", "/data/photos/"),
        ("/data//photos", "/data//photos"),
        ("photos/", "{cwd}/photos/"),
        ("./photos", "{cwd}/./photos"),
        ("~/photos", "{home}/photos"),
    ],
)
def test_both_programs_get_one_image_dir_spelled_as_given(tmp_path, monkeypatch, given, shared):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/someone")
    expected = shared.format(cwd=tmp_path, home="/home/someone")
    assert side_by_side.shared_image_dir(given) == expected
    cmd = side_by_side.retrain_py_command(Path("/r/retrain.py"), given, Path("/w"), [])
    assert f"--image_dir={expected}" in cmd


def _accuracy_runs(accuracy, test_images):
    run = {"test_accuracy": accuracy, "test_images": test_images}
    return {"empty": run, "filled": run}


def test_accuracies_compare_when_the_test_splits_agree():
    ours = [_accuracy_runs(0.9, 339), _accuracy_runs(0.92, 339)]
    theirs = [_accuracy_runs(0.88, 339)]
    result = side_by_side.accuracy_comparison(ours, theirs, "path")
    assert result["retrain_test_accuracy_median"] == pytest.approx(0.91)
    assert result["retrain_py_test_accuracy_median"] == pytest.approx(0.88)
    assert result["test_images"] == {"retrain": [339], "retrain_py": [339]}
    assert result["same_test_images"] is True
    other = side_by_side.accuracy_comparison([_accuracy_runs(0.9, 359)], theirs, "basename")
    assert other["same_test_images"] is False and other["split_hash"] == "basename"


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
