"""Auditing the photos with their cached vectors: suspect labels, duplicates, outliers.

`audit(config)` (`retrain --audit`) computes only the bottlenecks that are missing, trains
nothing it keeps and exports nothing. It reports:

- suspect labels: each image's class probabilities predicted out of sample (k folds, the new
  layer trained on the other folds' vectors), judged by confident learning (cleanlab's
  `find_label_issues`, the `retrain[audit]` extra), ranked by how little the model believes
  the folder's label;
- duplicates: identical files (the cache gives them one vector) and near-identical photos
  (cosine similarity of the vectors over a threshold, found by a faiss nearest-neighbour search:
  exact up to `EXACT_SEARCH_ROWS` vectors, an inverted-file index beyond, so a million images
  need neither an n^2 matrix nor n^2 time), flagged when they cross splits or classes;
- outliers: photos far from every class, by cosine similarity to the nearest class centroid,
  under the median by more than `OUTLIER_MADS` median absolute deviations.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain import scan
from retrain.atomic import atomic_write_text
from retrain.bottlenecks import Bottlenecks
from retrain.config import AuditConfig, HeadTrainingConfig
from retrain.errors import RetrainError
from retrain.evaluate import predict_probabilities
from retrain.features import FeatureSplit, Split
from retrain.heads import SoftmaxHead

log = logging.getLogger("retrain")

EXACT_SEARCH_ROWS = 200_000
OUTLIER_MADS = 6.0
CHUNK_ROWS = 8192


@dataclass
class AuditReport:
    """The findings, each a list of rows ready for a CSV; see the module docstring."""

    suspects: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    outliers: list[dict] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)  # finding kind -> CSV written

    def cross_split_duplicates(self) -> list[dict]:
        """Duplicate pairs whose photos sit in different splits."""
        return [row for row in self.duplicates if row["split_a"] != row["split_b"]]

    def metrics(self) -> dict:
        """The audit's counts and files for --metrics_json."""
        return {
            "images": self.images,
            "suspect_labels": len(self.suspects),
            "duplicates": len(self.duplicates),
            "duplicates_across_splits": len(self.cross_split_duplicates()),
            "duplicates_across_classes": sum(r["label_a"] != r["label_b"] for r in self.duplicates),
            "outliers": len(self.outliers),
            "seconds": round(self.seconds, 3),
            "files": dict(self.files),
        }


def audit_bottlenecks(
    b: Bottlenecks, labels: list[str], settings: AuditConfig, training: HeadTrainingConfig
) -> AuditReport:
    """Audit the usable images of `b` (every split) with class names `labels`; the folds'
    layers are trained with `training`'s settings. Writes the CSVs if `settings.output_dir`."""
    start = time.perf_counter()
    vectors = FeatureSplit(b.cache, b.locations, b.labels).load().x
    paths, splits = b.paths, [scan.SPLITS[code] for code in b.split_codes]
    report = AuditReport(images=len(vectors))
    probabilities = out_of_sample_probabilities(vectors, b.labels, len(labels), settings, training)
    report.suspects = _suspects(probabilities, b.labels, labels, paths, splits)
    report.duplicates = _duplicates(vectors, b, labels, settings.duplicate_similarity)
    report.outliers = _outliers(vectors, b.labels, labels, paths, splits)
    report.seconds = time.perf_counter() - start
    if settings.output_dir:
        report.files = write_csvs(report, settings.output_dir)
    return report


def out_of_sample_probabilities(
    vectors: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    settings: AuditConfig,
    training: HeadTrainingConfig,
) -> np.ndarray:
    """float32 [n, classes]: each row predicted by a layer trained on the other folds only."""
    from retrain.train import train_head

    folds = np.random.default_rng(training.random_seed).permutation(len(vectors)) % settings.folds
    probabilities = np.zeros((len(vectors), num_classes), np.float32)
    head = SoftmaxHead(num_classes)
    for fold in range(settings.folds):
        held = folds == fold
        trained = train_head(Split(vectors[~held], classes[~held]), None, head, training)
        for rows in _chunks(np.flatnonzero(held)):
            probabilities[rows] = predict_probabilities(
                trained.weights, trained.biases, vectors[rows]
            )
    return probabilities


def _suspects(probabilities, classes, labels, paths, splits) -> list[dict]:
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as err:
        raise RetrainError(
            f"the audit of labels needs cleanlab: pip install 'retrain[audit]' ({err})"
        ) from None
    ranked = find_label_issues(classes, probabilities, return_indices_ranked_by="self_confidence")
    rows = []
    for i in ranked:
        expected = int(np.argmax(probabilities[i]))
        rows.append(
            {
                "path": scan.display_path(paths[i]),
                "finding": "suspect label",
                "label": labels[classes[i]],
                "expected": labels[expected],
                "p_label": round(float(probabilities[i, classes[i]]), 4),
                "p_expected": round(float(probabilities[i, expected]), 4),
                "split": splits[i],
            }
        )
    return rows


def _duplicates(vectors: np.ndarray, b: Bottlenecks, labels, threshold: float) -> list[dict]:
    """Pairs (i < j) of identical files (one cached vector) or photos whose vectors' cosine
    similarity is at least `threshold`."""
    identical = identical_pairs(b.locations)
    near = _similar_pairs(vectors, threshold)
    rows = []
    for (i, j), similarity in {**near, **{pair: 1.0 for pair in identical}}.items():
        kind = "identical file" if (i, j) in identical else "near duplicate"
        rows.append(
            {
                "path_a": scan.display_path(b.paths[i]),
                "path_b": scan.display_path(b.paths[j]),
                "finding": kind,
                "similarity": round(float(similarity), 4),
                "label_a": labels[b.labels[i]],
                "label_b": labels[b.labels[j]],
                "split_a": scan.SPLITS[b.split_codes[i]],
                "split_b": scan.SPLITS[b.split_codes[j]],
            }
        )
    return sorted(rows, key=lambda r: (-r["similarity"], r["path_a"], r["path_b"]))


def identical_pairs(locations: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of images that share one cached vector: the same bytes (same content key).
    Vectorised but for the groups of duplicates, so a training run can afford it."""
    keys = locations["shard"].astype(np.int64) << 32 | locations["row"].astype(np.int64)
    order = np.argsort(keys, kind="stable")
    starts = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    pairs = set()
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        group = sorted(order[start : start + size].tolist())
        pairs.update((a, c) for k, a in enumerate(group) for c in group[k + 1 :])
    return pairs


def _similar_pairs(vectors: np.ndarray, threshold: float, k: int = 8) -> dict:
    """{(i, j): cosine similarity} of each vector's `k` nearest neighbours at or over
    `threshold` (faiss inner product on normalised vectors)."""
    unit = _normalised(vectors)
    index = _index(unit)
    pairs = {}
    for rows in _chunks(np.arange(len(unit))):
        similarity, neighbours = index.search(unit[rows], min(k + 1, len(unit)))
        for i, sims, found in zip(rows, similarity, neighbours):
            for s, j in zip(sims, found):
                if j >= 0 and j != i and s >= threshold:
                    pairs[(min(i, j), max(i, j))] = float(min(s, 1.0))
    return pairs


def _index(unit: np.ndarray):
    try:
        import faiss
    except ImportError as err:
        raise RetrainError(
            f"the audit of duplicates needs faiss: pip install 'retrain[audit]' ({err})"
        ) from None

    dim = unit.shape[1]
    if len(unit) <= EXACT_SEARCH_ROWS:
        index = faiss.IndexFlatIP(dim)
    else:  # about sqrt(n) lists, a few of them searched: minutes, not hours, at a million
        lists = int(4 * np.sqrt(len(unit)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(unit), min(len(unit), 50 * lists), False)
        index.train(unit[np.sort(sample)])
        index.nprobe = 8
    index.add(unit)
    return index


def _outliers(vectors, classes, labels, paths, splits) -> list[dict]:
    """Images whose similarity to the nearest class centroid is far under the median."""
    unit = _normalised(vectors)
    centroids = _normalised(np.stack([unit[classes == c].mean(axis=0) for c in range(len(labels))]))
    nearest = np.concatenate(
        [(unit[rows] @ centroids.T).max(axis=1) for rows in _chunks(np.arange(len(unit)))]
    )
    median = np.median(nearest)
    spread = np.median(np.abs(nearest - median)) or 1e-6
    scores = (median - nearest) / spread
    rows = [
        {
            "path": scan.display_path(paths[i]),
            "finding": "outlier",
            "label": labels[classes[i]],
            "similarity_to_nearest_class": round(float(nearest[i]), 4),
            "score": round(float(scores[i]), 2),
            "split": splits[i],
        }
        for i in np.argsort(-scores)
        if scores[i] > OUTLIER_MADS
    ]
    return rows


def write_csvs(report: AuditReport, folder: str | Path) -> dict[str, str]:
    """One CSV per finding kind in `folder`; returns {kind: path}."""
    written = {}
    for kind in ("suspects", "duplicates", "outliers"):
        rows = getattr(report, kind)
        path = Path(folder).expanduser() / f"{kind}.csv"
        atomic_write_text(path, _csv(rows, kind), "audit CSV")
        written[kind] = str(path)
    return written


_COLUMNS = {
    "suspects": ["path", "finding", "label", "expected", "p_label", "p_expected", "split"],
    "duplicates": [
        "path_a",
        "path_b",
        "finding",
        "similarity",
        "label_a",
        "label_b",
        "split_a",
        "split_b",
    ],
    "outliers": ["path", "finding", "label", "similarity_to_nearest_class", "score", "split"],
}


def _csv(rows: list[dict], kind: str) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_COLUMNS[kind], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _chunks(indices: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), CHUNK_ROWS):
        yield indices[start : start + CHUNK_ROWS]
