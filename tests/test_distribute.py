"""Tests of retrain.bottlenecks.distribute: the strategy factory and the mirrored extractor, on CPU.

Several replicas on one CPU need logical CPU devices, which must be configured before
TensorFlow initialises its devices, and MultiWorkerMirroredStrategy must be made before
TensorFlow runs anything: so those cases run in fresh subprocesses that print one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from retrain.bottlenecks import distribute
from retrain.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent

# Computes mirrored features on real photos over 2 and 3 logical CPUs and compares them with the
# plain TensorFlow backend's; prints "RESULT {json}".
MIRRORED_SCRIPT = """
import json, logging
from pathlib import Path

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 3)

import numpy as np

from retrain.bottlenecks import distribute
from retrain.bottlenecks.backends import tensorflow_backend
from retrain.data.decode import decode_image
from retrain.models.loading import resolve_module
from retrain.data.preprocess import to_module_input

records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("retrain.bottlenecks.distribute").addHandler(handler)
logging.getLogger("retrain.bottlenecks.distribute").setLevel(logging.INFO)

module = resolve_module("efficientnet_lite0")
photos = sorted(Path("examples/flower_photos").glob("*/*.jpg"))[::9][:8]
images = np.stack(
    [to_module_input(decode_image(p, module.input_size), module.input_size).numpy()
     for p in photos]
)
plain = module.load()
expected = tensorflow_backend(plain)(images)
result = {"photos": len(photos), "diffs": {}}

two = tf.distribute.MirroredStrategy(devices=["/cpu:0", "/cpu:1"])
in_scope = distribute.load_module(module, two)
result["in_scope_mirrored"] = all(
    type(v).__name__ == "MirroredVariable" for v in in_scope.variables
)
extract = distribute.mirrored_backend(in_scope, two)
for n in (1, 3, 8):
    got = extract(images[:n])
    result["diffs"][f"2x{n}"] = [list(got.shape), float(np.abs(got - expected[:n]).max())]

three = distribute.make_strategy("mirrored")  # no GPU here: the 3 logical CPUs
result["make_strategy_replicas"] = three.num_replicas_in_sync
result["log"] = [r.getMessage() for r in records]
extract = distribute.mirrored_backend(plain, three)  # weights loaded outside the scope
for n in (2, 7):
    got = extract(tf.constant(images[:n]))
    result["diffs"][f"3x{n}"] = [list(got.shape), float(np.abs(got - expected[:n]).max())]
got = extract(images[:0])
result["diffs"]["3x0"] = [list(got.shape), 0.0]
print("RESULT " + json.dumps(result), flush=True)
"""

# One worker of a two-worker MultiWorkerMirroredStrategy cluster (TF_CONFIG set by the test).
WORKER_SCRIPT = """
import json, os

import numpy as np

from retrain.bottlenecks import distribute

strategy = distribute.make_strategy("multi_worker_mirrored")  # before any other TF op

import tensorflow as tf

value = strategy.experimental_distribute_values_from_function(
    lambda ctx: tf.constant(float(ctx.replica_id_in_sync_group + 1))
)
total = strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)

with strategy.scope():
    w = tf.Variable([[1.0], [2.0], [3.0]])


@tf.function
def step():
    def replica_step():
        ctx = tf.distribute.get_replica_context()
        x = tf.fill([4, 3], tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.matmul(x, w) ** 2)
        grad = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, tape.gradient(loss, w))
        w.assign_sub(0.01 * grad)

    strategy.run(replica_step)


step()


class Tiny(tf.Module):
    def __init__(self):
        kernel = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
        self.kernel = tf.Variable(kernel)

    @tf.function
    def __call__(self, images):
        return tf.matmul(tf.reduce_mean(images, axis=[1, 2]), self.kernel)


with strategy.scope():
    tiny = Tiny()
extract = distribute.mirrored_backend(tiny, strategy)
images = np.random.default_rng(1).random((5, 4, 4, 3), dtype=np.float32)
diffs = [float(np.abs(extract(images[:n]) - tiny(images[:n]).numpy()).max()) for n in (1, 2, 5)]
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
print("RESULT " + json.dumps({
    "task": task,
    "replicas": strategy.num_replicas_in_sync,
    "sum": float(total),
    "w": w.numpy().ravel().tolist(),
    "diffs": diffs,
}), flush=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _tf_config(ports: list[int], index: int) -> str:
    workers = [f"127.0.0.1:{port}" for port in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


# ----------------------------------------------------------------------------- in process


def test_import_does_not_import_tensorflow():
    code = "import sys, retrain.bottlenecks.distribute; print('tensorflow' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_none_is_the_default_strategy():
    assert distribute.STRATEGIES == ("none", "mirrored", "multi_worker_mirrored")
    assert distribute.make_strategy("none") is None


def test_unknown_strategy_is_a_usage_error():
    with pytest.raises(UsageError, match="distribution.strategy.*'mirror'.*mirrored"):
        distribute.make_strategy("mirror")


@pytest.mark.parametrize(
    "tf_config, problem",
    [
        (None, "needs TF_CONFIG"),
        ("", "needs TF_CONFIG"),
        ("{not json", "to be JSON"),
        ("[1, 2]", "'cluster' and 'task'"),
        ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "no 'worker'"),
        (_tf_config([1, 2], 2), "names no member"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "no member"),
    ],
)
def test_multi_worker_needs_a_valid_tf_config(monkeypatch, tf_config, problem):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(UsageError, match="distribution.strategy") as info:
        distribute.make_strategy("multi_worker_mirrored")
    assert problem in str(info.value)
    assert info.value.exit_code == 2


def test_valid_tf_config_is_read(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", _tf_config([1, 2], 1))
    assert distribute.read_tf_config()["task"] == {"type": "worker", "index": 1}


@pytest.mark.parametrize(
    "cluster, task, position",
    [
        ({"worker": ["a:1", "b:1", "c:1"]}, {"type": "worker", "index": 0}, (0, 3)),
        ({"worker": ["a:1", "b:1", "c:1"]}, {"type": "worker", "index": 2}, (2, 3)),
        ({"chief": ["a:1"], "worker": ["b:1", "c:1"]}, {"type": "chief", "index": 0}, (0, 3)),
        ({"chief": ["a:1"], "worker": ["b:1", "c:1"]}, {"type": "worker", "index": 0}, (1, 3)),
    ],
)
def test_cluster_position_and_chief(monkeypatch, cluster, task, position):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    assert distribute.cluster_position() == position
    assert distribute.is_chief() == (position[0] == 0)


def test_worker_shares_split_indices_once(monkeypatch):
    indices = [0, 2, 3, 5, 8, 9, 10]
    shares = []
    for index in range(3):
        monkeypatch.setenv("TF_CONFIG", _tf_config([1, 2, 3], index))
        shares.append(distribute.worker_share(indices))
    assert shares == [[0, 3, 9], [10], [2, 5, 8]]
    # A worker whose list lacks what another already computed still gets the same share of it.
    assert distribute.worker_share([2, 8]) == [2, 8]


def test_mirrored_without_gpu_has_one_cpu_replica(caplog):
    tf = pytest.importorskip("tensorflow")
    if tf.config.list_physical_devices("GPU") or len(tf.config.list_logical_devices("CPU")) != 1:
        pytest.skip("needs a plain CPU-only process")
    with caplog.at_level(logging.INFO, logger="retrain.bottlenecks.distribute"):
        strategy = distribute.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 1
    assert "no GPU is visible: 1 CPU replica" in caplog.text


def test_none_strategy_backend_is_plain_tensorflow():
    tf = pytest.importorskip("tensorflow")
    import numpy as np

    class Doubler(tf.Module):
        @tf.function
        def __call__(self, images):
            return tf.reduce_sum(images, axis=[1, 2]) * 2.0

    images = np.random.default_rng(0).random((3, 2, 2, 3), dtype=np.float32)
    got = distribute.mirrored_backend(Doubler(), None)(images)
    np.testing.assert_allclose(got, images.sum(axis=(1, 2)) * 2.0, rtol=1e-6)


# ----------------------------------------------------------------------------- subprocesses


def run_script(script_text: str, tmp_path: Path, timeout: int = 180) -> dict:
    """Run `script_text` in a fresh Python process; the dict it printed as "RESULT {json}"."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(script_text))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return _result(proc.stdout)


def test_mirrored_matches_plain_tensorflow_on_photos(tmp_path):
    result = run_script(MIRRORED_SCRIPT, tmp_path)
    assert result["photos"] == 8
    assert result["in_scope_mirrored"]
    assert result["make_strategy_replicas"] == 3
    assert any("no GPU is visible: 3 CPU replica" in line for line in result["log"])
    for case, (shape, diff) in result["diffs"].items():
        rows = int(case.split("x")[1])
        assert shape == [rows, 1280], case
        assert diff <= 1e-5, (case, diff)
    assert set(result["diffs"]) == {"2x1", "2x3", "2x8", "3x2", "3x7", "3x0"}


def run_local_workers(script_text: str, tmp_path: Path, count: int = 2, timeout: int = 120):
    """Run `script_text` as `count` local workers of one TF_CONFIG cluster; their RESULT dicts.

    Each worker must print "RESULT {json}"; a worker that fails fails the test with its output.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(script_text))
    workers = [
        subprocess.Popen(
            [sys.executable, str(script)],
            cwd=ROOT,
            env=_env(TF_CONFIG=_tf_config(ports, index)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(count)
    ]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=timeout)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    return [_result(output) for output in outputs]


def test_two_local_workers(tmp_path):
    results = run_local_workers(WORKER_SCRIPT, tmp_path)
    assert [r["task"] for r in results] == [0, 1]
    for result in results:
        assert result["replicas"] == 2
        assert result["sum"] == 3.0  # replica values 1 + 2
        # gradients 12 and 48 (x = 1, 2), averaged to 30, times the learning rate 0.01
        assert result["w"] == pytest.approx([0.7, 1.7, 2.7], abs=1e-6)
        # Equal up to rounding: with oneDNN (on by default on AVX-512 CPUs, or with
        # TF_ENABLE_ONEDNN_OPTS=1) a matmul's summation order depends on its batch size.
        assert max(result["diffs"]) <= 1e-6
    assert results[0]["w"] == results[1]["w"]
