"""docs/compatibility.md, "Compatibility with retrain.py": each "same" that a test can check,
checked here or where the table says (label normalisation, class order, the split formula and
--split_hash path in test_scan; the default Placeholder -> final_result graph in a TF1 client
in test_end_to_end; distortions in test_distort; the patched retrain.py in test_side_by_side)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from absl import flags

import retrain
from retrain.cli.flags import define_flags
from retrain.data.scan import display_path, split_for_file
from tests.conftest import ROOT, write_image
from tests.fault_tools import save_tiny_module

# retrain.py's flags and defaults at TF Hub's last commit; 0163eda lacks the last two and
# defaults to version 1 of the same Inception V3 module.
RETRAIN_PY_FLAGS = {
    "image_dir": "",
    "output_graph": "/tmp/output_graph.pb",
    "intermediate_output_graphs_dir": "/tmp/intermediate_graph/",
    "intermediate_store_frequency": 0,
    "output_labels": "/tmp/output_labels.txt",
    "summaries_dir": "/tmp/retrain_logs",
    "how_many_training_steps": 4000,
    "learning_rate": 0.01,
    "testing_percentage": 10,
    "validation_percentage": 10,
    "eval_step_interval": 10,
    "train_batch_size": 100,
    "test_batch_size": -1,
    "validation_batch_size": 100,
    "print_misclassified_test_images": False,
    "bottleneck_dir": "/tmp/bottleneck",
    "final_tensor_name": "final_result",
    "flip_left_right": False,
    "random_crop": 0,
    "random_scale": 0,
    "random_brightness": 0,
    "tfhub_module": "https://tfhub.dev/google/imagenet/inception_v3/feature_vector/3",
    "saved_model_dir": "",
    "logging_verbosity": "INFO",
    "checkpoint_path": "/tmp/_retrain_checkpoint",
}
# The table's "differs" rows among the defaults: a bundled offline module, and checkpoints
# only when asked for (a folder, for --resume).
OUR_DEFAULTS = {"tfhub_module": "efficientnet_lite0", "checkpoint_path": ""}


def compatibility_section() -> str:
    return (ROOT / "docs" / "compatibility.md").read_text()


def test_retrain_py_flags_keep_their_names_and_defaults():
    values = flags.FlagValues()
    define_flags(values)
    ours = {name: values[name].default for name in RETRAIN_PY_FLAGS}
    assert ours == {**RETRAIN_PY_FLAGS, **OUR_DEFAULTS}
    assert values["logging_verbosity"].parser.enum_values == [
        "DEBUG",
        "INFO",
        "WARN",
        "ERROR",
        "FATAL",
    ]


def test_the_readme_table_has_a_row_for_every_retrain_py_flag():
    rows = re.findall(r"^\| `--(\w+)`", compatibility_section(), flags=re.M)
    assert set(RETRAIN_PY_FLAGS) <= set(rows)
    assert len(rows) == len(set(rows))


def test_the_readme_table_names_tests_that_exist():
    """Each "checked by" cell: `file: name, name; file: name`, each name a test's start."""
    checked = 0
    for line in compatibility_section().splitlines():
        last = line.strip().strip("|").split("|")[-1].strip() if line.startswith("| ") else ""
        for ref in filter(None, last.split(";")) if last.startswith("test_") else ():
            file, _, names = ref.strip().partition(": ")
            source = (ROOT / "tests" / f"{file}.py").read_text()
            for name in filter(None, (part.split(" ")[0] for part in names.split(", "))):
                assert re.search(rf"^def test_{name}", source, flags=re.M), ref
                checked += 1
    assert checked > 20


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


MISFILED = next(
    name
    for name in (f"misfiled{k}.jpg" for k in range(100))
    if split_for_file(name, validation_percentage=20, testing_percentage=20) == "testing"
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A short run on two generated classes, one with a folder name that normalises, with the
    outputs retrain.py writes; (output folder, RunResult, the retrain logger's lines)."""
    out = tmp_path_factory.mktemp("compat")
    save_tiny_module(out / "module")
    for i in range(15):
        write_image(out / "photos" / "red" / f"r{i}.jpg", color=(200 + i, 20, 20))
        write_image(out / "photos" / "Blue_Sky" / f"b{i}.jpg", color=(20, 20, 200 + i))
    # A blue photo filed under red, named to land in the test split: a test image the layer
    # can only get wrong, so the log has misclassified lines to read.
    write_image(out / "photos" / "red" / MISFILED, color=(20, 20, 230))
    logger = logging.getLogger("retrain")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = retrain.run(
            retrain.RetrainConfig(
                image_dir=str(out / "photos"),
                data=retrain.DataConfig(testing_percentage=20, validation_percentage=20),
                module=retrain.ModuleConfig(
                    handle=str(out / "module"), extraction_backend="tensorflow"
                ),
                training=retrain.HeadTrainingConfig(how_many_training_steps=25),
                evaluation=retrain.EvaluationConfig(print_misclassified_test_images=True),
                export=retrain.ExportConfig(
                    output_graph=str(out / "graph.pb"),
                    output_labels=str(out / "labels.txt"),
                    final_tensor_name="my_scores",
                ),
                outputs=retrain.OutputsConfig(summaries_dir=str(out / "logs")),
            )
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, result, handler.lines


def test_labels_file_is_one_normalised_label_per_line_in_class_order(tiny_run):
    out, result, _ = tiny_run
    assert (out / "labels.txt").read_text() == "blue sky\nred\n"
    assert result.labels == ["blue sky", "red"]


def test_frozen_graph_maps_placeholder_to_the_final_tensor_name(tiny_run):
    import tensorflow as tf

    out, _, _ = tiny_run
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((out / "graph.pb").read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        scores = session.run("my_scores:0", {"Placeholder:0": np.zeros([1, 224, 224, 3])})
    assert scores.shape == (1, 2) and abs(scores.sum() - 1) < 1e-5


def test_tensorboard_runs_train_and_validation_hold_accuracy_and_cross_entropy(tiny_run):
    import tensorflow as tf

    out, _, _ = tiny_run
    for run in ("train", "validation"):
        tags = set()
        for event_file in (out / "logs" / run).glob("events.out.tfevents.*"):
            for event in tf.compat.v1.train.summary_iterator(str(event_file)):
                tags.update(value.tag for value in event.summary.value)
        assert {"accuracy", "cross_entropy"} <= tags, run


def test_final_test_accuracy_and_misclassified_lines_read_as_retrain_py_s(tiny_run):
    """The lines scripts reading retrain.py's log look for (side_by_side.py among them)."""
    _, result, lines = tiny_run
    (final,) = [line for line in lines if line.startswith("Final test accuracy")]
    match = re.fullmatch(r"Final test accuracy = (\d+\.\d)% \(N=(\d+)\)", final)
    assert match and float(match[1]) == round(100 * result.test.accuracy, 1)
    assert int(match[2]) == result.test.count == result.images["testing"]  # the whole split
    mistakes = result.misclassified()
    assert any(str(path).endswith(MISFILED) for path in result.test_paths)  # the pinned case
    assert mistakes  # the misfiled photo at least: it cannot be right and the rest too
    header = lines.index("=== MISCLASSIFIED TEST IMAGES ===")
    listed = [line for line in lines[header + 1 :] if "  (true: " in line]
    assert listed == lines[header + 1 : header + 1 + len(mistakes)]  # one line per mistake
    for line, mistake in zip(listed, mistakes, strict=True):
        # retrain.py's '%70s  %s' (path right-aligned in 70 columns, two spaces, the predicted
        # label) first, then what retrain adds.
        match = re.fullmatch(
            r"( *\S.*)  (red|blue sky)  \(true: (red|blue sky), score [01]\.\d{3}\)", line
        )
        assert match, line
        assert len(match[1]) >= 70 and match[1].strip() == display_path(mistake.path)
        assert match[2] == mistake.predicted != match[3] == mistake.actual


def test_a_tf1_hub_format_module_is_refused_in_one_line(tmp_path):
    """A TF1 SavedModel that is no TF1 Hub module (no tfhub_module.pb: those are converted,
    see test_scripts_compat) has no __call__, and retrain says so in one line."""
    import tensorflow as tf

    from retrain.models.loading import ModuleError, resolve_module

    module = tmp_path / "tf1_module"
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        images = tf.compat.v1.placeholder(tf.float32, [None, 224, 224, 3])
        features = tf.reduce_mean(images, axis=[1, 2])
        builder = tf.compat.v1.saved_model.Builder(str(module))
        signature = tf.compat.v1.saved_model.predict_signature_def(
            {"images": images}, {"default": features}
        )
        builder.add_meta_graph_and_variables(session, [], signature_def_map={"default": signature})
        builder.save()
    with pytest.raises(ModuleError, match="no __call__: not a TF2 image feature-vector") as info:
        resolve_module(str(module))
    assert "\n" not in str(info.value)
