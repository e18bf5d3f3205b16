"""Tests of fine-tuning (retrain.training.fine_tune_network): the CLI run and its exports, and
distribution.

Fast cases use a tiny module exported with the project's own reusable-SavedModel exporter (a
strided convolution, a frozen "moving mean" and a trainable scale: 32x32 input, 8 features);
the bundled EfficientNet-Lite0 runs the accuracy check and the slow variants. Strategies over
logical CPUs or several workers need fresh processes (see tests/test_distribute.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from retrain.cli import retrain as cli
from tests.conftest import EXAMPLE_DIR, retrain_args, write_image
from tests.test_distribute import run_local_workers, run_script

TINY_INPUT = (32, 32)
TINY_FEATURES = 8

# Shared by the subprocess scripts (MODULE is prepended): fine-tunes on 8 example photos and
# summarises the variables. Runs no TensorFlow op, so a script may make its strategy after it.
PRELUDE = """
import hashlib, json, os
from pathlib import Path

import numpy as np

from retrain.bottlenecks import distribute
from retrain.training import fine_tune_network as finetune
from retrain.models.loading import resolve_module

module = resolve_module(MODULE)
root = Path("examples/flower_photos")
classes = sorted(p.name for p in root.iterdir() if p.is_dir())
paths = sorted(root.glob("*/*.jpg"))[::5][:8]
train = finetune.LabeledImages(paths, np.array([classes.index(p.parent.name) for p in paths]))
no_test = finetune.LabeledImages([], np.zeros(0, np.int64))
rng = np.random.default_rng(0)
head = (
    rng.normal(0, 0.1, (module.feature_dim, len(classes))).astype(np.float32),
    np.zeros(len(classes), np.float32),
)
from retrain.config import FineTuningConfig
from retrain.heads.head import SoftmaxHead
config = FineTuningConfig(steps=2, batch_size=4, learning_rate=0.01)
softmax = SoftmaxHead(len(classes))


def values(result):
    return [v.numpy() for v in result.module_object.variables] + [result.weights, result.biases]


def largest_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def pretrained():
    return [v.numpy() for v in module.load().variables] + list(head)
"""

# `none` and `mirrored` over 2 logical CPUs on the same batches.
MIRRORED_SCRIPT = """
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
{prelude}
plain = finetune.fine_tune(module, softmax, head, train, no_test, config, None)
mirrored = finetune.fine_tune(
    module, softmax, head, train, no_test, config, distribute.make_strategy("mirrored")
)
try:  # a replica would get an empty piece of each batch of one
    one = FineTuningConfig(steps=1, batch_size=1)
    two = distribute.make_strategy("mirrored")
    finetune.fine_tune(module, softmax, head, train, no_test, one, two)
    small_batch = "ran"
except Exception as err:
    small_batch = f"{{type(err).__name__}}: {{err}}"
print("RESULT " + json.dumps({{
    "small_batch": small_batch,
    "replicas": [plain.replicas, mirrored.replicas],
    "diff": largest_diff(values(plain), values(mirrored)),
    "change": largest_diff(values(plain), pretrained()),
}}), flush=True)
"""

# One worker of two: fine-tunes with MultiWorkerMirroredStrategy, then alone on the same batches.
WORKER_SCRIPT = """
{prelude}
strategy = distribute.make_strategy("multi_worker_mirrored")  # before any TensorFlow op
tuned = finetune.fine_tune(module, softmax, head, train, no_test, config, strategy)
alone = finetune.fine_tune(module, softmax, head, train, no_test, config, None)
digest = hashlib.sha256(b"".join(v.tobytes() for v in values(tuned))).hexdigest()
print("RESULT " + json.dumps({{
    "task": json.loads(os.environ["TF_CONFIG"])["task"]["index"],
    "replicas": tuned.replicas,
    "digest": digest,
    "diff_alone": largest_diff(values(tuned), values(alone)),
    "change": largest_diff(values(tuned), pretrained()),
}}), flush=True)
"""

# One worker of two running the command line with ARGV (prepended; "{task}" becomes its index).
# Reports pipeline.run's metrics and digests of the layer each fine-tuning started from and of
# the fine-tuned variables.
CLI_WORKER_SCRIPT = """
import hashlib, json, os

import numpy as np

from retrain import pipeline
from retrain.cli import retrain as cli
from retrain.training import fine_tune_network as finetune

task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
runs, tunes = [], []
real_run, real_fine_tune = pipeline.run, finetune.fine_tune


def digest(arrays):
    return hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in arrays)).hexdigest()


def run(config, **kwargs):
    result = real_run(config, **kwargs)
    runs.append(result.metrics())
    return result


def fine_tune(module, softmax, head, *args, **kwargs):
    result = real_fine_tune(module, softmax, head, *args, **kwargs)
    tuned = [v.numpy() for v in result.module_object.variables] + [result.weights, result.biases]
    tunes.append({"head": digest(head), "tuned": digest(tuned)})
    return result


pipeline.run, finetune.fine_tune = run, fine_tune
status = cli.main([arg.replace("{task}", str(task)) for arg in ARGV])
print("RESULT " + json.dumps({
    "task": task, "status": status, "metrics": runs[-1] if runs else None, "fine_tune": tunes
}), flush=True)
"""


def _tiny_network():
    import tensorflow as tf

    class Backbone(tf.Module):
        def __init__(self):
            super().__init__(name="tiny")
            rng = np.random.default_rng(0)
            kernel = rng.normal(0, 0.5, (3, 3, 3, TINY_FEATURES)).astype(np.float32)
            self.kernel = tf.Variable(kernel, name="kernel")
            self.gamma = tf.Variable(tf.ones([TINY_FEATURES]), name="gamma")
            self.moving_mean = tf.Variable(
                tf.fill([TINY_FEATURES], 0.1), trainable=False, name="moving_mean"
            )

    class Network(tf.Module):
        def __init__(self):
            super().__init__(name="tiny_network")
            self.backbone = Backbone()
            self.classifier = tf.Variable(tf.zeros([TINY_FEATURES, 2]))

        def features(self, images):
            b = self.backbone
            x = tf.nn.conv2d(images, b.kernel, 2, "SAME")
            return tf.reduce_mean(tf.nn.relu((x - b.moving_mean) * b.gamma), axis=[1, 2])

        def logits(self, images):
            return tf.matmul(self.features(images), self.classifier)

    return Network()


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory) -> Path:
    """A tiny reusable image feature-vector SavedModel."""
    from retrain.models.savedmodel import export_image_module

    path = tmp_path_factory.mktemp("tiny") / "module"
    export_image_module(_tiny_network(), path, TINY_INPUT)
    return path


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _run_capturing(
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    function: str = "training.fine_tune_network.fine_tune",
):
    """Run the CLI; returns its status and the FineTuneResult it fine-tuned (kept in memory)
    by `function` (module.name under retrain)."""
    import importlib

    module_name, _, name = function.rpartition(".")
    module = importlib.import_module(f"retrain.{module_name}")
    captured = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        captured.append(real(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(module, name, spy)
    status = cli.main(argv)
    assert len(captured) == 1
    return status, captured[0]


def _pixels(path: Path, input_size: tuple[int, int]) -> np.ndarray:
    from retrain.data.decode import decode_image
    from retrain.data.preprocess import to_module_input

    return to_module_input(decode_image(path, input_size), input_size).numpy()[None]


def _frozen_scores(graph_path: Path, pixels: np.ndarray) -> np.ndarray:
    """Scores of the frozen graph, run as TF1 clients do (after checking its input)."""
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph_path.read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    placeholder = graph.get_tensor_by_name("Placeholder:0")
    assert placeholder.dtype == tf.float32
    assert placeholder.shape.as_list() == [None, *pixels.shape[1:]]
    with tf.compat.v1.Session(graph=graph) as session:
        return session.run("final_result:0", {"Placeholder:0": pixels})


def _memory_scores(module_object, result, pixels: np.ndarray) -> np.ndarray:
    from retrain.export import writer as export
    from retrain.heads.head import SoftmaxHead

    classifier = export.Classifier(
        module_object,
        SoftmaxHead(len(result.biases)),
        result.weights,
        result.biases,
        result.input_size,
    )
    return classifier.classify(pixels).numpy()


# ----------------------------------------------------------------------------- pure parts


def test_training_order_shuffles_whole_epochs_reproducibly():
    from retrain.training.fine_tune_network import training_order

    order = training_order(5, steps=4, batch_size=3, seed=7)
    assert len(order) == 12
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))  # each epoch: all once
    assert (order == training_order(5, 4, 3, seed=7)).all()
    assert not (order == training_order(5, 4, 3, seed=8)).all()


def test_warmup_scales_the_first_steps_updates():
    import tensorflow as tf

    from retrain.config import FineTuningConfig
    from retrain.heads.head import SoftmaxHead
    from retrain.training.fine_tune_loop import make_train_step, optimizer_for, warmup_steps

    assert (warmup_steps(6), warmup_steps(300), warmup_steps(5000)) == (0, 30, 30)

    class Layer(tf.Module):
        def __init__(self):
            self.final_weights = tf.Variable(tf.zeros([2, 2]))
            self.final_biases = tf.Variable(tf.zeros([2]))
            self.trainable = [self.final_weights, self.final_biases]

        def __call__(self, x):
            return tf.matmul(x, self.final_weights) + self.final_biases

    batch = (tf.eye(2), tf.constant([0, 1]), tf.constant([True, True]))
    strategy = tf.distribute.get_strategy()

    def updates(warmup: int, steps: int = 2) -> list[np.ndarray]:
        layer = Layer()
        settings = FineTuningConfig(steps=10, learning_rate=0.1, lr_schedule="constant")
        optimizer = optimizer_for(layer, settings)
        batches = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensors(batch).repeat()
        )
        step = make_train_step(strategy, layer, SoftmaxHead(2), optimizer, 2, warmup)
        iterator, seen = iter(batches), []
        for _ in range(steps):
            step(iterator)
            seen.append(layer.final_weights.numpy())
        return seen

    plain, warm = updates(0), updates(4)
    np.testing.assert_allclose(warm[0], plain[0] / 4, rtol=1e-5)  # 1/4 of the first step
    assert np.abs(warm[1]).max() < np.abs(plain[1]).max()


def test_subset_is_seeded_and_keeps_order():
    from retrain.training.fine_tune_network import LabeledImages, subset

    images = LabeledImages([f"{i}.jpg" for i in range(10)], np.arange(10) % 3)
    picked = subset(images, 4, seed=1)
    assert len(picked) == 4 and list(picked.paths) == sorted(
        picked.paths, key=lambda p: int(p[:-4])
    )
    assert [int(p[:-4]) % 3 for p in picked.paths] == list(picked.labels)
    assert list(subset(images, 4, seed=1).paths) == list(picked.paths)
    assert subset(images, -1, seed=1) is images and subset(images, 10, seed=1) is images


def test_module_without_trainable_variables_is_one_clear_error():
    from retrain.errors import RetrainError
    from retrain.training.fine_tune_network import module_trainable_variables

    with pytest.raises(RetrainError, match="fine_tuning.steps") as info:
        module_trainable_variables(object())
    assert len(str(info.value).splitlines()) == 1
    assert info.value.render(lambda field: "--fine_tune_steps").endswith("--fine_tune_steps=0")


# ----------------------------------------------------------------------------- tiny module


@pytest.fixture(scope="module")
def tiny_run(tiny_module, tmp_path_factory):
    """A CLI run with --fine_tune_steps=3 on the tiny module, with every export, and no
    validation images: nothing guards the fine-tuning, whose last step is exported.

    Its frozen-module cache entry is made (pretrained) before the run, which must not touch it.
    """
    from retrain.export import writer as export
    from retrain.models.loading import resolve_module

    out = tmp_path_factory.mktemp("tiny_run")
    for label, color in (("red", (200, 30, 30)), ("blue", (20, 40, 220))):
        for i in range(8):
            write_image(out / "images" / label / f"{label}{i}.jpg", color=color)
    module = resolve_module(str(tiny_module))
    frozen = out / "cache" / "frozen" / f"{module.fingerprint}-v1.pb"
    export.cached_frozen_module(frozen, module.load, module.input_size)
    frozen_before = _sha256(frozen)
    with pytest.MonkeyPatch.context() as monkeypatch:
        status, result = _run_capturing(
            monkeypatch,
            retrain_args(
                out / "images",
                out,
                f"--tfhub_module={tiny_module}",
                f"--module_cache_dir={out / 'cache'}",
                "--extraction_backend=tensorflow",
                "--testing_percentage=30",
                "--validation_percentage=0",
                "--fine_tune_steps=3",
                "--fine_tune_batch_size=2",
                "--fine_tune_learning_rate=0.05",
                f"--saved_model_dir={out / 'saved_model'}",
                f"--output_tflite={out / 'classifier.tflite'}",
                steps=100,
            ),
        )
    assert status == 0
    return {
        "out": out,
        "module": module,
        "result": result,
        "metrics": json.loads((out / "metrics.json").read_text()),
        "frozen": (frozen_before, _sha256(frozen)),
    }


def test_fine_tuning_changes_trainable_weights_only(tiny_run):
    pretrained = tiny_run["module"].load()
    tuned = tiny_run["result"].module_object
    changes = {
        v.name: float(np.abs(v.numpy() - p.numpy()).max())
        for v, p in zip(tuned.variables, pretrained.variables, strict=True)
    }
    assert changes["kernel:0"] > 1e-4 and changes["gamma:0"] > 1e-4, changes
    assert changes["moving_mean:0"] == 0.0  # BatchNorm-style statistics are not trained


def test_exports_hold_the_fine_tuned_network(tiny_run):
    import tensorflow as tf

    from retrain.export.loading import TFLiteClassifier

    out, result = tiny_run["out"], tiny_run["result"]
    pixels = _pixels(next((out / "images" / "blue").iterdir()), TINY_INPUT)
    expected = _memory_scores(result.module_object, result, pixels)
    saved = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    exported = {
        "frozen graph": _frozen_scores(out / "graph.pb", pixels),
        "SavedModel": saved(tf.constant(pixels))["final_result"].numpy(),
        "TFLite": TFLiteClassifier(out / "classifier.tflite").predict(pixels),
    }
    for name, scores in exported.items():
        np.testing.assert_allclose(scores, expected, atol=1e-4, err_msg=name)
    # The pretrained module with the same layer scores differently: the exports do hold the
    # fine-tuned module, not the pretrained one.
    pretrained = _memory_scores(tiny_run["module"].load(), result, pixels)
    assert np.abs(pretrained - expected).max() > 1e-3


def test_frozen_module_cache_is_untouched(tiny_run):
    before, after = tiny_run["frozen"]
    assert before is not None and after == before


def test_metrics_and_summaries(tiny_run):
    import tensorflow as tf

    metrics = tiny_run["metrics"]
    tuned = metrics["fine_tune"]
    assert tuned["steps"] == 3 and tuned["batch_size"] == 2 and tuned["replicas"] == 1
    assert tuned["seconds"] > 0 and tuned["steps_per_second"] > 0
    assert tuned["test_images"] == metrics["images"]["testing"] > 0
    assert 0 <= tuned["test_accuracy_before"] <= 1
    # No validation images: nothing to choose from, the last step is kept.
    assert tuned["best_step"] is None and tuned["kept"] == "last step (no validation images)"
    assert tuned["steps_run"] == 3 and not tuned["stopped_early"]
    # The top-level test figures describe the exported (fine-tuned) model.
    assert metrics["test_accuracy"] == tuned["test_accuracy_after"]
    tags = set()
    for event_file in (tiny_run["out"] / "logs" / "fine_tune").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            tags.update(v.tag for v in event.summary.value)
    assert {"accuracy", "cross_entropy"} <= tags


# ----------------------------------------------------------------------------- distribution


@pytest.fixture(params=["tiny", pytest.param("efficientnet_lite0", marks=pytest.mark.slow)])
def prelude(request, tiny_module) -> str:
    """PRELUDE for the tiny module, or (slow) the real default one."""
    handle = str(tiny_module) if request.param == "tiny" else request.param
    return f"MODULE = {handle!r}\n{PRELUDE}"


def test_mirrored_matches_none(tmp_path, prelude):
    result = run_script(MIRRORED_SCRIPT.format(prelude=prelude), tmp_path, timeout=300)
    assert result["replicas"] == [1, 2]
    assert result["change"] > 1e-3  # the steps did move the weights ...
    assert result["diff"] <= 1e-5  # ... the same way on one replica and on two
    assert result["small_batch"].startswith("ConfigError: fine_tuning.batch_size (1)")
    assert "at least the number of replicas (2)" in result["small_batch"]


def test_two_local_workers_fine_tune_alike(tmp_path, tiny_module):
    # The tiny module only: the workers' path is the same for any module, and two workers
    # fine-tuning the real one take two minutes (mirrored_matches_none covers it on one machine).
    prelude = f"MODULE = {str(tiny_module)!r}\n{PRELUDE}"
    results = run_local_workers(WORKER_SCRIPT.format(prelude=prelude), tmp_path, timeout=300)
    assert [r["task"] for r in results] == [0, 1]
    assert [r["replicas"] for r in results] == [2, 2]
    assert results[0]["digest"] == results[1]["digest"]  # identical variables on both workers
    for result in results:
        assert result["change"] > 1e-3
        assert result["diff_alone"] <= 1e-5  # the same steps as one process on the same batches


@pytest.mark.parametrize("fine_tune_steps", [2, 0])
def test_two_local_workers_run_the_command_line(tiny_module, tmp_path, fine_tune_steps):
    images = tmp_path / "images"
    for label, (r, g, b) in (("red", (200, 30, 30)), ("blue", (20, 40, 220))):
        for i in range(8):  # distinct bytes: no image is found in the cache by another's content
            write_image(images / label / f"{label}{i}.jpg", color=(r, g + 9 * i, b))
    out = tmp_path / "task{task}"  # each worker's own outputs, to see who writes what
    argv = retrain_args(
        images,
        out,
        f"--bottleneck_dir={tmp_path / 'bottlenecks'}",  # shared, as on a cluster
        f"--tfhub_module={tiny_module}",
        f"--module_cache_dir={tmp_path / 'cache'}",
        "--distribution_strategy=multi_worker_mirrored",
        "--extraction_backend=tensorflow",
        "--extraction_batch_size=4",
        "--testing_percentage=30",
        f"--fine_tune_steps={fine_tune_steps}",
        "--fine_tune_batch_size=2",
        f"--saved_model_dir={out / 'saved_model'}",
        f"--split_manifest={out / 'split.csv'}",
        f"--checkpoint_path={out / 'checkpoints'}",
        steps=20,
    )
    script = f"ARGV = {argv!r}\n{CLI_WORKER_SCRIPT}"
    results = run_local_workers(script, tmp_path, timeout=300)

    assert [(r["task"], r["status"]) for r in results] == [(0, 0), (1, 0)]
    computed = [r["metrics"]["bottlenecks_computed"] for r in results]
    assert all(count > 0 for count in computed) and sum(computed) == 16, computed  # each once
    for r in results:
        assert r["metrics"]["cluster"] == {
            "worker": r["task"],
            "workers": 2,
            "bottlenecks_computed": 16,
        }
        assert sum(r["metrics"]["images"].values()) == 16 and r["metrics"]["skipped"] == []
    if fine_tune_steps:
        chief, other = (r["fine_tune"] for r in results)
        assert len(chief) == len(other) == 1
        assert chief[0]["head"] == other[0]["head"]  # fine-tuning started from the same layer
        assert chief[0]["tuned"] == other[0]["tuned"]  # ... and ended with the same network
    else:
        assert [r["fine_tune"] for r in results] == [[], []]

    chief_out, other_out = tmp_path / "task0", tmp_path / "task1"
    for name in ("graph.pb", "labels.txt", "metrics.json", "split.csv", "saved_model"):
        assert (chief_out / name).exists(), name
    assert list((chief_out / "checkpoints").iterdir())
    assert list((chief_out / "logs" / "train").iterdir())
    assert [p for p in other_out.rglob("*") if p.is_file()] == []  # flag checks made folders only
    written = json.loads((chief_out / "metrics.json").read_text())
    assert written["cluster"]["bottlenecks_computed"] == 16
    pixels = _pixels(images / "blue" / "blue0.jpg", TINY_INPUT)
    scores = _frozen_scores(chief_out / "graph.pb", pixels)
    assert scores.shape == (1, 2) and scores.sum() == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- bundled module


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    """A CLI run with the bundled module on the example photos, fine-tuned at the default rate."""
    out = tmp_path_factory.mktemp("flower_run")
    shutil.copytree(EXAMPLE_DIR, out / "photos")
    with pytest.MonkeyPatch.context() as monkeypatch:
        status, result = _run_capturing(
            monkeypatch,
            retrain_args(
                out / "photos", out, "--fine_tune_steps=4", "--fine_tune_batch_size=8", steps=100
            ),
        )
    assert status == 0
    return out, result, json.loads((out / "metrics.json").read_text())


def test_small_learning_rate_keeps_test_accuracy(flower_run):
    _, _, metrics = flower_run
    tuned = metrics["fine_tune"]
    assert tuned["learning_rate"] == 1e-3 and tuned["test_images"] >= 5
    assert tuned["test_accuracy_before"] >= 0.6
    # At most one of the few test photos may change its answer after a few small steps.
    assert tuned["test_accuracy_after"] >= tuned["test_accuracy_before"] - 1 / tuned["test_images"]


def test_frozen_graph_of_fine_tuned_bundled_module(flower_run):
    out, result, _ = flower_run
    pixels = _pixels(next((EXAMPLE_DIR / "roses").glob("*.jpg")), result.input_size)
    np.testing.assert_allclose(
        _frozen_scores(out / "graph.pb", pixels),
        _memory_scores(result.module_object, result, pixels),
        atol=1e-4,
    )


def test_fine_tuning_shows_sparsity_per_block_in_tensorboard(flower_run):
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = flower_run
    events = EventAccumulator(str(out / "logs" / "fine_tune"), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()["tensors"]
    units = ["stem", *(f"block{i:02d}" for i in range(16)), "head"]  # EfficientNet-Lite0
    for kind in ("sparsity", "dead_units"):
        assert sorted(t for t in tags if t.startswith(kind + "/")) == sorted(
            f"{kind}/{u}" for u in units
        )
        for unit in units:
            (event,) = events.Tensors(f"{kind}/{unit}")  # 4 steps: measured once, at the end
            assert 0 <= float(tf.make_ndarray(event.tensor_proto)) <= 1
    zeros = [tf.make_ndarray(events.Tensors(f"sparsity/{u}")[0].tensor_proto) for u in units]
    assert 0.05 < np.mean(zeros) < 0.95  # ReLU6 networks are partly, not wholly, sparse


def test_activity_probe_measures_the_fine_tuned_weights(flower_run):
    from retrain.models.loading import resolve_module
    from retrain.training.activity import ActivityProbe

    _, result, _ = flower_run
    module = resolve_module("efficientnet_lite0")
    pixels = _pixels(next((EXAMPLE_DIR / "tulips").glob("*.jpg")), result.input_size)
    probe = ActivityProbe.for_module(module, result.module_object, pixels)
    activity = probe.measure()
    assert len(activity) == 18
    np.testing.assert_allclose(
        probe.net.features(pixels).numpy(), result.module_object(pixels).numpy(), atol=1e-4
    )


def test_fine_tune_learning_rate_auto_uses_the_finders_suggestion(tiny_run, tmp_path):
    out = tiny_run["out"]
    argv = retrain_args(
        out / "images",
        tmp_path,
        f"--tfhub_module={tiny_run['module'].path}",
        "--extraction_backend=tensorflow",
        "--testing_percentage=30",
        "--fine_tune_steps=2",
        "--fine_tune_batch_size=4",
        "--fine_tune_learning_rate=auto",
        steps=50,
    )
    assert cli.main(argv) == 0
    tuned = json.loads((tmp_path / "metrics.json").read_text())["fine_tune"]
    found = tuned["lr_find"]
    assert tuned["learning_rate"] == found["suggested_learning_rate"]
    assert 1e-7 <= found["suggested_learning_rate"] <= 0.1 * 1.05
    assert found["steps"] <= 60 and found["rates"][0] == pytest.approx(1e-7)


def test_auto_rates_are_refused_for_multi_worker_runs(tmp_path, capfd):
    for flag in ("--learning_rate=auto", "--fine_tune_learning_rate=auto"):
        argv = retrain_args(
            EXAMPLE_DIR, tmp_path, flag, "--distribution_strategy=multi_worker_mirrored"
        )
        assert cli.main(argv) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag.split("=")[0] in err and "'auto'" in err


# ----------------------------------------------------------------------------- safe by default


def _evaluation(accuracy: float, loss: float, count: int = 40):
    """An Evaluation of `count` images whose first accuracy * count are right."""
    from retrain.heads.evaluation import Evaluation

    right = np.arange(count) < round(accuracy * count)
    return Evaluation(accuracy, loss, np.where(right, 0, 1), [accuracy], np.zeros(count, np.int64))


def test_keep_best_keeps_step_zero_until_beaten_and_stops_on_patience():
    import tensorflow as tf

    from retrain.training.early_stopping import KeepBest

    variable = tf.Variable(0.0)
    figures = iter([(0.5, 0.7), (0.5, 0.69995), (0.5, 0.9), (0.75, 1.2), (0.75, float("nan"))])
    figures = [*figures, (1.0, float("inf")), (0.5, 0.1)]
    queue = iter(figures)
    watch = KeepBest(lambda: _evaluation(*next(queue)), [variable], patience=3)
    assert watch.best_step == 0 and not watch.stop
    for step in (1, 2, 3):  # a smaller loss than MIN_DELTA, a worse loss, a better accuracy
        variable.assign(float(step))
        watch.check(step)
    assert watch.best_step == 3 and watch.waited == 0
    for step in (4, 5, 6):  # diverged (NaN, inf), then a lower accuracy with a lower loss
        variable.assign(float(step))
        watch.check(step)
    assert watch.best_step == 3 and watch.waited == 3 and watch.stop
    watch.restore()
    assert float(variable.numpy()) == 3.0
    explained = watch.explain(6)
    assert "kept step 3 of 6: validation 75.0% vs the head alone 50.0%" in explained
    assert "+25.0 points" in explained and "outside noise" in explained and "N=40" in explained
    assert not KeepBest(lambda: _evaluation(0.5, 0.5), [variable], patience=0).stop
    plateau = SimpleNamespace(losses=[])
    plateau.update = plateau.losses.append
    late = KeepBest(lambda: _evaluation(0.5, 0.5), [variable], 2, plateau, judged_from=10)
    for step in (5, 9, 10):  # worse than step 0 each time; only step 10 counts
        late.check(step)
    assert late.waited == 1 and not late.stop and plateau.losses == [0.5]
    late.check(11)
    assert late.stop and late.best_step == 0 and plateau.losses == [0.5, 0.5]


def test_paired_gain_counts_only_the_images_the_two_disagree_on():
    from retrain.training.early_stopping import paired_gain

    head = _evaluation(0.5, 0.7, 100)
    gain = paired_gain(_evaluation(0.6, 0.6, 100), head)  # 10 more right, none fewer
    assert (gain.wins, gain.losses, gain.count) == (10, 0, 100)
    assert gain.points == pytest.approx(0.1) and gain.beyond_noise
    assert 0 < gain.low < gain.points and gain.high == pytest.approx(0.1)  # all 10 won
    assert gain.describe().startswith("+10.0 points, 95% interval +")
    # The same 10 points from 30 images won and 20 lost: within noise.
    mixed = _evaluation(0.6, 0.7, 100)
    mixed.predictions = np.roll(mixed.predictions, 20)  # right on 20-79; the head on 0-49
    tie = paired_gain(mixed, head)
    assert (tie.wins, tie.losses) == (30, 20) and tie.points == pytest.approx(0.1)
    assert not tie.beyond_noise and tie.low < 0 < tie.high
    assert not paired_gain(head, head).beyond_noise and paired_gain(head, head).points == 0


def test_a_step_better_within_noise_is_not_kept_but_resets_patience():
    import tensorflow as tf

    from retrain.training.early_stopping import KeepBest

    variable = tf.Variable(0.0)
    # N=40: two more images right (+5 points) is noise; ten more (+25 points) is not.
    queue = iter([(0.5, 0.7), (0.55, 0.6), (0.5, 0.7), (0.5, 0.7), (0.55, 0.5)])
    watch = KeepBest(lambda: _evaluation(*next(queue)), [variable], patience=2)
    for step in (1, 2, 3, 4):
        variable.assign(float(step))
        watch.check(step)
    assert watch.best_step == 0 and watch.top_step == 4 and watch.waited == 0 and not watch.stop
    watch.restore()
    assert float(variable.numpy()) == 0.0  # the head alone's values
    explained = watch.explain(4)
    assert (
        "kept the head alone" in explained
        and "no fine-tuned step beat it beyond noise" in explained
    )
    assert "the best, step 4: validation 55.0% vs 50.0%, +5.0 points" in explained
    assert watch.gain.wins == 2 and not watch.gain.beyond_noise


@pytest.fixture(scope="module")
def guarded_runs(tiny_module, tmp_path_factory):
    """CLI runs on the tiny module with validation images (evaluated every step, patience 2):
    the new layer alone; fine-tuning at a rate so large that every step only hurts; and
    fine-tuning a barely trained layer, which helps. {name: (folder, metrics, FineTuneResult)}."""
    root = tmp_path_factory.mktemp("guarded")
    for label, (r, g, b) in (("red", (200, 30, 30)), ("blue", (20, 40, 220))):
        for i in range(12):
            write_image(root / "images" / label / f"{label}{i}.jpg", color=(r, g + 7 * i, b))
    runs = {}
    for name, steps, flags in (
        ("head", 100, ["--fine_tune_steps=0"]),
        ("hurt", 100, ["--fine_tune_steps=30", "--fine_tune_learning_rate=1000"]),
        ("helps", 2, ["--fine_tune_steps=30", "--fine_tune_learning_rate=0.05"]),
    ):
        out = root / name
        argv = retrain_args(
            root / "images",
            out,
            f"--bottleneck_dir={root / 'bottlenecks'}",
            f"--tfhub_module={tiny_module}",
            f"--module_cache_dir={root / 'cache'}",
            "--extraction_backend=tensorflow",
            "--testing_percentage=20",
            "--validation_percentage=30",
            "--learning_rate=0.5",
            "--eval_step_interval=1",
            "--fine_tune_patience=2",
            "--fine_tune_batch_size=4",
            *flags,
            steps=steps,
        )
        result = None
        with pytest.MonkeyPatch.context() as monkeypatch:
            if name == "head":
                status = cli.main(argv)
            else:
                status, result = _run_capturing(monkeypatch, argv)
        assert status == 0
        runs[name] = (out, json.loads((out / "metrics.json").read_text()), result)
    return runs


def _guarded_pixels(runs) -> np.ndarray:
    images = runs["head"][0].parent / "images"
    return np.concatenate([_pixels(p, TINY_INPUT) for p in sorted(images.glob("*/*.jpg"))])


def test_fine_tuning_that_only_hurts_stops_early_and_exports_the_head_alone(guarded_runs):
    head_out, head, _ = guarded_runs["head"]
    hurt_out, hurt, _ = guarded_runs["hurt"]
    tuned = hurt["fine_tune"]
    # Patience counts from a third of the steps on (step 10): evaluations at 10 and 11.
    assert tuned["stopped_early"] and tuned["steps_run"] == 11 < tuned["steps"] == 30
    assert tuned["best_step"] == 0 and tuned["kept"] == "head alone"
    assert tuned["validation_images"] > 0 and tuned["validation_accuracy_before"] == 1.0
    assert tuned["validation_cross_entropy_best"] == tuned["validation_cross_entropy_before"]
    assert hurt["test_accuracy"] == head["test_accuracy"]  # the head's, on the bottlenecks
    # ... and says why: the whole network's path reads the same history as the cut's.
    assert tuned["discarded"]["cause"] == "rate_too_high"
    assert not tuned["validation_gain"]["beyond_noise"]
    codes = [finding["code"] for finding in hurt["health"]]
    assert "fine_tuning_discarded" in codes
    pixels = _guarded_pixels(guarded_runs)
    np.testing.assert_array_equal(
        _frozen_scores(hurt_out / "graph.pb", pixels), _frozen_scores(head_out / "graph.pb", pixels)
    )


def test_fine_tuning_that_helps_exports_its_best_step(guarded_runs, tiny_module):
    from retrain.models.loading import resolve_module

    out, metrics, result = guarded_runs["helps"]
    tuned = metrics["fine_tune"]
    assert tuned["kept"] == "fine-tuned" and tuned["best_step"] == result.best_step > 0
    assert tuned["validation_accuracy_best"] > tuned["validation_accuracy_before"]
    history = {record["step"]: record for record in result.history}
    assert history[result.best_step]["validation_accuracy"] == tuned["validation_accuracy_best"]
    assert metrics["test_accuracy"] == tuned["test_accuracy_after"]
    pixels = _guarded_pixels(guarded_runs)
    expected = _memory_scores(result.module_object, result, pixels)
    np.testing.assert_allclose(_frozen_scores(out / "graph.pb", pixels), expected, atol=1e-5)
    # ... which is the fine-tuned network, not the pretrained one with the same layer.
    pretrained = resolve_module(str(tiny_module)).load()
    assert np.abs(_memory_scores(pretrained, result, pixels) - expected).max() > 1e-4
