"""What a run says in the log about its settings and findings: the preset, the health report,
and retrain.py's list of misclassified test images."""

from __future__ import annotations

import logging

from retrain.config import RetrainConfig, leaf_fields
from retrain.config.presets import describe_preset
from retrain.data import scan
from retrain.reporting.health import Finding
from retrain.results import RunResult, Timings

log = logging.getLogger("retrain")


def log_preset(config: RetrainConfig) -> None:
    """One line: the run's preset, the settings it set, and those given explicitly instead
    (which won); nothing for a preset that sets nothing (`fast`)."""
    line = describe_preset(config.preset, dict(leaf_fields(config)))
    if line is not None:
        log.info("%s", line)


def log_health(findings: list[Finding]) -> None:
    """Each finding on a line of its own (a warning at WARNING level), or that there is none."""
    for finding in findings:
        level = logging.WARNING if finding.severity == "warning" else logging.INFO
        log.log(level, "Health: %s. Suggestion: %s", finding.message, finding.suggestion)
    if not any(f.severity == "warning" for f in findings):
        log.info("Health: no problem found")


def log_misclassified(result: RunResult) -> None:
    """The misclassified test images, retrain.py's two columns (file, predicted label) first,
    for scripts that read them."""
    log.info("=== MISCLASSIFIED TEST IMAGES ===")
    for mistake in result.misclassified():
        log.info(
            "%70s  %s  (true: %s, score %.3f)",
            scan.display_path(mistake.path),
            mistake.predicted,
            mistake.actual,
            mistake.score,
        )


def log_timings(timings: Timings) -> None:
    """One line: the run's wall time and the phases that took a tenth of a second or more, the
    longest first (the metrics file has them all)."""
    phases = sorted(timings.by_phase().items(), key=lambda item: -item[1])
    parts = ", ".join(
        f"{name.replace('_', ' ')} {seconds:.1f}" for name, seconds in phases if seconds >= 0.05
    )
    log.info("Time: %.1f s (%s)", timings.wall(), parts)
