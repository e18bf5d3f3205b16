"""The retrain command's flags: one table, retrain.py's names, the library's defaults.

Each `Flag` is a name, the config setting it sets (`training.learning_rate`) and its help. Its
type, default and choices come from that setting in `retrain.config`, so nothing here is typed
twice: `define_flags` defines the table on absl, `FLAG_FIELDS` maps flags to settings,
`render_help` is `retrain --help`, `render_reference` is docs/flags.md, and
retrain-beam-extract takes its shared flags from the same table.
"""

from __future__ import annotations

import textwrap
from typing import Any

from absl import flags

from retrain.cli.flag_table import GROUPS, Flag, Group
from retrain.config import (
    AUTO,
    CHOICES,
    RETRAIN_PY_PATHS,
    CommandOptions,
    RetrainConfig,
    setting_default,
    setting_type,
)
from retrain.config.presets import apply_preset
from retrain.errors import ConfigError, UsageError

COMMAND = "command."  # the prefix of settings of the command itself (CommandOptions)
TABLE = tuple(flag for group in GROUPS for flag in group.flags)
# Every flag that is a run's setting: flag name -> dotted config path.
FLAG_FIELDS = {f.name: f.field for f in TABLE if not f.field.startswith(COMMAND)}
# Flags of the command itself, not of a run: what to do, logging and the exit status.
COMMAND_FLAGS = tuple(f.name for f in TABLE if f.field.startswith(COMMAND))
_FLAG_OF_FIELD = {f.field: f.name for f in TABLE}
_BY_NAME = {f.name: f for f in TABLE}


def flag_default(flag: Flag) -> Any:
    """A flag's default: its setting's; retrain.py's /tmp path for the six outputs retrain.py
    wrote by default; "" for a path that defaults to None (no output)."""
    if flag.field in RETRAIN_PY_PATHS:
        return RETRAIN_PY_PATHS[flag.field]
    value = _setting_default(flag.field)
    return "" if value is None and _setting_type(flag.field) == "str" else value


def flag_choices(flag: Flag) -> tuple[str, ...] | None:
    """The values a flag takes, if it is one of a list."""
    return CHOICES.get(flag.field)


def flag_kind(flag: Flag) -> str:
    """absl's type of a flag: bool, int, float, rate (a float or 'auto'), enum or str."""
    return "enum" if flag_choices(flag) else _setting_type(flag.field)


def _setting_default(field: str) -> Any:
    if field.startswith(COMMAND):
        return setting_default(CommandOptions, field.removeprefix(COMMAND))
    return setting_default(RetrainConfig, field)


def _setting_type(field: str) -> str:
    if field.startswith(COMMAND):
        return setting_type(CommandOptions, field.removeprefix(COMMAND))
    return setting_type(RetrainConfig, field)


class _RateParser(flags.FloatParser):
    """A learning rate: a float, or 'auto' (see retrain.training.lr_find)."""

    def parse(self, argument: Any) -> float | str:
        if isinstance(argument, str) and argument.strip().lower() == AUTO:
            return AUTO
        return super().parse(argument)

    def flag_type(self) -> str:
        return "float or 'auto'"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define every flag of the table on `flag_values`."""
    for flag in TABLE:
        define_flag(flag, flag_values)


def define_flag(flag: Flag, flag_values: flags.FlagValues) -> None:
    """Define one flag of the table on `flag_values`, with absl's parser for its kind."""
    kind, args = flag_kind(flag), (flag.name, flag_default(flag), flag.help)
    if kind == "enum":
        flags.DEFINE_enum(*args[:2], list(flag_choices(flag)), flag.help, flag_values)
    elif kind == "rate":
        flags.DEFINE(_RateParser(), *args, flag_values=flag_values)
    else:
        define = {
            "bool": flags.DEFINE_boolean,
            "int": flags.DEFINE_integer,
            "float": flags.DEFINE_float,
            "str": flags.DEFINE_string,
        }[kind]
        define(*args, flag_values=flag_values)


def flag_named(name: str) -> Flag:
    """The table's entry of flag `name` (without dashes); KeyError if there is none."""
    return _BY_NAME[name]


def flag_for_field(field: str) -> str:
    """The flag (`--learning_rate`) of a config setting (`training.learning_rate`)."""
    return "--" + _FLAG_OF_FIELD.get(field, field)


def config_from_flags(f: flags.FlagValues) -> RetrainConfig:
    """The checked RetrainConfig of parsed flags `f`; raises UsageError naming the flag.

    The preset (`--preset`) sets each of its settings whose flag was not given on the command
    line; an empty string flag (no output) becomes None.
    """
    values = {field: f[flag].value for flag, field in FLAG_FIELDS.items()}
    if not f.audit:
        values["audit.output_dir"] = None  # a training run writes no audit
    given = {field for flag, field in FLAG_FIELDS.items() if f[flag].present}
    try:
        config = config_from_values(apply_preset(f.preset, values, given))
        config.validate()
    except ConfigError as err:
        raise UsageError(err.render(flag_for_field)) from None
    threshold = f.assert_accuracy_at_least
    if threshold is not None and not 0 <= threshold <= 1:
        raise UsageError(
            f"--assert_accuracy_at_least is a fraction between 0 and 1, got {threshold}"
        )
    return config


def config_from_values(values: dict[str, Any]) -> RetrainConfig:
    """An unchecked RetrainConfig of settings given by dotted path; an empty string (a flag
    that names no output) becomes None, defaults fill the rest."""
    values = {k: None if v == "" and k != "image_dir" else v for k, v in values.items()}
    return RetrainConfig.from_settings(values)


# ----------------------------------------------------------------------------- help

USAGE = """\
usage: retrain --image_dir DIR [flags]
       retrain --image_dir DIR --audit | --lr_find

Retrain an image classifier on a folder with one subfolder of photos per class: cache each
photo's feature vector, train a new layer on them, export a frozen graph and its labels.

example:
  retrain --image_dir ~/flower_photos --output_tflite /tmp/flowers.tflite
  label-image --graph /tmp/output_graph.pb --labels /tmp/output_labels.txt --image photo.jpg
"""


def _ordered(group: Group) -> list[Flag]:
    return sorted(group.flags, key=lambda f: not f.common)


def _default_text(flag: Flag) -> str:
    value = flag_default(flag)
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def render_help(width: int = 80) -> str:
    """`retrain --help`: usage, an example, then the flags by concern, common ones first."""
    lines = [USAGE]
    for group in GROUPS:
        lines.append(f"{group.title}:")
        for flag in _ordered(group):
            choices = f"; one of {'|'.join(flag_choices(flag))}" if flag_choices(flag) else ""
            lines.append(f"  --{flag.name} (default: {_default_text(flag)}{choices})")
            lines += textwrap.wrap(
                flag.help, width, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
        lines.append("")
    lines.append("A boolean flag also reads --name=false or --noname.")
    return "\n".join(lines) + "\n"


def render_reference() -> str:
    """docs/flags.md: every flag of the table, by concern, as Markdown tables."""
    lines = [
        "# Flag reference",
        "",
        "Every flag of `retrain`, by concern; the common ones come first in each group. "
        "Generated from the flag table in `retrain/cli/flag_table.py` "
        "(`python scripts/flag_reference.py`); `retrain --help` prints the same.",
        "",
    ]
    for group in GROUPS:
        lines += [f"## {group.title}", "", "| flag | default | setting | what it does |"]
        lines.append("|---|---|---|---|")
        for flag in _ordered(group):
            listed = ", ".join(f"`{c}`" for c in flag_choices(flag) or ())
            choices = f" One of {listed}." if listed else ""
            setting = "" if flag.field.startswith(COMMAND) else f"`{flag.field}`"
            text = (flag.help + choices).replace("|", "\\|")
            lines.append(f"| `--{flag.name}` | `{_default_text(flag)}` | {setting} | {text} |")
        lines.append("")
    return "\n".join(lines)


__all__ = [
    "COMMAND_FLAGS",
    "FLAG_FIELDS",
    "GROUPS",
    "TABLE",
    "Flag",
    "Group",
    "config_from_flags",
    "config_from_values",
    "define_flags",
    "flag_choices",
    "flag_default",
    "flag_for_field",
    "flag_kind",
    "flag_named",
    "render_help",
    "render_reference",
]
