"""The library under the command line: its shape (imports), its API and each stage alone.

The command line is a thin layer: below `cli`/`flags` nothing reads absl flags, no two modules
import each other, and `retrain.run(RetrainConfig(...))` does what `retrain --flags` does.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retrain
from retrain.cli import retrain as cli
from retrain.cli.flags import FLAG_FIELDS, flag_for_field
from retrain.config import (
    CacheConfig,
    ExportConfig,
    HeadTrainingConfig,
    ModuleConfig,
    OutputsConfig,
    RetrainConfig,
)
from retrain.errors import ConfigError
from tests.conftest import ROOT, retrain_args, write_image
from tests.fault_tools import save_tiny_module
from tests.test_layout import type_checking_nodes

PACKAGE = ROOT / "retrain"
# The command lines: retrain's, and retrain-beam-extract's (which reads retrain's flag
# definitions for the options they share).
COMMAND_LINE_MODULES = {"retrain.cli.retrain", "retrain.cli.flags", "retrain.cli.beam_extract"}
TIMING_KEYS = re.compile(r"seconds|per_second")


# ----------------------------------------------------------------------------- shape


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports when it runs (top level or in functions; not
    for type checking only, which never runs), and absl.flags if it imports that."""
    tree = ast.parse(path.read_text())
    typing_only = type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in known or name == "absl.flags":
                found.add(name)
    # `from retrain import x` names the package too; only the module x is an edge.
    return found - {"retrain"} if any(n.startswith("retrain.") for n in found) else found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def test_only_the_command_line_reads_absl_flags():
    readers = {name for name, imports in import_graph().items() if "absl.flags" in imports}
    assert readers == COMMAND_LINE_MODULES


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a ring, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_two_modules_import_each_other():
    graph = {
        name: {i for i in imports if i != "absl.flags"} for name, imports in import_graph().items()
    }
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_run_takes_a_config_not_flags():
    from absl import flags

    from retrain.cli.flags import define_flags

    flag_values = flags.FlagValues()
    define_flags(flag_values)
    with pytest.raises(TypeError, match="RetrainConfig"):
        retrain.run(flag_values)


def test_importing_retrain_does_not_import_tensorflow():
    code = "import sys, retrain; retrain.RetrainConfig('x'); print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- config


def test_every_flag_maps_to_one_config_setting():
    from retrain.config import leaf_fields

    settings = dict(leaf_fields(RetrainConfig(image_dir="x")))
    assert set(FLAG_FIELDS.values()) <= set(settings)
    assert len(set(FLAG_FIELDS.values())) == len(FLAG_FIELDS)
    assert flag_for_field("fine_tuning.learning_rate") == "--fine_tune_learning_rate"


def test_defaults_are_retrain_py_s_and_write_nothing():
    config = RetrainConfig(image_dir="x")
    assert config.training.how_many_training_steps == 4000
    assert config.training.learning_rate == 0.01
    assert config.training.train_batch_size == 100
    assert (config.data.testing_percentage, config.data.validation_percentage) == (10, 10)
    assert config.module.handle == "efficientnet_lite0"
    assert config.export.final_tensor_name == "final_result"
    paths = [config.export.output_graph, config.outputs.summaries_dir, config.cache.bottleneck_dir]
    assert paths == [None, None, None]


@pytest.mark.parametrize(
    ("config", "field", "words"),
    [
        (RetrainConfig(image_dir=""), "image_dir", "is required"),
        (
            RetrainConfig(image_dir=".", training=HeadTrainingConfig(learning_rate=-1.0)),
            "training.learning_rate",
            "must be positive",
        ),
        (
            RetrainConfig(image_dir=".", module=ModuleConfig(handle="no_such_model")),
            "module.handle",
            "unknown module",
        ),
        (
            RetrainConfig(image_dir=".", export=ExportConfig(intermediate_store_frequency=5)),
            "export.intermediate_store_frequency",
            "needs export.intermediate_output_graphs_dir",
        ),
    ],
)
def test_validate_names_the_setting(config, field, words):
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert info.value.fields[0] == field
    assert str(info.value).startswith(field) and words in str(info.value)
    assert info.value.render(flag_for_field).startswith(flag_for_field(field))


# ----------------------------------------------------------------------------- the API


def api_config(image_dir: Path, out: Path, steps: int = 200) -> RetrainConfig:
    """The RetrainConfig of `retrain_args(image_dir, out, steps=steps)`, written by hand."""
    return RetrainConfig(
        image_dir=str(image_dir),
        cache=CacheConfig(bottleneck_dir=str(out / "bottlenecks")),
        training=HeadTrainingConfig(how_many_training_steps=steps),
        export=ExportConfig(
            output_graph=str(out / "graph.pb"), output_labels=str(out / "labels.txt")
        ),
        outputs=OutputsConfig(
            summaries_dir=str(out / "logs"), metrics_json=str(out / "metrics.json")
        ),
    )


def comparable(metrics: dict, out: Path) -> dict:
    """Metrics without timings, with output paths relative to `out`."""
    kept = {k: v for k, v in metrics.items() if not TIMING_KEYS.search(k)}
    for key in ("output_graph", "output_labels"):
        kept[key] = str(Path(kept[key]).relative_to(out))
    kept["export_checks"] = [
        {k: str(Path(v).relative_to(out)) if k == "path" else v for k, v in check.items()}
        for check in kept.get("export_checks", [])
    ]
    for check in kept["export_checks"]:
        check.pop("seconds", None)
    return kept


def test_api_metrics_equal_the_command_line_s(example_copy, tmp_path):
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    assert cli.main(retrain_args(example_copy, cli_out, steps=200)) == 0
    written = json.loads((cli_out / "metrics.json").read_text())

    result = retrain.run(api_config(example_copy, api_out))
    assert comparable(result.metrics(), api_out) == comparable(written, cli_out)
    assert json.loads((api_out / "metrics.json").read_text()) == result.metrics()
    assert result.labels == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert result.head.weights.shape == (1280, 5) and result.head.biases.shape == (5,)
    assert result.test.count == result.images["testing"] > 0
    assert set(result.outputs) == {"output_graph", "output_labels", "metrics_json"}
    assert all(Path(path).exists() for path in result.outputs.values())
    assert 0 < result.timings.extraction <= result.timings.bottlenecks <= result.timings.total


def test_api_writes_only_what_the_config_names(example_copy, tmp_path, monkeypatch):
    import logging
    import tempfile

    work, temporary = tmp_path / "work", tmp_path / "temporary"
    work.mkdir(), temporary.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    result = retrain.run(
        RetrainConfig(
            image_dir=str(example_copy), training=HeadTrainingConfig(how_many_training_steps=50)
        )
    )
    assert result.outputs == {} and result.bottlenecks_computed > 70
    assert list(work.iterdir()) == []
    assert list(temporary.glob("retrain-*")) == []  # the vectors' folder is gone
    assert (root.handlers, root.level) == (handlers, level)  # the caller's logging, untouched


def readme_example() -> str:
    """The Python example of docs/library.md."""
    text = (ROOT / "docs" / "library.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (example,) = [block for block in blocks if "retrain.run(" in block]
    return example


def test_readme_api_example_runs(tmp_path):
    example = readme_example()
    assert example.count('"/tmp/') == 3
    code = example.replace('"/tmp/', f'"{tmp_path}/')
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"test accuracy \d+\.\d% of \d+ images", done.stdout), done.stdout
    assert (tmp_path / "flowers.pb").exists() and (tmp_path / "flowers.txt").exists()


# ----------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def tiny_module_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "module"
    save_tiny_module(path)
    return path


@pytest.fixture
def colours(tmp_path) -> Path:
    """Two classes of generated images, 12 each: red and blue gradients."""
    for i in range(12):
        write_image(tmp_path / "images" / "red" / f"r{i}.png", color=(200 + i, 20, 20))
        write_image(tmp_path / "images" / "blue" / f"b{i}.png", color=(20, 20, 200 + i))
    return tmp_path / "images"


def test_scan_stage_splits_and_writes_the_manifest(colours, tmp_path):
    from retrain.data.stage import scan_images

    manifest = tmp_path / "manifest.csv"
    config = RetrainConfig(
        image_dir=str(colours),
        data=retrain.DataConfig(testing_percentage=20, validation_percentage=20),
        outputs=OutputsConfig(split_manifest=str(manifest)),
    )
    image_set = scan_images(config)
    assert image_set.labels == ["blue", "red"] and len(image_set) == 24
    rows = manifest.read_text().splitlines()
    assert rows[0] == "path,label,split" and len(rows) == 25
    assert sum(image_set.split_counts().values()) == 24


def test_bottleneck_stage_computes_then_reuses(colours, tmp_path, tiny_module_dir):
    from retrain.bottlenecks.stage import LazyModule, compute_bottlenecks, load_module
    from retrain.data.scan import scan_image_dir

    image_set = scan_image_dir(colours, 0, 0)
    settings = ModuleConfig(handle=str(tiny_module_dir), extraction_backend="tensorflow")
    module = load_module(settings)

    def stage():
        return compute_bottlenecks(
            image_set, module, LazyModule(module), tmp_path / "b", settings, 10**8
        )

    first, second = stage(), stage()
    assert (first.computed, second.computed) == (24, 0)
    x = first.split("training").load().x
    assert x.shape == (24, 48)
    np.testing.assert_array_equal(second.split("training").load().x, x)
    # Red images have a strong first channel, blue ones a weak one.
    red = first.labels == image_set.labels.index("red")
    assert x[red, 0].min() > x[~red, 0].max()


def test_head_training_and_evaluation_stages_on_vectors():
    from retrain.bottlenecks.splits import Split
    from retrain.heads.head import SoftmaxHead
    from retrain.training.head import train_head

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    y = rng.integers(0, 3, 300)
    x = (centres[y] + rng.normal(size=(300, 16))).astype(np.float32)
    settings = HeadTrainingConfig(how_many_training_steps=200, learning_rate=0.1)
    head = SoftmaxHead(3)
    result = train_head(Split(x[:200], y[:200]), Split(x[200:250], y[200:250]), head, settings)
    assert result.history[-1]["step"] == 200 and result.history[-1]["validation_accuracy"] > 0.9
    held_out = head.evaluate(result.weights, result.biases, [(x[250:], y[250:])])
    assert held_out.accuracy > 0.9 and held_out.count == 50
    assert len(held_out.per_class_accuracy) == 3


def test_export_stage_writes_what_it_is_told(tmp_path, tiny_module_dir):
    import tensorflow as tf

    from retrain.export import writer as export
    from retrain.heads.head import SoftmaxHead

    module_object = tf.saved_model.load(str(tiny_module_dir))
    weights = np.eye(48, 2, dtype=np.float32)
    settings = ExportConfig(
        output_graph=str(tmp_path / "g.pb"), output_tflite=str(tmp_path / "m.tflite")
    )
    written = export.export_classifier(
        settings,
        ["a", "b"],
        export.Network(
            lambda: export.frozen_module_graph_def(module_object, (224, 224)),
            lambda: module_object,
            (224, 224),
        ),
        export.TrainedLayer(SoftmaxHead(2), weights, np.zeros(2, np.float32)),
    )
    assert written == {
        "output_graph": settings.output_graph,
        "output_tflite": settings.output_tflite,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.pb", "m.tflite"]


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_report_by_hand():
    from retrain.heads.evaluation import evaluate_chunks, roc_auc, wilson_interval

    # Three classes; identity weights make the features the logits.
    x = np.log(
        np.array(
            [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]]
        )
    )
    y = np.array([0, 0, 1, 1, 2])
    result = evaluate_chunks(np.eye(3), np.zeros(3), [(x[:2], y[:2]), (x[2:], y[2:])], 3)
    report = result.report(["a", "b", "c"])
    assert result.confusion_matrix().tolist() == [[2, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert report["per_class"]["a"] == {
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
        "roc_auc": 1.0,  # both of its images outscore the three others
    }
    assert report["accuracy"] == pytest.approx(0.8) and report["n"] == 5
    assert report["accuracy_interval_95"] == pytest.approx([0.3755, 0.9638], abs=1e-3)
    assert "top5_accuracy" not in report
    assert roc_auc(np.array([0.1, 0.1, 0.9]), np.array([False, True, True])) == 0.75
    assert roc_auc(np.array([0.1, 0.2]), np.array([True, True])) is None
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_misclassified_test_images_are_listed(example_copy, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="retrain")
    result = retrain.run(
        RetrainConfig(
            image_dir=str(example_copy),
            training=HeadTrainingConfig(how_many_training_steps=5),
            evaluation=retrain.EvaluationConfig(print_misclassified_test_images=True),
        )
    )
    lines = [r.getMessage() for r in caplog.records if "(true: " in r.getMessage()]
    wrong = int(round((1 - result.test.accuracy) * result.test.count))
    assert len(lines) == wrong > 0
    for line in lines:
        path, predicted, rest = line.split(maxsplit=2)
        true, score = re.fullmatch(r"\(true: (.+), score ([0-9.]+)\)", rest).groups()
        assert Path(path).exists() and predicted in result.labels and true in result.labels
        assert predicted != true and 0 < float(score) <= 1
