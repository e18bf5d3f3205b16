"""`retrain-beam-extract`: the command line of retrain.bottlenecks.beam, which computes the
bottleneck cache with an Apache Beam pipeline (see there for what it does and where it runs).

    pip install 'retrain[beam]'
    retrain-beam-extract --image_dir DIR --bottleneck_dir DIR [--tfhub_module efficientnet_lite0]
        [--extraction_batch_size 32] [--random_crop 10 --flip_left_right --distorted_copies 5]
        [Beam pipeline options, e.g. --runner=DirectRunner --direct_num_workers=2
        --direct_running_mode=multi_processing]
    retrain --image_dir DIR --bottleneck_dir DIR [the same split and distortion flags]
        # then finds every bottleneck (and distorted copy) cached

The flags shared with `retrain` are a RetrainConfig checked as `retrain` checks them (the same
line for a bad value); the rest are BeamSettings and Beam options. The split and distortion
flags (RETRAIN_FLAGS) take their defaults and help from `retrain`'s own definitions. Prints the
JSON summary.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import flags as absl_flags

from retrain.bottlenecks import beam as beam_pipeline
from retrain.bottlenecks.backends import BACKENDS
from retrain.bottlenecks.beam import BeamSettings
from retrain.bottlenecks.beam_transforms import MIN_BATCH_SIZE
from retrain.cli.flags import (
    FLAG_FIELDS,
    config_from_values,
    flag_choices,
    flag_default,
    flag_for_field,
    flag_kind,
    flag_named,
)
from retrain.config import RetrainConfig
from retrain.errors import RetrainError, UsageError, name_settings_as

__all__ = ["argument_parser", "main", "pipeline_options", "run", "settings_from_args"]

PROG = "retrain-beam-extract"
_BEAM_DEFAULTS = BeamSettings()
# `retrain`'s flags this command takes, with retrain's types, defaults, choices and help (from
# the flag table): what finds the images and decides the training split, the module and its
# cache, and the distortions of the cached copies.
RETRAIN_FLAGS = (
    "image_dir",
    "bottleneck_dir",
    "tfhub_module",
    "module_cache_dir",
    "extraction_backend",
    "extraction_batch_size",
    "max_image_pixels",
    "testing_percentage",
    "validation_percentage",
    "labels_csv",
    "split_from",
    "flip_left_right",
    "random_crop",
    "random_scale",
    "random_brightness",
    "distorted_copies",
    "logging_verbosity",
)
# What differs here: the backends a worker can run (int8 needs the run's calibration), and
# notes that only a pipeline needs.
BEAM_CHOICES = {"extraction_backend": BACKENDS}
BEAM_NOTES = {
    "bottleneck_dir": "On a cluster, a folder every worker mounts.",
    "module_cache_dir": "Each worker keeps its own.",
    "extraction_batch_size": f"The largest batch: Beam's BatchElements adapts between "
    f"{MIN_BATCH_SIZE} and this.",
}


def _raise_usage(message: str) -> NoReturn:
    """An argparse parser's `error`: a bad flag is a UsageError (one line, exit 2), not usage
    text and SystemExit."""
    raise UsageError(message)


def _boolean(text: str) -> bool:
    """A boolean flag's value as absl reads it (true/false, 1/0, yes/no...)."""
    try:
        return absl_flags.BooleanParser().parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


_ARG_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def retrain_flag_help(name: str) -> str:
    """The help of `retrain`'s flag `name` here: retrain's, and a note for a pipeline."""
    return " ".join(filter(None, (flag_named(name).help, BEAM_NOTES.get(name))))


def _add_retrain_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Add `retrain`'s flags `names` to `parser` as the flag table defines them."""
    for name in names:
        flag = flag_named(name)
        default, text = flag_default(flag), retrain_flag_help(name)
        if flag_kind(flag) == "bool":
            _add_boolean(parser, name, default, text)
        elif flag_kind(flag) == "enum":
            choices = BEAM_CHOICES.get(name, flag_choices(flag))
            parser.add_argument(f"--{name}", default=default, choices=choices, help=text)
        else:
            kind = _ARG_TYPES[flag_kind(flag)]
            parser.add_argument(f"--{name}", type=kind, default=default, help=text)


def _add_boolean(parser: argparse.ArgumentParser, name: str, default: bool, text: str) -> None:
    """A boolean flag as absl reads it: --name, --name=false (any `_boolean` value) and
    --noname; the last one given wins."""
    add = parser.add_argument
    add(f"--{name}", nargs="?", const=True, default=default, type=_boolean, help=text)
    add(f"--no{name}", dest=name, action="store_false", default=default, help=argparse.SUPPRESS)


def argument_parser() -> argparse.ArgumentParser:
    """This command's own flags; everything else is a Beam pipeline option."""
    p = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description="Compute the bottleneck cache of an image folder with an Apache Beam "
        "pipeline, for `retrain --bottleneck_dir` to read.",
        epilog="Other flags are Apache Beam pipeline options, e.g. --runner=DirectRunner "
        "--direct_num_workers=2 --direct_running_mode=multi_processing, or "
        "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp "
        "--extra_package=dist/retrain-0.1.0-py3-none-any.whl.",
    )
    p.error = _raise_usage
    _add_retrain_flags(p, RETRAIN_FLAGS)
    add = p.add_argument
    add(
        "--num_threads",
        type=int,
        default=_BEAM_DEFAULTS.num_threads,
        help="CPU threads per worker process for the tflite backend (0: every CPU it may use).",
    )
    add(
        "--shard_rows",
        type=int,
        default=_BEAM_DEFAULTS.shard_rows,
        help="Most vectors per cache shard; each worker also writes one at the end of each bundle.",
    )
    add("--summary_json", default="", help="Also write the JSON summary here.")
    return p


def settings_from_args(args: argparse.Namespace) -> tuple[RetrainConfig, BeamSettings]:
    """The library's settings of parsed flags, unchecked. The flags shared with `retrain` fill
    the RetrainConfig settings that `retrain.cli.flags.FLAG_FIELDS` maps them to; an empty path
    becomes None, as in `retrain`."""
    shared = {field: getattr(args, name) for name, field in FLAG_FIELDS.items() if name in args}
    settings = BeamSettings(
        shard_rows=args.shard_rows,
        num_threads=args.num_threads,
        summary_json=args.summary_json or None,
    )
    return config_from_values(shared), settings


def pipeline_options(
    beam_argv: Sequence[str], own: argparse.ArgumentParser
) -> beam_pipeline.PipelineOptions:
    """Beam's options from the flags this command does not know, the DirectRunner switched to
    the FnApiRunner; an unknown or invalid flag is a UsageError (Beam itself would drop an
    unknown flag with a warning, hiding a typo)."""
    parsers: list[argparse.ArgumentParser] = []

    def capture(parser: argparse.ArgumentParser) -> None:
        parser.error = _raise_usage
        parsers.append(parser)

    options = beam_pipeline.PipelineOptions(list(beam_argv))
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)  # not "Discarding unparseable args": that is an error here
    try:
        options.get_all_options(add_extra_args_fn=capture)
    finally:
        beam_log.setLevel(level)
    _, unknown = parsers[0].parse_known_args(list(beam_argv))
    beam_pipeline.run_direct_on_fn_api_runner(options)
    if unknown:
        raise UsageError(_unknown_flag_message(unknown[0], [*parsers, own]))
    return options


def _unknown_flag_message(arg: str, parsers: Sequence[argparse.ArgumentParser]) -> str:
    """What to say about `arg`, known to none of `parsers`: the closest flag, if any."""
    flag = arg.split("=", 1)[0]
    if not flag.startswith("-"):
        return f"unexpected argument {arg!r} (flags are --name=value)"
    known = [option for p in parsers for action in p._actions for option in action.option_strings]
    close = difflib.get_close_matches(flag, known, n=1)
    return f"unknown flag {flag}" + (f"; did you mean {close[0]}?" if close else "")


def _setup_logging(verbosity: str) -> None:
    from retrain.cli.retrain import setup_logging

    setup_logging(verbosity)
    if verbosity != "DEBUG":
        logging.getLogger("apache_beam").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the command with `argv` (default sys.argv); returns the exit status: 0, 1 (bad data
    or a failed pipeline), 2 (a bad flag or input folder: one line naming the flag) or 130
    (interrupted)."""
    argv = list(sys.argv if argv is None else argv)
    parser = argument_parser()
    callers_names = name_settings_as(flag_for_field)  # the library's messages name our flags
    try:
        if any(arg in ("-h", "--help") for arg in argv[1:]):
            parser.print_help()
            return 0
        beam_pipeline.require_beam()
        args, beam_argv = parser.parse_known_args(argv[1:])
        config, settings = settings_from_args(args)
        beam_pipeline.validate(config, settings)
        options = pipeline_options(beam_argv, parser)
        _setup_logging(args.logging_verbosity)
        print(json.dumps(beam_pipeline.extract(config, options, settings)))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished shards are kept in the cache", file=sys.stderr)
        return 130
    except RetrainError as err:
        print(f"{PROG}: error: {err.render(flag_for_field)}", file=sys.stderr)
        return err.exit_code
    finally:
        name_settings_as(callers_names)
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
