"""No module or interpreter is ever run on an empty batch (issue: oneDNN on AVX-512 CPUs).

TensorFlow's oneDNN kernels, on by default on AVX-512 CPUs and switched on anywhere by
TF_ENABLE_ONEDNN_OPTS=1, fail on a batch of zero images ("Incompatible shapes: [0,224,224,3]
vs. [32]"). Whether the raw module fails depends on the CPU and on oneDNN; retrain's answer must
not: each extractor gives an empty [0, D] without running anything. The script runs in fresh
subprocesses with oneDNN off and on (the switch is read when TensorFlow starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 3)

from retrain.export.loading import FrozenGraphClassifier
from retrain.bottlenecks import backends
from retrain.bottlenecks import distribute
from retrain.export import writer as export
from retrain.heads.head import SoftmaxHead
from retrain.models.loading import resolve_module

module = resolve_module("efficientnet_lite0")  # the shared module cache, as the runs use
plain = module.load()
empty = np.zeros((0, *module.input_size, 3), np.float32)
one = np.full((1, *module.input_size, 3), 0.5, np.float32)
result = {}
try:
    plain(tf.constant(empty))
    result["raw_module_on_empty"] = "ok"
except tf.errors.OpError as err:
    result["raw_module_on_empty"] = str(err).splitlines()[0][:200]

tensorflow = backends.tensorflow_backend(plain)
result["tensorflow"] = list(tensorflow(empty).shape)
result["tensorflow_one"] = list(tensorflow(one).shape)
three = tf.distribute.MirroredStrategy(devices=["/cpu:0", "/cpu:1", "/cpu:2"])
mirrored = distribute.mirrored_backend(plain, three)
result["mirrored"] = list(mirrored(empty).shape)
result["mirrored_one"] = list(mirrored(one).shape)  # two of three replicas get blank rows
tflite = backends.tflite_backend(backends.convert_to_tflite(module, None, plain))
result["tflite"] = list(tflite(empty).shape)

graph = export.classifier_graph_def(
    export.frozen_module_graph_def(plain, module.input_size),
    SoftmaxHead(4),
    np.zeros((module.feature_dim, 4), np.float32),
    np.zeros(4, np.float32),
)
path = sys.argv[1] + "/classifier.pb"
export.write_frozen_graph(graph, path)
frozen = FrozenGraphClassifier(path, "Placeholder", "final_result")
result["frozen_graph"] = list(frozen.predict(empty).shape)
result["frozen_graph_one"] = list(frozen.predict(one).shape)
print("RESULT " + json.dumps(result), flush=True)
"""


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_empty_batches_never_reach_the_module(onednn, tmp_path):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    print(f"oneDNN={onednn}: the raw module on zero images: {result['raw_module_on_empty']}")
    for name in ("tensorflow", "mirrored", "tflite"):
        assert result[name] == [0, 1280], name
    assert result["tensorflow_one"] == result["mirrored_one"] == [1, 1280]
    assert result["frozen_graph"] == [0, 4]
    assert result["frozen_graph_one"] == [1, 4]
