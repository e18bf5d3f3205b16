"""`retrain`: the command line. Turns flags into a RetrainConfig, sets up logging and Ctrl-C,
runs the library (`pipeline.run`), and maps its exceptions to one line and an exit status."""

from __future__ import annotations

import logging
import sys

from retrain.errors import RetrainError, StorageError, UsageError, first_line, name_settings_as
from retrain.utils.phases import process_age

PROG = "retrain"


class AccuracyBelowThreshold(RetrainError):
    """--assert_accuracy_at_least was not met."""

    exit_code = 3


def parse_flags(argv: list[str], flag_values) -> None:
    """Parse argv into absl FlagValues; a bad flag is a UsageError (one line, exit 2)."""
    from absl import flags

    try:
        flag_values(argv)
    except flags.Error as err:
        raise UsageError(str(err).splitlines()[0]) from None


def read_command_line(argv: list[str], flag_values) -> list[str]:
    """Parse argv into absl FlagValues the way retrain.py's scripts write it (prefixes, unknown
    flags, `--flag False`, the Poets flags: see retrain.cli.compat_argv and retrain.cli.poets);
    returns the warnings to log. A bad flag is a UsageError (one line, exit 2)."""
    from retrain.cli.compat_argv import rewrite_argv
    from retrain.cli.flags import TABLE, flag_default, flag_kind, flag_named
    from retrain.cli.poets import poets_argv

    rewritten = rewrite_argv(argv, {flag.name: flag_kind(flag) == "bool" for flag in TABLE})
    bundled = flag_default(flag_named("tfhub_module"))
    parse_flags(poets_argv(rewritten, bundled), flag_values)
    return rewritten.warnings


def check_hub_handle(handle: str) -> None:
    """Refuse a module URL in one line (UsageError) when its host cannot be reached and
    tensorflow_hub's cache lacks it: before TensorFlow is imported or an image read. A TF1 Hub
    module is told by its URL, and the line names its TF2 version too; online it is fetched
    and converted (retrain.models.tf1_hub)."""
    from retrain.cli.flags import flag_default, flag_named
    from retrain.utils.handles import host_reachable, hub_cached, tf1_hub_module, url_host

    host = url_host(handle)
    if host is None or hub_cached(handle) or host_reachable(host):
        return
    bundled = flag_default(flag_named("tfhub_module"))
    module = tf1_hub_module(handle)
    if module is None:
        raise UsageError(
            f"--tfhub_module {handle}: cannot be fetched without a network ({host} cannot be "
            f"reached); give --tfhub_module {bundled} (bundled, offline) or a SavedModel folder"
        )
    raise UsageError(
        f"--tfhub_module {handle}: a TF1 Hub module, which cannot be fetched without a network;"
        f" give --tfhub_module {bundled} (bundled, offline) instead, or online its TF2 version "
        f"{module.tf2_handle}"
    )


def setup_logging(verbosity: str) -> None:
    """Plain `LEVEL message` lines on stderr; TensorFlow's C++ chatter is silenced."""
    level = {"WARN": logging.WARNING, "FATAL": logging.CRITICAL}.get(verbosity, verbosity)
    logging.basicConfig(
        level=level, format="%(levelname).1s %(message)s", stream=sys.stderr, force=True
    )
    # TensorFlow's own Python warnings (retracing, partial checkpoint restores) are about our
    # internals, not the user's data: show them only when debugging.
    library_level = logging.DEBUG if level == "DEBUG" else logging.ERROR
    for noisy in ("tensorflow", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(library_level)


def main(argv: list[str] | None = None) -> int:
    """Run retrain with `argv` (default sys.argv); returns the exit status."""
    argv = list(sys.argv if argv is None else argv)
    callers_names = None  # how the caller named settings, restored on the way out
    try:
        # Imported here, inside the try, so that even an early Ctrl-C ends cleanly.
        from absl import flags

        from retrain.cli.flags import config_from_flags, define_flags, flag_for_field, render_help
        from retrain.utils.runtime import import_tensorflow_quietly, limit_malloc_arenas

        flag_values = flags.FlagValues()
        define_flags(flag_values)
        if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv[1:]):
            print(render_help(), end="")
            return 0
        warnings = read_command_line(argv, flag_values)
        callers_names = name_settings_as(flag_for_field)  # library messages name our flags
        config = config_from_flags(flag_values)
        check_hub_handle(config.module.handle)  # before TensorFlow is imported
        setup_logging(flag_values.logging_verbosity)
        for line in warnings:
            logging.getLogger("retrain").warning("%s", line)
        from retrain.utils import interrupt

        with interrupt.stop_at_safe_points():  # from here, Ctrl-C never lands inside TensorFlow
            limit_malloc_arenas()  # before TensorFlow starts its threads
            import_tensorflow_quietly()
            interrupt.check()
            from retrain import pipeline  # heavy: imports TensorFlow

            if flag_values.audit:
                pipeline.audit_photos(config)
                return 0
            if flag_values.lr_find:
                pipeline.find_learning_rate(config)
                return 0
            result = pipeline.run(config, startup_seconds=process_age())
            from retrain.reporting.html import closing_lines

            logger = logging.getLogger("retrain")
            logger.info("--- Summary ---")
            for line in closing_lines(config, result):
                logger.info("%s", line)
        threshold = flag_values.assert_accuracy_at_least
        check_accuracy(result.test.accuracy if result.test else None, threshold)
        for exported in result.export_checks:
            if not exported.reproduces_float_model:  # else its accuracy is the one just checked
                check_accuracy(exported.accuracy, threshold, f"{exported.format} {exported.path}")
        return 0
    except RetrainError as err:
        from retrain.cli.flags import flag_for_field

        print(f"{PROG}: error: {err.render(flag_for_field)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished bottlenecks are kept in the cache", file=sys.stderr)
        return 130
    except Exception as err:
        # A failing disk under a writer that does not say what it writes (TensorFlow's own):
        # still one line, with the path TensorFlow's message gives.
        from retrain.utils.atomic import storage_errno

        if storage_errno(err) is None:
            raise
        print(f"{PROG}: error: cannot write: {first_line(err)}", file=sys.stderr)
        return StorageError.exit_code
    finally:
        if callers_names is not None:
            name_settings_as(callers_names)


def check_accuracy(accuracy: float | None, threshold: float | None, model: str = "") -> None:
    """Raise AccuracyBelowThreshold (exit 3) if `threshold` is set and the test accuracy (of
    the exported `model`, if named) is missing or below it."""
    if threshold is not None and (accuracy is None or accuracy < threshold):
        of = f" of {model}" if model else ""
        raise AccuracyBelowThreshold(
            f"--assert_accuracy_at_least: test accuracy{of} {accuracy} is below {threshold}"
        )


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
