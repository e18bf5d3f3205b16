"""What a run says in the log about its findings: the health report, and retrain.py's list of
misclassified test images."""

from __future__ import annotations

import logging

from retrain.data import scan
from retrain.reporting.health import Finding
from retrain.results import RunResult

log = logging.getLogger("retrain")


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
