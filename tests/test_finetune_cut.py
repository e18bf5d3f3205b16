"""Tests of partial fine-tuning from a cached cut (retrain.training.cut,
retrain.training.fine_tune_partial).

One CLI run with the bundled EfficientNet-Lite0 on the example photos (with a cached distorted
copy of each training image) is shared by the tests of what it trains, caches and exports; the
bad settings each get their own one-line error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrain.cli import retrain as cli
from tests.conftest import EXAMPLE_DIR, retrain_args
from tests.test_finetune import _frozen_scores, _memory_scores, _pixels, _run_capturing

CUT = "block14"  # Lite0 has blocks 0-15: two blocks and the head above the cut


def _cut_args(photos: Path, out: Path, *extra: str) -> list[str]:
    return retrain_args(
        photos,
        out,
        f"--fine_tune_from={CUT}",
        "--fine_tune_steps=6",
        "--fine_tune_batch_size=8",
        "--eval_step_interval=3",
        "--flip_left_right",
        "--distorted_copies=1",
        *extra,
        steps=100,
    )


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    """A partial fine-tuning run, then the same run again on its filled cache with the rate
    the learning-rate finder suggests. Both keep any step better on validation, noise or
    not: 6 steps judged on 4 validation images never beat the head alone beyond noise, and
    the tests of what a kept step changes need one."""
    from retrain.training.early_stopping import Gain

    out = tmp_path_factory.mktemp("cut_run")
    shutil.copytree(EXAMPLE_DIR, out / "photos")
    runs = []
    for again, rate in (("", "0.01"), ("again", "auto")):
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(Gain, "beyond_noise", property(lambda gain: True))
            argv = _cut_args(
                out / "photos",
                out / again,
                f"--bottleneck_dir={out / 'cache'}",
                f"--fine_tune_learning_rate={rate}",
            )
            status, result = _run_capturing(
                monkeypatch, argv, "training.fine_tune_partial.fine_tune_from_cut"
            )
        assert status == 0
        runs.append((result, json.loads((out / again / "metrics.json").read_text())))
    return out, runs


def test_cut_activations_are_cached_in_their_own_folder_and_reused(cut_run):
    out, [(_, first), (_, second)] = cut_run
    cut = first["fine_tune"]["cut"]
    assert cut["from"] == CUT and cut["shape"] == [7, 7, 192]
    assert cut["values_per_image"] == 7 * 7 * 192
    trained = first["images"]["training"]
    assert cut["training_rows"] == 2 * trained  # each training image and its distorted copy
    total = sum(first["images"].values())
    assert cut["computed"] == total + trained
    assert second["fine_tune"]["cut"]["computed"] == 0  # all found in the cache
    assert first["fine_tune"]["learning_rate"] == 0.01 and first["fine_tune"]["lr_find"] is None
    search = second["fine_tune"]["lr_find"]  # ranged on the cached activations
    assert search["steps"] >= 10
    assert second["fine_tune"]["learning_rate"] == search["suggested_learning_rate"]
    descriptions = [json.loads(p.read_text()) for p in (out / "cache").glob("*/module.json")]
    cut_folders = [d for d in descriptions if d["module"].endswith(f"below {CUT}")]
    assert len(descriptions) == 2 and len(cut_folders) == 1  # never mixed with bottlenecks


def test_only_the_blocks_above_the_cut_change(cut_run):
    """The network kept differs from the pretrained one in the blocks above the cut and the head
    only. That needs a kept fine-tuned step (the head alone, step 0, changes nothing at all), so
    one of the two runs must keep one; a run that kept the head alone must change nothing."""
    from retrain.models.loading import resolve_module

    _, runs = cut_run
    kept = [metrics["fine_tune"]["best_step"] for _, metrics in runs]
    assert any(step > 0 for step in kept), f"no run kept a fine-tuned step: {kept}"
    pretrained = resolve_module("efficientnet_lite0").load().variables
    names = [v.name for v in pretrained]
    for (result, _), step in zip(runs, kept, strict=True):
        tuned = result.module_object.variables
        changed = {
            name.split("/")[2]  # efficient_net_lite/backbone/<unit>/...
            for name, a, b in zip(names, pretrained, tuned, strict=True)
            if not np.array_equal(a.numpy(), b.numpy())
        }
        if step == 0:
            assert changed == set()  # the head alone was kept
        else:
            assert changed and changed <= {"block14", "block15", "head"}, (step, changed)


def test_exported_graph_holds_the_network_kept(cut_run):
    out, [(result, metrics), _] = cut_run
    pixels = _pixels(next((EXAMPLE_DIR / "roses").glob("*.jpg")), result.input_size)
    np.testing.assert_allclose(
        _frozen_scores(out / "graph.pb", pixels),
        _memory_scores(result.module_object, result, pixels),
        atol=1e-4,
    )
    tuned = metrics["fine_tune"]
    assert tuned["steps_run"] >= 3 and tuned["validation_images"] > 0
    # The export check ran the exported graph on the test images from their files: what the
    # cached activations said of the network kept is what the file does.
    (check,) = metrics["export_checks"]
    assert check["agreement"] == 1.0


def test_a_rate_far_too_high_keeps_the_head_alone_and_says_why(cut_run, capfd):
    """Fine-tuning at a rate of 1.0 (the seeds' first user's mistake) only hurts: the head
    alone is exported, and the log, the summary, the metrics and the HTML report say that the
    rate is too high."""
    from retrain.models.loading import resolve_module

    cache = cut_run[0] / "cache"  # the activations at the cut are cached already
    out = cache.parent / "too_high"
    argv = _cut_args(
        cache.parent / "photos",
        out,
        f"--bottleneck_dir={cache}",
        "--fine_tune_learning_rate=1.0",
        "--fine_tune_steps=12",
        f"--report_html={out / 'report.html'}",
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        status, result = _run_capturing(
            monkeypatch, argv, "training.fine_tune_partial.fine_tune_from_cut"
        )
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    tuned = metrics["fine_tune"]
    assert tuned["kept"] == "head alone" and tuned["best_step"] == 0
    assert tuned["discarded"]["cause"] == "rate_too_high"
    assert tuned["test_accuracy_after"] == tuned["test_accuracy_before"]
    (finding,) = [f for f in metrics["health"] if f["code"] == "fine_tuning_discarded"]
    assert "the rate is too high" in finding["message"]
    assert "--fine_tune_learning_rate" in finding["suggestion"] and "auto" in finding["suggestion"]
    log = capfd.readouterr().err
    assert "no fine-tuned step beat" in log and "the rate is too high" in log
    assert "Health: no problem found" not in log
    assert "Fine-tuning thrown away (rate too high): lower --fine_tune_learning_rate" in log
    assert "the rate is too high" in (out / "report.html").read_text()
    # What is exported is the pretrained network with the trained layer.
    pixels = _pixels(next((EXAMPLE_DIR / "roses").glob("*.jpg")), result.input_size)
    pretrained = resolve_module("efficientnet_lite0").load()
    np.testing.assert_allclose(
        _frozen_scores(out / "graph.pb", pixels),
        _memory_scores(pretrained, result, pixels),
        atol=1e-4,
    )


def test_cut_model_splits_the_network_exactly():
    import tensorflow as tf

    from retrain.models.loading import resolve_module
    from retrain.training.cut import cut_module
    from retrain.training.fine_tune_partial import CutModel

    module = resolve_module("efficientnet_lite0")
    part = cut_module(module, "12")
    pixels = np.concatenate(
        [_pixels(p, module.input_size) for p in sorted(EXAMPLE_DIR.glob("*/*.jpg"))[:3]]
    )
    model = CutModel(part, np.zeros((1280, 2), np.float32), np.zeros(2, np.float32))
    features = model.features(part.load()(tf.constant(pixels)))
    np.testing.assert_allclose(features.numpy(), module.load()(pixels).numpy(), atol=1e-4)


def test_tflite_computes_the_activations_at_the_cut_like_tensorflow(tmp_path, monkeypatch):
    import tensorflow as tf

    from retrain.bottlenecks import backends
    from retrain.bottlenecks.stage import LazyModule
    from retrain.models.loading import resolve_module
    from retrain.training.cut import cut_module

    monkeypatch.setattr(backends, "gpu_present", lambda: False)
    part = cut_module(resolve_module("efficientnet_lite0"), "12")
    pixels = np.concatenate(
        [_pixels(p, part.input_size) for p in sorted(EXAMPLE_DIR.glob("*/*.jpg"))[:4]]
    )
    extractor, name, reason = backends.choose_backend(
        "auto", part, LazyModule(part), pixels, cache_dir=tmp_path
    )
    assert name == "tflite", reason
    expected = part.load()(tf.constant(pixels)).numpy()
    assert expected.shape == (4, 7 * 7 * 192) and np.abs(expected).max() > 1
    # Far below the float16 the activations are stored in (a step of 0.03 at 40).
    np.testing.assert_allclose(extractor(pixels), expected, atol=1e-4 * np.abs(expected).max())
    conversions = list((tmp_path / "tflite").glob("*.tflite"))
    assert [p.name.split("-")[0] for p in conversions] == [part.fingerprint]  # not the module's


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["--fine_tune_from=block16", "--fine_tune_steps=2"],
            "--fine_tune_from: 'block16' is not a block of this network: give block0 to block15",
        ),
        (["--fine_tune_from=top"], "--fine_tune_from: 'top' is not a block"),
        (["--fine_tune_from=block3"], "--fine_tune_from needs --fine_tune_steps > 0"),
        (
            ["--fine_tune_from=3", "--fine_tune_steps=2", "--flip_left_right"],
            "distortions must be cached too: give --distorted_copies",
        ),
    ],
)
def test_bad_cuts_are_one_line_errors(example_copy, tmp_path, capsys, extra, expected):
    status = cli.main(retrain_args(example_copy, tmp_path, *extra, steps=10))
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert expected in err.strip().splitlines()[-1], err


def test_a_module_that_cannot_be_cut_is_one_line_error(tmp_path, capsys):
    from retrain.models.savedmodel import export_image_module
    from tests.test_finetune import TINY_INPUT, _tiny_network

    export_image_module(_tiny_network(), tmp_path / "module", TINY_INPUT)
    photos = tmp_path / "photos"
    shutil.copytree(EXAMPLE_DIR, photos)
    argv = retrain_args(
        photos,
        tmp_path / "out",
        f"--tfhub_module={tmp_path / 'module'}",
        "--fine_tune_from=block1",
        "--fine_tune_steps=2",
        steps=10,
    )
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "--fine_tune_from needs a bundled EfficientNet-Lite" in err.strip().splitlines()[-1]
    assert not list((tmp_path / "out").rglob("*.vec.npy"))  # refused before any extraction


@pytest.mark.slow
def test_cut_fine_tunes_under_a_mirrored_strategy(example_copy, tmp_path):
    argv = [
        *retrain_args(example_copy, tmp_path, "--distribution_strategy=mirrored", steps=50),
        "--extraction_backend=tensorflow",
        f"--fine_tune_from={CUT}",
        "--fine_tune_steps=4",
        "--fine_tune_batch_size=8",
    ]
    assert cli.main(argv) == 0
    tuned = json.loads((tmp_path / "metrics.json").read_text())["fine_tune"]
    assert tuned["replicas"] >= 1 and tuned["steps_run"] == 4
    assert tuned["cut"]["computed"] == sum(
        json.loads((tmp_path / "metrics.json").read_text())["images"].values()
    )


# The cut fine-tuned with no strategy and with `mirrored` over 2 logical CPUs, on the same
# cached activations and batches (a fresh process: logical devices are set before any op).
CUT_MIRRORED_SCRIPT = """
import json, tempfile

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from retrain.data.stage import scan_images
from retrain.training import cut
from retrain.bottlenecks import distribute
from retrain.training import fine_tune_partial as finetune_cut
from retrain.config import FineTuningConfig, ModuleConfig, RetrainConfig
from retrain.heads.head import SoftmaxHead
from retrain.models.loading import resolve_module

module = resolve_module("efficientnet_lite0")
image_set = scan_images(RetrainConfig(image_dir="PHOTOS"), write_manifest=False)
head = SoftmaxHead(len(image_set.labels))
rng = np.random.default_rng(0)
layer = (rng.normal(0, 0.1, (1280, len(image_set.labels))).astype(np.float32),
         np.zeros(len(image_set.labels), np.float32))
settings = FineTuningConfig(steps=2, batch_size=4, learning_rate=0.01, from_block="block14")
folder = tempfile.mkdtemp()
values = []
for strategy in (None, distribute.make_strategy("mirrored")):
    part = cut.cut_module(module, "block14", strategy)
    acts = cut.cut_activations(image_set, part, folder, ModuleConfig(), 10**8)
    result = finetune_cut.fine_tune_from_cut(module, part, head, layer, acts, settings, strategy)
    values.append([v.numpy() for v in result.module_object.variables] + [result.weights])
    replicas = result.replicas
diff = max(float(np.abs(a - b).max()) for a, b in zip(*values, strict=True))
print("RESULT " + json.dumps({"replicas": replicas, "diff": diff}), flush=True)
"""


@pytest.mark.slow
def test_cut_over_two_replicas_matches_one(tmp_path):
    from tests.test_distribute import run_script

    script = CUT_MIRRORED_SCRIPT.replace("PHOTOS", str(EXAMPLE_DIR))
    result = run_script(script, tmp_path, timeout=600)
    assert result["replicas"] == 2
    assert result["diff"] < 1e-4  # the same steps, summed in another order
