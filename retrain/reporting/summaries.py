"""What a finished run adds to TensorBoard beyond the training curves (`retrain.training.head`
writes
those as it goes): evaluation figures, the confusion matrix and misclassified test images as
pictures, the health report as text, and the bottleneck vectors in the projector.

Runs are retrain.py's: train/, validation/ and test/ under --summaries_dir; the projector's
files go to projector/. Large sets are sampled, so writing stays cheap.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector

from retrain.bottlenecks.stage import Bottlenecks
from retrain.data import scan
from retrain.data.sampling import random_picks
from retrain.heads.head import Head
from retrain.reporting import pictures
from retrain.reporting.health import Finding
from retrain.reporting.html import label_summary_rows
from retrain.results import RunResult
from retrain.training.lr_find import RateSearch
from retrain.utils.atomic import writing

log = logging.getLogger("retrain")

MISTAKES_SHOWN = 48  # the most confident mistakes, as one grid of thumbnails
# The projector shows a random sample of this many bottleneck vectors (25 MB of 1,280 floats).
PROJECTOR_SAMPLE = 5_000
PROJECTOR_RUN = "projector"
PROJECTOR_TENSOR = "bottlenecks/.ATTRIBUTES/VARIABLE_VALUE"


def write_run_summaries(summaries_dir: str | Path, result: RunResult) -> None:
    """Write the run's evaluation scalars, pictures and health report at its last step."""
    root = Path(summaries_dir).expanduser()
    step = result.training_steps
    for split, evaluated in result.evaluations.items():
        run = split.removesuffix("ing")  # testing -> test, as retrain.py named the run
        with _run(root / run, step):
            for tag, value in evaluated.scalars(result.labels).items():
                tf.summary.scalar(tag, value)
            if hasattr(evaluated, "confusion_matrix"):
                image = pictures.confusion_image(evaluated.confusion_matrix(), result.labels)
                _image("confusion_matrix", image, f"{run} split: rows true, columns predicted")
            if split == "testing":
                grid = pictures.mistakes_grid(result.misclassified(MISTAKES_SHOWN))
                if grid is not None:
                    note = f"the {MISTAKES_SHOWN} most confident mistakes at most"
                    _image("misclassified", grid, note)
    with _run(root / "train", step):
        tf.summary.text("health", health_markdown(result.health))
        if result.split_counts:
            tf.summary.text("label_shares", label_shares_markdown(result))


def health_markdown(findings: Sequence[Finding]) -> str:
    """The health report as a Markdown table (TensorBoard's text tab renders it)."""
    if not findings:
        return "No problem found."
    rows = ["| severity | finding | suggestion |", "|---|---|---|"]
    for finding in findings:
        cells = (finding.severity, finding.message, finding.suggestion)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def label_shares_markdown(result: RunResult) -> str:
    """Each class's (label's) images and share per split, with its test figures, as a
    Markdown table (the HTML report's per-label summary)."""
    header, rows = label_summary_rows(result, result.labels)
    lines = ["| " + " | ".join(["label", *header]) + " |", "|" + "---|" * (len(header) + 1)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_projector(
    summaries_dir: str | Path, vectors: np.ndarray, metadata: Sequence[Sequence[str]]
) -> Path:
    """Put `vectors` [n, dim] in TensorBoard's projector, with one metadata row per vector
    (file, label, split); returns the projector's folder."""
    folder = Path(summaries_dir).expanduser() / PROJECTOR_RUN
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.tsv", "w", newline="", encoding="utf-8") as out:
        table = csv.writer(out, delimiter="\t", lineterminator="\n")
        table.writerow(["file", "label", "split"])
        table.writerows([_cell(value) for value in row] for row in metadata)
    checkpoint = tf.train.Checkpoint(bottlenecks=tf.Variable(vectors, trainable=False))
    checkpoint.save(str(folder / "bottlenecks.ckpt"))
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = PROJECTOR_TENSOR
    embedding.metadata_path = "metadata.tsv"
    projector.visualize_embeddings(str(folder), config)
    # TensorBoard lists a folder as a run, and so offers its projector, only with events in it.
    with _run(folder, step=0):
        tf.summary.text("about", f"{len(vectors)} bottleneck vectors with file, label and split")
    return folder


@contextlib.contextmanager
def _run(folder: Path, step: int) -> Iterator[None]:
    """Summaries written inside go to the TensorBoard run `folder`, at `step`."""
    writer = tf.summary.create_file_writer(str(folder))
    with writer.as_default(step=step):
        yield
    writer.close()


def _cell(value: str) -> str:
    """A metadata value on one line without tabs: the projector's TSV knows no quoting."""
    return " ".join(str(value).split())


def _image(tag: str, image, description: str) -> None:
    tf.summary.image(tag, pictures.as_array(image)[np.newaxis], description=description)


def write_rate_search(summaries_dir: str | Path, search: RateSearch, name: str) -> None:
    """The learning-rate finder's loss against rate for `name` ("training": the new layer,
    or "fine_tuning"), as the picture `loss_against_rate/NAME` in the lr_find/ run."""
    chart = pictures.line_chart(
        {"smoothed loss": (search.rates, search.smoothed)},
        f"{name.replace('_', '-')} rate finder: suggested {search.suggestion:g}",
        "learning rate",
        log_x=True,
        marker=search.suggestion,
    )
    with _run(Path(summaries_dir).expanduser() / "lr_find", step=0):
        _image(f"loss_against_rate/{name}", chart, "the red line marks the suggested rate")


def projector_sample(
    b: Bottlenecks, head: Head, names: list[str], seed: int
) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """A random sample of at most PROJECTOR_SAMPLE bottleneck vectors, with the file, label
    and split of each, for TensorBoard's projector."""
    picks = random_picks(len(b.locations), PROJECTOR_SAMPLE, seed)
    vectors, _ = b.cache.read(b.locations[picks])
    rows = zip(
        (scan.display_path(p) for p in b.paths.take(picks)),
        (head.label_text(b.labels[i], names) for i in picks),
        (scan.SPLITS[code] for code in b.split_codes[picks]),
    )
    return vectors, list(rows)


def write_summaries(
    summaries_dir: str, result: RunResult, sample: tuple[np.ndarray, list] | None
) -> None:
    """The end of the run in TensorBoard: evaluation, pictures, health, and the sample of
    bottleneck vectors in the projector."""
    started = time.perf_counter()
    with writing(summaries_dir, "TensorBoard summaries"):
        write_run_summaries(summaries_dir, result)
        if sample is not None:
            write_projector(summaries_dir, *sample)
    log.debug("TensorBoard summaries written in %.2f s", time.perf_counter() - started)
