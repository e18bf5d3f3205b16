"""Every invalid flag is one line naming the flag, exit status 2, before any heavy work."""

import json
import subprocess
import sys

import pytest

from retrain.cli import retrain as cli
from retrain.config import EXTRACTION_BACKENDS
from tests.conftest import write_image


@pytest.fixture
def image_dir(tmp_path):
    for name in ("cats", "dogs"):
        for i in range(4):
            write_image(tmp_path / "images" / name / f"{name}{i}.jpg")
    return tmp_path / "images"


def run_cli(capsys, *args):
    status = cli.main(["retrain", *args])
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--how_many_training_steps=-5"], "--how_many_training_steps"),
        (["--learning_rate=0"], "--learning_rate"),
        (["--testing_percentage=50", "--validation_percentage=50"], "--testing_percentage"),
        (["--validation_percentage=-1"], "--validation_percentage"),
        (["--train_batch_size=0"], "--train_batch_size"),
        (["--validation_batch_size=0"], "--validation_batch_size"),
        (["--test_batch_size=-2"], "--test_batch_size"),
        (["--eval_step_interval=0"], "--eval_step_interval"),
        (["--tfhub_module=no_such_model"], "--tfhub_module"),
        (["--tfhub_module=./no/such/dir"], "--tfhub_module"),
        (["--output_graph=/proc/forbidden/graph.pb"], "--output_graph"),
        (["--output_labels=/"], "--output_labels"),
        (["--bottleneck_dir=/proc/version"], "--bottleneck_dir"),
        (["--assert_accuracy_at_least=1.5"], "--assert_accuracy_at_least"),
        (["--how_many_training_steps=lots"], "how_many_training_steps"),
        (["--how_many_trainig_steps=1"], "--how_many_training_steps"),  # a typo of ours
        (["--resume"], "--resume"),
        (["--random_crop=101"], "--random_crop"),
        (["--random_scale=-5"], "--random_scale"),
        (["--random_brightness=-1"], "--random_brightness"),
        (["--distorted_copies=3"], "--distorted_copies"),
        (["--flip_left_right", "--distorted_copies=-1"], "--distorted_copies"),
        (
            ["--distribution_strategy=mirrored", "--extraction_backend=tflite"],
            "--extraction_backend",
        ),
        (
            ["--distribution_strategy=mirrored", "--extraction_backend=tflite_int8"],
            "--extraction_backend",
        ),
        (["--extraction_backend=tflite_int8", "--flip_left_right"], "--distorted_copies"),
        (["--extraction_backend=tflite_int8", "--fine_tune_steps=5"], "--fine_tune_steps"),
        (["--distribution_strategy=everywhere"], "distribution_strategy"),
        (["--fine_tune_steps=-1"], "--fine_tune_steps"),
        (["--fine_tune_learning_rate=0"], "--fine_tune_learning_rate"),
        (["--fine_tune_learning_rate=-0.001"], "--fine_tune_learning_rate"),
        (["--fine_tune_learning_rate=nan"], "--fine_tune_learning_rate"),
        (["--fine_tune_batch_size=0"], "--fine_tune_batch_size"),
        (["--fine_tune_batch_size=-4"], "--fine_tune_batch_size"),
        (["--fine_tune_patience=-1"], "--fine_tune_patience"),
        (["--quantize=int8"], "--quantize"),  # without --output_tflite
        (["--quantize=int4", "--output_tflite=m.tflite"], "quantize"),
        (["--output_tflite=m.tflite", "--tflite_int8_io"], "--tflite_int8_io"),
    ],
)
def test_bad_flag_values(capsys, image_dir, tmp_path, args, flag):
    status, err = run_cli(
        capsys, f"--image_dir={image_dir}", f"--bottleneck_dir={tmp_path / 'b'}", *args
    )
    assert status == 2
    assert len(err) == 1, err
    assert err[0].startswith("retrain: error:") and flag in err[0]


@pytest.mark.parametrize("tf_config", [None, "{not json", '{"cluster": {}, "task": {}}'])
def test_multi_worker_needs_tf_config(capsys, monkeypatch, image_dir, tmp_path, tf_config):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    status, err = run_cli(
        capsys,
        f"--image_dir={image_dir}",
        f"--bottleneck_dir={tmp_path / 'b'}",
        "--distribution_strategy=multi_worker_mirrored",
    )
    assert status == 2
    assert len(err) == 1, err
    assert err[0].startswith("retrain: error: --distribution_strategy multi_worker_mirrored")
    assert "TF_CONFIG" in err[0]


@pytest.mark.parametrize("backend", EXTRACTION_BACKENDS)
def test_multi_worker_takes_any_extraction_backend(monkeypatch, image_dir, tmp_path, backend):
    """Unlike mirrored (one process over its GPUs, which refuses the CPU backends), each
    multi-worker worker extracts on its own machine: every backend is accepted, and the config
    keeps both the strategy and the backend as given."""
    from absl import flags

    from retrain.cli.flags import config_from_flags, define_flags

    config = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker"}}
    monkeypatch.setenv("TF_CONFIG", json.dumps({**config, "task": {**config["task"], "index": 1}}))
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(
        [
            "retrain",
            f"--image_dir={image_dir}",
            f"--bottleneck_dir={tmp_path / 'b'}",
            f"--output_graph={tmp_path / 'g.pb'}",
            f"--output_labels={tmp_path / 'l.txt'}",
            f"--summaries_dir={tmp_path / 'logs'}",
            "--distribution_strategy=multi_worker_mirrored",
            f"--extraction_backend={backend}",
        ]
    )
    run = config_from_flags(flag_values)  # no error: each worker extracts on its own machine
    assert run.distribution.strategy == "multi_worker_mirrored"
    assert run.module.extraction_backend == backend


@pytest.mark.parametrize("layout", ["missing", "empty", "one_class", "unset"])
def test_bad_image_dir(capsys, tmp_path, layout):
    root = tmp_path / "images"
    if layout != "missing":
        root.mkdir()
    if layout == "one_class":
        write_image(root / "cats" / "a.jpg")
    args = [] if layout == "unset" else [f"--image_dir={root}"]
    status, err = run_cli(capsys, *args, f"--output_graph={tmp_path / 'g.pb'}")
    assert status == 2
    assert len(err) == 1 and "--image_dir" in err[0]


def test_help_exits_zero(capsys):
    assert cli.main(["retrain", "--help"]) == 0
    assert "--image_dir" in capsys.readouterr().out


def test_flag_errors_come_before_importing_tensorflow(image_dir):
    code = (
        "import sys; from retrain.cli import retrain as cli; "
        f"status = cli.main(['retrain', '--image_dir={image_dir}', '--learning_rate=-1']); "
        "sys.exit(10 if 'tensorflow' in sys.modules else status)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "retrain: error: --learning_rate must be positive, got -1.0"
    ]


# ----------------------------------------------------------------------------- the flag table

# Settings a library user sets that have no flag: each with its reason.
API_ONLY = {
    "training.checkpoint_every": "retrain.py had no such flag; checkpoints every 500 steps",
}
# retrain.py wrote these by default; the library writes nothing unless asked.
TMP_PATHS = {
    "output_graph",
    "output_labels",
    "intermediate_output_graphs_dir",
    "summaries_dir",
    "bottleneck_dir",
    "audit_dir",
}


def test_every_flag_defaults_to_its_setting_s_default():
    from absl import flags as absl_flags

    from retrain.cli.flags import FLAG_FIELDS, TABLE, define_flags
    from retrain.config import CommandOptions, RetrainConfig, leaf_fields

    defined = absl_flags.FlagValues()
    define_flags(defined)
    settings = dict(leaf_fields(RetrainConfig(image_dir="")))
    settings.update({f"command.{k}": v for k, v in leaf_fields(CommandOptions())})
    for flag in TABLE:
        default = defined[flag.name].default
        if flag.name in TMP_PATHS:
            assert default.startswith("/tmp/") and settings[flag.field] is None
        elif settings[flag.field] is None and defined[flag.name].flag_type() == "string":
            assert default == "", flag.name  # "" writes nothing, as None does
        else:
            assert default == settings[flag.field], flag.name
    assert set(FLAG_FIELDS) >= TMP_PATHS


def test_every_setting_has_a_flag_or_is_api_only():
    from retrain.cli.flags import FLAG_FIELDS
    from retrain.config import RetrainConfig, leaf_fields

    settings = {name for name, _ in leaf_fields(RetrainConfig(image_dir=""))}
    assert settings - set(FLAG_FIELDS.values()) == set(API_ONLY)


def test_choices_come_from_the_config():
    from absl import flags as absl_flags

    from retrain.cli.flags import define_flags
    from retrain.config import CHOICES, EXTRACTION_BACKENDS

    defined = absl_flags.FlagValues()
    define_flags(defined)
    assert defined["extraction_backend"].parser.enum_values == list(EXTRACTION_BACKENDS)
    for name, field in (("quantize", "export.quantize"), ("sampling", "training.sampling")):
        assert defined[name].parser.enum_values == list(CHOICES[field])


def test_help_reads_like_a_manual_page(capsys):
    from retrain.cli.flag_table import GROUPS

    assert cli.main(["retrain", "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("usage: retrain --image_dir DIR")
    assert "example:" in out.split("Data and split:")[0]
    titles = [line[:-1] for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert [g.title for g in GROUPS] == [t for t in titles if t != "example"]
    # In each group the common flags come first.
    for group in GROUPS:
        section = out.split(f"\n{group.title}:\n", 1)[1].split("\n\n", 1)[0]
        listed = [line.split()[0][2:] for line in section.splitlines() if line.startswith("  --")]
        commons = [f.name for f in group.flags if f.common]
        assert listed[: len(commons)] == commons
        assert sorted(listed) == sorted(f.name for f in group.flags)


def test_the_flag_reference_page_is_generated_from_the_table():
    """docs/flags.md is `python scripts/flag_reference.py`'s output: regenerate it after
    changing a flag."""
    from retrain.cli.flags import TABLE, render_reference
    from tests.conftest import ROOT

    page = (ROOT / "docs" / "flags.md").read_text()
    assert page == render_reference()
    assert all(f"`--{flag.name}`" in page for flag in TABLE)
