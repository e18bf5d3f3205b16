"""Scripts written for retrain.py, the "TensorFlow for Poets" retrain.py and label_image.py run
unchanged, or fail in one line (issue 35; docs/compatibility.md, "Scripts").

The invocations are written the way those scripts write them: flags with a space or `=`, prefixes,
flags retrain never had, the Poets' --architecture and label_image's old input names. The
end-to-end ones share one bottleneck cache (the module-scoped `poets_run` fills it), so each
takes a few seconds."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from label_image import cli as label_cli
from label_image import compat as label_compat
from retrain.cli import retrain as cli
from retrain.cli.compat_argv import rewrite_argv
from retrain.cli.flags import TABLE, flag_kind
from retrain.cli.poets import poets_argv
from retrain.errors import UsageError
from retrain.utils.handles import tf1_hub_module
from tests.conftest import EXAMPLE_DIR

KINDS = {flag.name: flag_kind(flag) == "bool" for flag in TABLE}
TF1_URL = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/1"


def rewrite(*words: str):
    return rewrite_argv(["retrain", *words], KINDS)


# ----------------------------------------------------------------------------- argv, as argparse


def test_an_unambiguous_prefix_is_the_flag_with_one_warning():
    out = rewrite("--summaries", "/s", "--how_many_training_step=5", "--noflip", "--image_dir=d")
    assert out.argv == [
        "retrain",
        "--summaries_dir=/s",
        "--how_many_training_steps=5",
        "--noflip_left_right",
        "--image_dir=d",
    ]
    assert out.warnings == [
        "read --summaries as --summaries_dir",
        "read --how_many_training_step as --how_many_training_steps",
        "read --noflip as --noflip_left_right",
    ]


def test_an_ambiguous_prefix_or_a_typo_of_ours_is_one_line_with_the_candidates():
    with pytest.raises(UsageError, match=r"^--output is ambiguous: it could be --output_graph, "):
        rewrite("--output=x")
    with pytest.raises(
        UsageError,
        match=r"^unknown flag --how_many_trainig_steps: did you mean --how_many_training_steps\?$",
    ):
        rewrite("--how_many_trainig_steps", "10")


def test_an_unknown_flag_is_dropped_with_its_value_and_a_warning():
    out = rewrite("--image_dir", "d", "--gpu_memory_fraction", "0.5", "--verbose", "--seed=3")
    assert out.argv == ["retrain", "--image_dir=d"]
    assert out.warnings == [
        "ignored the unknown flag --gpu_memory_fraction 0.5 (retrain.py ignored it)",
        "ignored the unknown flag --verbose (retrain.py ignored it)",
        "ignored the unknown flag --seed=3 (retrain.py ignored it)",
    ]


def test_a_word_after_a_boolean_flag_is_its_value_and_stray_words_are_warnings():
    out = rewrite("--flip_left_right", "False", "--print_misclassified_test_images", "1", "extra")
    assert out.argv == [
        "retrain",
        "--flip_left_right=false",
        "--print_misclassified_test_images=true",
    ]
    assert out.warnings[0] == (
        "read --flip_left_right False as --flip_left_right=false (retrain.py ignored the word "
        "'False' and turned --flip_left_right on)"
    )
    assert out.warnings[2] == "ignored the stray argument 'extra' (retrain.py ignored it)"
    assert rewrite("--flip_left_right", "--image_dir=d").argv[1:] == [
        "--flip_left_right",
        "--image_dir=d",
    ]


# ----------------------------------------------------------------------------- the Poets flags


def test_architecture_maps_to_the_bundled_module_and_model_dir_is_ignored():
    out = rewrite("--model_dir=tf_files/models/", "--architecture", "mobilenet_0.50_224")
    assert poets_argv(out, "efficientnet_lite0") == ["retrain", "--tfhub_module=efficientnet_lite0"]
    assert out.warnings == [
        "ignored --model_dir tf_files/models/: retrain downloads no module for a bundled one "
        "(converted modules are kept in --module_cache_dir)",
        "--architecture mobilenet_0.50_224: using the bundled efficientnet_lite0 instead (needs "
        "no network)",
    ]
    out = rewrite("--architecture=inception_v3", "--tfhub_module=efficientnet_lite1")
    assert poets_argv(out, "efficientnet_lite0") == ["retrain", "--tfhub_module=efficientnet_lite1"]
    assert out.warnings == [
        "ignored --architecture inception_v3: --tfhub_module efficientnet_lite1 is given"
    ]


def test_a_quantized_architecture_also_asks_for_an_int8_tflite_beside_the_graph():
    out = rewrite("--output_graph=tf_files/g.pb", "--architecture=mobilenet_1.0_224_quantized")
    assert poets_argv(out, "efficientnet_lite0")[2:] == [
        "--tfhub_module=efficientnet_lite0",
        "--output_tflite=tf_files/g.tflite",
        "--quantize=int8",
    ]
    assert out.warnings[-1].endswith(
        "quantized as int8 to tf_files/g.tflite (TF 2 quantizes after training, not during it)"
    )
    out = rewrite("--architecture=mobilenet_0.25_128_quantized")
    assert "--output_tflite=/tmp/output_graph.tflite" in poets_argv(out, "efficientnet_lite0")
    out = rewrite("--architecture=mobilenet_v2_1.4_224", "--output_tflite=m.tflite")
    assert poets_argv(out, "efficientnet_lite0")[-1] == "--tfhub_module=efficientnet_lite0"


def test_an_architecture_the_poets_script_did_not_know_is_one_line():
    with pytest.raises(UsageError, match=r"^--architecture resnet_50: not a name the Poets"):
        poets_argv(rewrite("--architecture", "resnet_50"), "efficientnet_lite0")


# ----------------------------------------------------------------------------- TF1 Hub handles


@pytest.mark.parametrize(
    "handle, tf2",
    [
        (TF1_URL, "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/4"),
        (
            "https://tfhub.dev/google/imagenet/inception_v3/classification/2",
            "https://tfhub.dev/google/imagenet/inception_v3/feature_vector/4",
        ),
        (
            "https://tfhub.dev/google/imagenet/mobilenet_v1_100_224/quantops/feature_vector/3",
            "https://tfhub.dev/google/imagenet/mobilenet_v1_100_224/feature_vector/4",
        ),
        (
            "https://tfhub.dev/google/efficientnet/b0/feature-vector/1",
            "https://tfhub.dev/tensorflow/efficientnet/b0/feature-vector/1",
        ),
        (
            "https://storage.googleapis.com/tfhub-modules/google/imagenet/inception_v3/"
            "feature_vector/1.tar.gz",
            "https://tfhub.dev/google/imagenet/inception_v3/feature_vector/4",
        ),
    ],
)
def test_tf1_hub_handles_are_told_by_their_url(handle, tf2):
    module = tf1_hub_module(handle)
    assert module is not None and module.tf2_handle == tf2


@pytest.mark.parametrize(
    "handle",
    [
        "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/4",
        "https://tfhub.dev/google/tf2-preview/mobilenet_v2/feature_vector/4",
        "https://example.com/google/imagenet/inception_v3/feature_vector/1",
        "efficientnet_lite0",
        "/models/google/imagenet/inception_v3/feature_vector/1",
    ],
)
def test_other_handles_are_not_tf1(handle):
    assert tf1_hub_module(handle) is None


def test_a_tf1_url_offline_is_one_line_before_tensorflow_or_any_image(tmp_path):
    """The image folder is empty: reading it would be another error."""
    (tmp_path / "photos").mkdir()
    code = (
        "import sys; from retrain.utils import handles; "
        "handles.host_reachable = lambda host, timeout=2.0: False; "
        "from retrain.cli import retrain as cli; "
        f"status = cli.main(['retrain', '--image_dir', {str(tmp_path / 'photos')!r}, "
        f"'--tfhub_module', {TF1_URL!r}, '--how_many_training_step', '100']); "
        "sys.exit(10 if 'tensorflow' in sys.modules else status)"
    )
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 10
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"retrain: error: --tfhub_module {TF1_URL}: a TF1 Hub module, which cannot be fetched "
        "without a network; give --tfhub_module efficientnet_lite0 (bundled, offline) instead, "
        "or online its TF2 version "
        "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/4"
    ]


def test_any_url_offline_is_one_line_unless_tensorflow_hub_s_cache_has_it(tmp_path, monkeypatch):
    import hashlib

    from retrain.utils import handles

    url = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"
    monkeypatch.setattr(handles, "host_reachable", lambda host, timeout=2.0: False)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    with pytest.raises(UsageError) as info:
        cli.check_hub_handle(url)
    assert str(info.value) == (
        f"--tfhub_module {url}: cannot be fetched without a network (tfhub.dev cannot be "
        "reached); give --tfhub_module efficientnet_lite0 (bundled, offline) or a SavedModel folder"
    )
    for handle in (url, TF1_URL):  # fetched before: resolving it needs no network
        cached = tmp_path / hashlib.sha1(handle.encode()).hexdigest()
        cached.mkdir()
        (cached / "saved_model.pb").write_bytes(b"")
        cli.check_hub_handle(handle)
    cli.check_hub_handle("efficientnet_lite0")  # no URL: nothing to fetch


def test_a_proxy_counts_as_a_network(monkeypatch):
    from retrain.utils.handles import host_reachable

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert host_reachable("host.invalid")
    monkeypatch.delenv("HTTPS_PROXY")
    for name in ("https_proxy", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert not host_reachable("host.invalid", timeout=1.0)

    # A name lookup that hangs (getaddrinfo has no timeout) counts as offline, in time.
    def hang(*args, **kwargs):
        time.sleep(5)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    assert not host_reachable("tfhub.dev", timeout=0.5)
    assert time.monotonic() - start < 2


def write_tf1_hub_module(folder: Path, signature: str = "image_feature_vector") -> Path:
    """A tiny TF1 Hub format module: a TF1 SavedModel (written with TF 1's API, as hub.Module's
    exporter did) whose `signature` maps images [N, 224, 224, 3] to 5 features, and the
    `tfhub_module.pb` (a ModuleDef, format 3) that marks the format."""
    import tensorflow as tf

    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        images = tf.compat.v1.placeholder(tf.float32, [None, 224, 224, 3], name="images")
        weights = tf.compat.v1.get_variable(
            "w", initializer=tf.constant(np.arange(15, dtype=np.float32).reshape(3, 5))
        )
        features = tf.matmul(tf.reduce_mean(images, axis=[1, 2]), weights)
        session.run(tf.compat.v1.global_variables_initializer())
        builder = tf.compat.v1.saved_model.Builder(str(folder))
        spec = tf.compat.v1.saved_model.predict_signature_def(
            {"images": images}, {"default": features}
        )
        builder.add_meta_graph_and_variables(session, [], signature_def_map={signature: spec})
        builder.save()
    (folder / "tfhub_module.pb").write_bytes(bytes([8, 3]))  # ModuleDef{format: FORMAT_V3}
    return folder


def test_a_tf1_hub_module_online_is_loaded_as_hub_keras_layer_loads_it(tmp_path, monkeypatch):
    import tensorflow as tf
    import tensorflow_hub as hub

    from retrain.models.loading import ModuleError, resolve_module

    module_dir = write_tf1_hub_module(tmp_path / "tf1")
    monkeypatch.setattr(hub, "resolve", lambda handle: str(module_dir))  # "downloaded"
    module = resolve_module(TF1_URL, cache_dir=tmp_path / "cache")
    assert module.input_size == (224, 224) and module.feature_dim == 5
    images = tf.random.uniform([2, 224, 224, 3], seed=1)
    expected = hub.KerasLayer(
        str(module_dir), signature="image_feature_vector", output_key="default"
    )(images)
    np.testing.assert_allclose(module.load()(images).numpy(), expected.numpy(), rtol=1e-5)
    again = resolve_module(TF1_URL, cache_dir=tmp_path / "cache")  # converted once, then read
    assert again == module
    other = write_tf1_hub_module(tmp_path / "other", signature="image_classification")
    monkeypatch.setattr(hub, "resolve", lambda handle: str(other))
    with pytest.raises(ModuleError, match="without an image_feature_vector or default signature"):
        resolve_module(TF1_URL, cache_dir=tmp_path / "cache")


def test_a_tf1_url_online_trains_end_to_end(tmp_path, monkeypatch, capsys):
    """retrain.py's kind of command with a TF1 module URL, the network faked: the module is
    fetched (here: a tiny one made above), converted, and a layer trained on its features."""
    import tensorflow_hub as hub

    from retrain.utils import handles
    from tests.conftest import example_subset

    module_dir = write_tf1_hub_module(tmp_path / "tf1")
    monkeypatch.setattr(handles, "host_reachable", lambda host, timeout=2.0: True)
    monkeypatch.setattr(hub, "resolve", lambda handle: str(module_dir))
    status, lines = retrain_main(
        capsys,
        f"--image_dir={example_subset(tmp_path / 'photos')}",
        f"--tfhub_module={TF1_URL}",
        f"--module_cache_dir={tmp_path / 'cache'}",
        f"--bottleneck_dir={tmp_path / 'bottlenecks'}",
        f"--output_graph={tmp_path / 'graph.pb'}",
        f"--output_labels={tmp_path / 'labels.txt'}",
        f"--summaries_dir={tmp_path / 'logs'}",
        "--how_many_training_steps=10",
        "--extraction_backend=tensorflow",  # the TFLite check of a new module is the slow part
    )
    assert status == 0, lines
    assert f"I Module {TF1_URL}: input 224x224, 5 features" in lines  # the TF1 module's own
    assert (tmp_path / "labels.txt").read_text() == "daisy\nroses\n"
    status, printed, _ = label_image(
        capsys, f"--graph={tmp_path / 'graph.pb'}", next((tmp_path / "photos" / "daisy").iterdir())
    )
    assert status == 0 and {line.split()[0] for line in printed} == {"daisy", "roses"}


def test_a_tf1_url_online_passes_the_flag_check(monkeypatch):
    from retrain.utils import handles

    monkeypatch.setattr(handles, "host_reachable", lambda host, timeout=2.0: True)
    cli.check_hub_handle(TF1_URL)  # no error: the module is fetched and converted


# ----------------------------------------------------------------------------- end to end


def retrain_main(capsys, *words: str) -> tuple[int, list[str]]:
    status = cli.main(["retrain", *words])
    return status, capsys.readouterr().err.splitlines()


def label_image(capsys, *words: str) -> tuple[int, list[str], list[str]]:
    status = label_cli.main(["label-image", *map(str, words)])
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err.splitlines()


@pytest.fixture(scope="module")
def poets_run(tmp_path_factory):
    """The codelab's command, as its scripts/retrain.py took it; fills the shared cache."""
    out = tmp_path_factory.mktemp("poets")
    tf_files = out / "tf_files"
    log = out / "stderr.txt"
    with pytest.MonkeyPatch.context() as patch, open(log, "w") as stderr:
        patch.setattr(sys, "stderr", stderr)  # a real file: the run duplicates its descriptor
        status = cli.main(
            [
                "retrain",
                f"--bottleneck_dir={out / 'bottlenecks'}",
                "--how_many_training_steps=30",
                f"--model_dir={tf_files / 'models'}/",
                f"--summaries_dir={tf_files / 'training_summaries' / 'mobilenet_0.50_224'}",
                f"--output_graph={tf_files / 'retrained_graph.pb'}",
                f"--output_labels={tf_files / 'retrained_labels.txt'}",
                "--architecture=mobilenet_0.50_224",
                f"--image_dir={EXAMPLE_DIR}",
            ]
        )
    return out, status, log.read_text().splitlines()


def test_the_poets_codelab_runs_and_its_label_image_step_prints_labels(poets_run, capsys):
    out, status, lines = poets_run
    tf_files = out / "tf_files"
    assert status == 0, lines
    assert any((out / "bottlenecks").rglob("*")), "the cache is where the script asked"
    assert any("using the bundled efficientnet_lite0" in line for line in lines)
    assert any("ignored --model_dir" in line for line in lines)
    assert (tf_files / "retrained_labels.txt").read_text().split("\n")[:2] == ["daisy", "dandelion"]
    assert list((tf_files / "training_summaries" / "mobilenet_0.50_224").iterdir())
    image = EXAMPLE_DIR / "roses" / sorted(p.name for p in (EXAMPLE_DIR / "roses").iterdir())[0]
    # The codelab's label_image: its own flags for a mobilenet graph, labels beside the graph.
    status, printed, err = label_image(
        capsys,
        f"--graph={tf_files / 'retrained_graph.pb'}",
        f"--image={image}",
        "--input_layer=input",
        "--input_height=224",
        "--input_width=224",
        "--input_mean=128",
        "--input_std=128",
    )
    assert status == 0, err
    assert err == [
        "label-image: warning: " + label_compat.missing_input_warning("input"),
        "label-image: warning: ignored --input_mean 128 --input_std 128: they scale pixels to "
        "[-1, 0.992], but Placeholder takes [0, 1]",
    ]
    assert printed[0].split()[0] in {"daisy", "dandelion", "roses", "sunflowers", "tulips"}
    status, plain, _ = label_image(capsys, f"--graph={tf_files / 'retrained_graph.pb'}", image)
    assert plain == printed  # the same scores as a plain call: the scaling was retrain's


def test_a_retrain_py_script_with_prefixes_unknown_flags_and_a_false(poets_run, capsys, tmp_path):
    out, _, _ = poets_run
    status, lines = retrain_main(
        capsys,
        "--image_dir",
        str(EXAMPLE_DIR),
        "--bottleneck_dir",
        str(out / "bottlenecks"),
        "--how_many_training_step",
        "20",
        "--summaries",
        str(tmp_path / "logs"),
        "--output_graph",
        str(tmp_path / "output_graph.pb"),
        "--output_labels",
        str(tmp_path / "output_labels.txt"),
        "--flip_left_right",
        "False",
        "--num_gpus",
        "1",
    )
    assert status == 0, lines
    assert "W read --how_many_training_step as --how_many_training_steps" in lines
    assert "W ignored the unknown flag --num_gpus 1 (retrain.py ignored it)" in lines
    assert any(line.startswith("W read --flip_left_right False as") for line in lines)
    assert (tmp_path / "logs" / "train").is_dir()
    # TensorFlow's label_image spellings: final_result:0, an old graph's Mul, no --labels.
    image = next((EXAMPLE_DIR / "tulips").iterdir())
    status, printed, err = label_image(
        capsys,
        "--graph",
        tmp_path / "output_graph.pb",
        "--output_layer=final_result:0",
        "--input_layer=Mul",
        "--image",
        image,
    )
    assert status == 0 and len(err) == 1 and "using Placeholder" in err[0]
    labels = (tmp_path / "output_labels.txt").read_text().split("\n")
    assert len(printed) == 5 and all(line.rsplit(" ", 1)[0] in labels for line in printed)


def test_label_image_takes_tflite_s_flags_and_refuses_another_run_s_labels(
    poets_run, capsys, tmp_path
):
    out, _, _ = poets_run
    graph = tmp_path / "model.pb"
    graph.write_bytes((out / "tf_files" / "retrained_graph.pb").read_bytes())
    image = next((EXAMPLE_DIR / "daisy").iterdir())
    status, printed, err = label_image(capsys, f"--graph={graph}", image)
    assert status == 2 and printed == []
    assert err == [
        f"label-image: error: --labels: {graph} carries no labels and none are beside it "
        f"({tmp_path / 'output_labels.txt'}, {tmp_path / 'retrained_labels.txt'}, "
        f"{tmp_path / 'model.txt'})"
    ]
    (tmp_path / "model.txt").write_text((out / "tf_files" / "retrained_labels.txt").read_text())
    status, printed, err = label_image(
        capsys, "--model_file", graph, "--num_threads", "2", "-i", image, "--input_height=299"
    )
    assert status == 0 and len(printed) == 5
    assert err == [
        "label-image: warning: ignored --num_threads 2: label-image chooses its own threads",
        "label-image: warning: ignored --input_height 299: the graph takes "
        "224x224 images, so each image is resized to that",
    ]
    status, with_label_file, _ = label_image(
        capsys, f"--model_file={graph}", f"--label_file={tmp_path / 'model.txt'}", image
    )
    assert with_label_file == printed


def test_label_image_helpfull_prints_the_help(capsys):
    assert label_cli.main(["label-image", "--helpfull"]) == 0
    assert "--input_layer" in capsys.readouterr().out


@pytest.mark.slow  # int8 calibration runs the network on a few hundred decoded images
def test_a_quantized_poets_run_writes_an_int8_tflite_that_tflite_s_label_image_reads(
    poets_run, capsys, tmp_path
):
    out, _, _ = poets_run
    graph = tmp_path / "tf_files" / "retrained_graph.pb"
    status, lines = retrain_main(
        capsys,
        f"--bottleneck_dir={out / 'bottlenecks'}",
        "--how_many_training_steps=20",
        f"--output_graph={graph}",
        f"--output_labels={tmp_path / 'tf_files' / 'retrained_labels.txt'}",
        "--architecture=mobilenet_1.0_224_quantized",
        f"--image_dir={EXAMPLE_DIR}",
    )
    assert status == 0, lines
    tflite = graph.with_suffix(".tflite")
    assert any(f"quantized as int8 to {tflite}" in line for line in lines)
    assert tflite.is_file()
    image = next((EXAMPLE_DIR / "sunflowers").iterdir())
    status, printed, err = label_image(
        capsys,
        "-m",
        tflite,
        "-l",
        graph.with_name("retrained_labels.txt"),
        "-i",
        image,
        "--input_mean",
        "127.5",
        "--input_std",
        "127.5",
    )
    assert status == 0 and len(printed) == 5
    assert err == [
        "label-image: warning: ignored --input_mean 127.5 --input_std 127.5: they scale pixels "
        "to [-1, 1], but Placeholder takes [0, 1]"
    ]
