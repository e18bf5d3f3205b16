"""Presets: one name for a measured set of settings (`--preset accurate`).

A preset is a starting point, not a mode: it sets each of its settings that the caller did not
give (a flag on the command line, an override of `RetrainConfig.from_preset`); what the caller
gave wins. `fast` sets nothing: retrain.py's defaults. Each preset's recipe is its entry in
`PRESETS` and nowhere else, so changing a recipe is editing that table.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from retrain.errors import ConfigError, setting_name

PRESET = "preset"  # the setting that names the preset (RetrainConfig.preset)
DEFAULT_PRESET = "fast"


@dataclass(frozen=True)
class Preset:
    """A preset: what it is for, in a line, and the settings it sets (dotted path -> value)."""

    description: str
    settings: Mapping[str, Any]


PRESETS = {
    DEFAULT_PRESET: Preset("retrain.py's defaults, the new layer alone on cached vectors", {}),
    # The best of the measured recipes (docs/benchmarks.md#accuracy-recipes): more accurate on
    # average over three splits of clothing_dev than fine-tuning, with less spread, in half the
    # time. No test-time augmentation in either: exports are the plain network.
    "accurate": Preset(
        "the new layer alone on EfficientNet-Lite1's and Lite2's features side by side;"
        " about 4x fast's extraction time",
        {"module.handle": "efficientnet_lite1_lite2"},
    ),
    # The best fine-tuning recipe measured; the finder's rate (`auto`) did not beat 0.003.
    "fine_tune": Preset(
        "the new layer, then EfficientNet-Lite0's top four blocks fine-tuned with it on the"
        " photos and their mirror images; minutes more",
        {
            "module.handle": "efficientnet_lite0",
            "fine_tuning.from_block": "block12",
            "fine_tuning.steps": 300,
            "fine_tuning.learning_rate": 0.003,
            "distortions.flip_left_right": True,
            "distortions.copies": 1,
        },
    ),
}


def preset_named(name: str) -> Preset:
    """The preset called `name`; ConfigError (naming the `preset` setting) if there is none."""
    if name not in PRESETS:
        raise ConfigError(
            "{0}: unknown preset " + repr(name) + "; choose one of " + ", ".join(PRESETS), PRESET
        )
    return PRESETS[name]


def apply_preset(
    name: str, values: Mapping[str, Any], given: Collection[str] = ()
) -> dict[str, Any]:
    """`values` (settings by dotted path) with preset `name`'s settings put in, except those
    named in `given` (set explicitly: they win), and `preset` set to `name`. Pure; raises
    ConfigError for an unknown preset."""
    settings = preset_named(name).settings
    applied = {path: value for path, value in settings.items() if path not in given}
    return {**values, **applied, PRESET: name}


def preset_outcome(name: str, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What preset `name` left in settings `values` (dotted path -> value): the settings that
    hold its value, and those given another value explicitly (with that value)."""
    settings = preset_named(name).settings
    kept = {path: values.get(path) for path, value in settings.items() if values.get(path) != value}
    applied = {path: value for path, value in settings.items() if path not in kept}
    return applied, kept


def describe_preset(name: str, values: Mapping[str, Any]) -> str | None:
    """The log's line of preset `name` in settings `values`: what it set, and the settings given
    explicitly instead (which won), each named as this process names settings (its flags on
    the command line); None for a preset that sets nothing (`fast`)."""
    applied, kept = preset_outcome(name, values)
    if not applied and not kept:
        return None
    line = f"preset {name}: " + _settings_text(applied)
    return line + (f" (explicitly given, kept: {_settings_text(kept)})" if kept else "")


def _settings_text(settings: Mapping[str, Any]) -> str:
    shown = {path: '""' if value is None else value for path, value in settings.items()}
    return ", ".join(f"{setting_name(path)}={value}" for path, value in shown.items()) or "none"


def blame_preset(err: ConfigError, name: str, values: Mapping[str, Any]) -> ConfigError:
    """`err` with a note when a setting it names holds the value preset `name` gives it (the
    user may never have typed it): "... ({0} set by {1} accurate)". `err` itself otherwise."""
    settings = PRESETS[name].settings if name in PRESETS else {}
    blamed = [
        i
        for i, path in enumerate(err.fields)
        if path in settings and values.get(path) == settings[path]
    ]
    if not blamed:
        return err
    fields = (*err.fields, PRESET)
    named = ", ".join("{" + str(i) + "}" for i in blamed)
    note = f" ({named} set by {{{len(fields) - 1}}} {name})"
    return type(err)(err.template + note, *fields)
