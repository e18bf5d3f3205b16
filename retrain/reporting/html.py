"""The HTML report (`--report_html`): one self-contained page a person can read or mail.

It shows what the run measured and why it may not have learnt: the health findings, curves
of loss, accuracy and learning rate, each split's evaluation (per-class table, confusion
matrix), the misclassified test images as thumbnails, the audit's findings when there is an
audit, and what was run (settings, module, data, timings). Pictures come from
`retrain.reporting.pictures` and are embedded as data URIs, so the file needs nothing beside it.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from retrain.config import RetrainConfig, leaf_fields
from retrain.heads.evaluation import WORST_LABELS_SHOWN, lowest_recalls, worst_labels
from retrain.reporting import pictures
from retrain.results import RunResult
from retrain.utils.atomic import atomic_write_text

if TYPE_CHECKING:
    from retrain.reporting.audit import AuditReport

MISTAKES_SHOWN = 60
AUDIT_ROWS_SHOWN = 30  # of each finding kind; the CSVs hold them all
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1080px;
       color: #212121; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.lead { font-size: 16px; } .muted { color: #666; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warning { color: #b71c1c; font-weight: 600; } .note { color: #0d47a1; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 140px; font-size: 12px; overflow-wrap: anywhere; }
figure img { max-width: 128px; max-height: 128px; display: block; }
.wrong { color: #c62828; } .pair { display: flex; gap: 6px; width: auto; }
"""


def write_report(
    path: str | Path,
    config: RetrainConfig,
    result: RunResult | None = None,
    audit: AuditReport | None = None,
) -> str:
    """Write the report of a run (`result`) and/or an audit (`audit`) of the photos in
    `config.image_dir` to `path`, atomically; returns the path written."""
    body = [_heading(config, result, audit)]
    if result is not None:
        body += [
            _health(result),
            _label_summary(result),
            _curves(result),
            *(_evaluation(split, e, result.labels) for split, e in result.evaluations.items()),
            _mistakes(result),
        ]
    if audit is not None:
        body.append(_audit(audit))
    body.append(_what_was_run(config, result))
    title = "retrain report: " + Path(config.image_dir).name
    page = (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )
    atomic_write_text(path, page, "HTML report")
    return str(path)


def _heading(config: RetrainConfig, result: RunResult | None, audit: AuditReport | None) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"<h1>retrain: {_e(config.image_dir)}</h1>", f"<p class='muted'>{when}</p>"]
    test = result.test if result is not None else None
    if test is not None:
        report = test.report(result.labels)
        lines.append(f"<p class='lead'>Test accuracy <b>{_accuracy(report)}</b></p>")
    if audit is not None:
        m = audit.metrics()
        lines.append(
            f"<p class='lead'>Audit of {m['images']} images: {m['suspect_labels']} suspect "
            f"labels, {m['duplicates']} duplicate pairs ({m['duplicates_across_splits']} across "
            f"splits), {m['outliers']} outliers</p>"
        )
    return "\n".join(lines)


def _accuracy(report: dict) -> str:
    low, high = report["accuracy_interval_95"]
    return (
        f"{100 * report['accuracy']:.1f}% (95% interval {100 * low:.1f}%-{100 * high:.1f}%, "
        f"N={report['n']})"
    )


def _health(result: RunResult) -> str:
    if not result.health:
        return "<h2>Health</h2><p>No problem found.</p>"
    rows = [
        (f"<span class='{f.severity}'>{_e(f.severity)}</span>", _e(f.message), _e(f.suggestion))
        for f in result.health
    ]
    return "<h2>Health</h2>" + _table(("", "finding", "suggestion"), rows, escape=False)


_SUMMARY_COLUMNS = {
    "roc_auc": "test ROC AUC",
    "average_precision": "test AP",
    "threshold": "threshold",
    "f1": "test F1",
}


def label_summary_rows(result: RunResult, names: Sequence[str]) -> tuple[list[str], list[list]]:
    """The header and rows (of `names`, in that order) of the per-class (per-label) summary:
    images (positives) with their share in each split, then the test figures; an undefined
    figure is "n/a"."""
    summary = result.label_summary()
    splits = [
        split for split in ("training", "validation", "testing") if split in result.split_counts
    ]
    keys = [k for k in _SUMMARY_COLUMNS if any(k in row for row in summary.values())]
    header = [*(f"{split.removesuffix('ing')} n+ (share)" for split in splits)]
    header += [_SUMMARY_COLUMNS[k] for k in keys]
    rows = []
    for name in names:
        row = summary[name]
        cells = [f"{row[f'{s}_positives']} ({_share(row[f'{s}_share'])})" for s in splits]
        rows.append([name, *cells, *(_number(row.get(k)) for k in keys)])
    return header, rows


def _share(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.2f}%"


def _label_summary(result: RunResult) -> str:
    if not result.split_counts:
        return ""
    kind = "label" if result.head.head.multi_label else "class"
    header, rows = label_summary_rows(result, result.labels)
    return (
        f"<h2>Per {kind} across the splits</h2><p class='muted'>images (positives) of each "
        f"{kind} in each split and their share; test figures at the chosen thresholds</p>"
        + _table((kind, *header), rows)
    )


def _curves(result: RunResult) -> str:
    history = result.head.history
    if not history:
        return ""
    steps = [r["step"] for r in history]

    def column(key: str) -> list[float]:
        return [r.get(key, math.nan) for r in history]

    charts = [
        pictures.line_chart(
            {
                "train": (steps, column("cross_entropy")),
                "validation": (steps, column("validation_cross_entropy")),
            },
            "cross-entropy loss",
            "step",
        ),
        pictures.line_chart(
            {
                "train": (steps, column("train_accuracy")),
                "validation": (steps, column("validation_accuracy")),
            },
            "accuracy",
            "step",
        ),
    ]
    if any(math.isfinite(v) for v in column("learning_rate")):
        charts.append(
            pictures.line_chart({"rate": (steps, column("learning_rate"))}, "learning rate", "step")
        )
    tuned = result.fine_tune.history if result.fine_tune is not None else []
    if tuned:
        charts.append(
            pictures.line_chart(
                {"loss": ([r["step"] for r in tuned], [r["loss"] for r in tuned])},
                "fine-tuning loss",
                "fine-tuning step",
            )
        )
    return (
        "<h2>Training</h2><div class='grid'>" + "".join(_img(c, "chart") for c in charts) + "</div>"
    )


def _evaluation(split: str, evaluation: Any, names: list[str]) -> str:
    report = evaluation.report(names)
    per_class = _per_class(report)
    columns = list(next(iter(per_class.values()), {}))
    rows = [(name, *(_number(values[c]) for c in columns)) for name, values in per_class.items()]
    summary = [f"Accuracy {_accuracy(report)}"]
    for key in (
        "macro_f1",
        "macro_roc_auc",
        "top5_accuracy",
        "micro_f1",
        "mean_roc_auc",
        "mean_average_precision",
    ):
        if report.get(key) is not None:
            summary.append(f"{key.replace('_', ' ')} {_number(report[key])}")
    parts = [
        f"<h2>Evaluation: {_e(split.removesuffix('ing'))} split</h2>",
        f"<p>{_e('; '.join(summary))}</p>",
        _table(("class", *columns), rows),
    ]
    if hasattr(evaluation, "confusion_matrix"):
        matrix = pictures.confusion_image(evaluation.confusion_matrix(), names)
        parts.append("<p>Confusion matrix</p>" + _img(matrix, "confusion matrix"))
    return "\n".join(parts)


def _per_class(report: dict) -> dict[str, dict]:
    """A split report's figures per class, or per label for multi-label data."""
    return report.get("per_class") or report.get("per_label") or {}


def _mistakes(result: RunResult) -> str:
    mistakes = result.misclassified(MISTAKES_SHOWN)
    if not mistakes:
        return ""
    figures = [
        _figure(m.path, [f"true: {m.actual}", (f"{m.predicted} {m.score:.2f}", "wrong")])
        for m in mistakes
    ]
    total = len(result.misclassified())
    return (
        f"<h2>Misclassified test images</h2><p class='muted'>{len(mistakes)} of {total}, the "
        "most confident mistakes first</p><div class='grid'>" + "".join(figures) + "</div>"
    )


def _audit(audit: AuditReport) -> str:
    parts = ["<h2>Audit of the photos</h2>"]
    if audit.files:
        where = ", ".join(_e(p) for p in audit.files.values())
        parts.append(f"<p class='muted'>Every finding is in the CSVs: {where}</p>")
    suspects = [
        _figure(
            row["path"],
            [
                f"filed under {row['label']} ({row['p_label']:.2f})",
                (f"looks like {row['expected']} ({row['p_expected']:.2f})", "wrong"),
            ],
        )
        for row in audit.suspects[:AUDIT_ROWS_SHOWN]
    ]
    parts.append(_gallery("Suspect labels", suspects, len(audit.suspects)))
    pairs = [
        "<figure class='pair'>"
        + _figure(row["path_a"], [f"{row['label_a']} ({row['split_a']})"])
        + _figure(row["path_b"], [f"{row['label_b']} ({row['split_b']})"])
        + f"<figcaption>{_e(row['finding'])}, similarity {row['similarity']:.3f}</figcaption>"
        "</figure>"
        for row in _duplicates_first_across(audit.duplicates)[:AUDIT_ROWS_SHOWN]
    ]
    parts.append(_gallery("Duplicates", pairs, len(audit.duplicates)))
    outliers = [
        _figure(row["path"], [f"{row['label']}, score {row['score']:.2f}"])
        for row in audit.outliers[:AUDIT_ROWS_SHOWN]
    ]
    parts.append(_gallery("Outliers", outliers, len(audit.outliers)))
    return "\n".join(parts)


def _duplicates_first_across(rows: list[dict]) -> list[dict]:
    """Pairs across splits or classes first: those are the ones that mislead."""
    return sorted(rows, key=lambda r: r["split_a"] == r["split_b"] and r["label_a"] == r["label_b"])


def _gallery(title: str, figures: list[str], total: int) -> str:
    if not figures:
        return f"<h3>{_e(title)}</h3><p>None found.</p>"
    shown = f"{len(figures)} of {total}" if total > len(figures) else f"{total}"
    return f"<h3>{_e(title)} ({shown})</h3><div class='grid'>" + "".join(figures) + "</div>"


def _what_was_run(config: RetrainConfig, result: RunResult | None) -> str:
    default = RetrainConfig(image_dir=config.image_dir)
    defaults = dict(leaf_fields(default))
    changed = [(k, _e(repr(v))) for k, v in leaf_fields(config) if defaults.get(k) != v]
    parts = ["<h2>What was run</h2>"]
    parts.append("<p>Settings that differ from the defaults:</p>")
    parts.append(_table(("setting", "value"), changed, escape=False) if changed else "<p>none</p>")
    if result is not None:
        facts = [
            ("module", _e(result.module)),
            ("classes", _e(", ".join(result.labels))),
            *((f"{split} images", str(n)) for split, n in result.images.items()),
            ("images skipped", str(len(result.skipped))),
            ("training steps", str(result.training_steps)),
            ("wall seconds", f"{result.timings.wall():.1f}"),
            *((f"{name} seconds", f"{s:.1f}") for name, s in result.timings.by_phase().items()),
            ("extraction seconds", f"{result.timings.extraction:.1f}"),
            *((f"output {k}", _e(str(v))) for k, v in result.outputs.items()),
        ]
        parts.append(_table(("", ""), facts, escape=False))
    return "\n".join(parts)


def _figure(path: str, caption: Sequence[str | tuple[str, str]]) -> str:
    """A thumbnail of the image file, captioned with `caption`'s lines (text, or (text, CSS
    class)) and its file name; the whole path shows on hovering."""
    thumb = pictures.thumbnail(path)
    image = _photo(thumb, Path(path).name) if thumb is not None else "<p>(unreadable)</p>"
    lines = []
    for line in [*caption, (Path(path).name, "muted")]:
        text, css = (line, "") if isinstance(line, str) else line
        lines.append(f"<div class='{css}'>{_e(text)}</div>")
    return f"<figure title='{_e(path)}'>{image}<figcaption>{''.join(lines)}</figcaption></figure>"


def _img(image: Image.Image, alt: str, css: str = "") -> str:
    """An <img> with a drawing inline, as PNG."""
    return _inline(pictures.png_bytes(image), "png", alt, css)


def _photo(image: Image.Image, alt: str) -> str:
    """An <img> with a photo's thumbnail inline, as JPEG."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return _inline(buffer.getvalue(), "jpeg", alt)


def _inline(data: bytes, kind: str, alt: str, css: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f"<img class='{css}' alt='{_e(alt)}' src='data:image/{kind};base64,{encoded}'>"


def _table(header: Iterable[str], rows: Iterable[Sequence[Any]], escape: bool = True) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for value in row:
            text = _e(str(value)) if escape else str(value)
            css = " class='num'" if _is_number(value) else ""
            cells.append(f"<td{css}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>" + "".join(body) + "</table>"


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return value == "n/a"
    return True


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _worst_label_lines(result: RunResult, report: dict) -> list[str]:
    """The multi-label summary's worst few labels (lowest test ROC AUC) as an aligned table:
    positives per split, ROC AUC, AP, threshold and F1 at it."""
    worst = worst_labels(report["per_label"], WORST_LABELS_SHOWN)
    header, rows = label_summary_rows(result, worst)
    table = [["label", *header], *rows]
    widths = [max(len(str(row[k])) for row in table) for k in range(len(table[0]))]
    shown = f"the {len(worst)} of lowest test ROC AUC" if len(worst) < len(result.labels) else "all"
    lines = [f"Labels ({shown} of {len(result.labels)}; all in the metrics JSON and HTML report):"]
    for row in table:
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return lines


def closing_lines(config: RetrainConfig, result: RunResult) -> list[str]:
    """The end of a run in a few lines: accuracy with its interval, the weakest classes, the
    health verdict, where the outputs are, and the commands to look further."""
    lines = []
    test = result.test
    if test is not None:
        report = test.report(result.labels)
        small = " (few test images: the interval is wide)" if report["n"] < 100 else ""
        lines.append(f"Test accuracy {_accuracy(report)}{small}")
        per_class = _per_class(report)
        if "per_label" in report and result.split_counts:
            lines += _worst_label_lines(result, report)
        else:
            lowest = lowest_recalls(per_class)
            weakest = ", ".join(f"{n} {100 * r:.0f}% of {s}" for n, r, s in lowest)
            lines.append(f"Weakest classes (recall): {weakest}")
    warnings = [f for f in result.health if f.severity == "warning"]
    lines.append(
        f"Health: {len(warnings)} warning(s): " + "; ".join(f.code for f in warnings)
        if warnings
        else "Health: no problem found"
    )
    lines += [
        f"Fine-tuning thrown away ({f.numbers['cause'].replace('_', ' ')}): {f.suggestion}"
        for f in warnings
        if f.code == "fine_tuning_discarded"
    ]
    for setting, path in result.outputs.items():
        lines.append(f"Wrote {setting.replace('_', ' ')}: {path}")
    graph, labels = result.outputs.get("output_graph"), result.outputs.get("output_labels")
    example = next(iter(result.test_paths), None)
    if graph and labels and example:
        lines.append(f"Try it: label-image --graph {graph} --labels {labels} --image {example}")
    if config.outputs.summaries_dir:
        lines.append(f"Look further: tensorboard --logdir {config.outputs.summaries_dir}")
    return lines
