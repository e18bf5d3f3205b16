"""Auditing the photos with their cached vectors: suspect labels, duplicates, outliers.

`audit(config)` (`retrain --audit`) computes only the bottlenecks that are missing, trains
nothing it keeps and exports nothing. It reports:

- suspect labels: each image's class probabilities predicted out of sample (k folds, the new
  layer trained on the other folds' vectors), judged by confident learning (cleanlab's
  `find_label_issues`, the `retrain[audit]` extra), ranked by how little the model believes
  the folder's label; multi-label data (a labels CSV) is judged per label (cleanlab's
  `find_multilabel_issues_per_class`): one row per image and label it doubts;
- duplicates: identical files (the cache gives them one vector) and near-identical photos
  (cosine similarity of the vectors over a threshold, found by a faiss nearest-neighbour search:
  exact up to `EXACT_SEARCH_ROWS` vectors, beyond that an approximate index of compressed
  vectors whose candidates are checked against the exact vectors), flagged when they cross
  splits or classes;
- outliers: photos unlike their own class and unlike every other: the cosine similarity of the
  photo's vector to the nearest class centroid (of any class), against how similar the
  photos of its own class are to their centroid (median and median absolute deviation, a
  robust z-score); over `OUTLIER_Z` it is an outlier, ranked by that score. Each class is
  judged by its own spread, so a loose class does not hide the outliers of a tight one, and
  a photo that looks like another class (a suspect label, not an outlier) is not reported.
  Multi-label: the photo's own label nearest to it, photos without a label against all.

Memory stays bounded however many images there are: the vectors are never all in memory. Each
fold's layer trains on at most `FOLD_TRAINING_ROWS` of the other folds' vectors (a random
sample beyond that), and everything else streams over the cache in chunks of
`CHUNK_ROWS`: the out-of-sample predictions (every fold's layer on each chunk), the class
centroids (sums), the index (built chunk by chunk) and its queries. What grows with the
number of images is small: a few numbers per image and, beyond `EXACT_SEARCH_ROWS`, the
index's `SEARCH_DIMS` bytes per image (128 MB at a million).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from retrain.bottlenecks.splits import IN_MEMORY_LIMIT_BYTES, FeatureSplit
from retrain.bottlenecks.stage import Bottlenecks
from retrain.config import AuditConfig, HeadTrainingConfig
from retrain.data import scan
from retrain.errors import RetrainError
from retrain.heads.head import Head, SoftmaxHead
from retrain.utils.atomic import atomic_write_text

log = logging.getLogger("retrain")

# An exact (flat) index up to here: 256 MB of 1,280-wide vectors; an approximate one beyond.
EXACT_SEARCH_ROWS = 50_000
SEARCH_DIMS = 128  # the approximate index's dimensions (PCA), stored as one byte each
LIST_ROWS = 256  # vectors per inverted list, on average
SEARCH_LISTS = 8  # inverted lists searched per query
# Each fold's layer trains on at most this many of the other folds' vectors (80 MB of 1,280):
# its 4,000 steps of 100 draw 400,000 examples, and a larger sample costs time, not accuracy.
FOLD_TRAINING_ROWS = 16_384
# Candidates of the approximate index this far under the threshold are checked exactly (the
# 8-bit codes can understate a similarity a little).
APPROXIMATION_MARGIN = 0.02
# Robust z-score (median absolute deviations scaled to a normal's standard deviation) from
# which a photo is an outlier: about 1% of real photos (33 of 3,068 clothing photos, every one
# of 20 flower photos planted among them; docs/audit.md).
OUTLIER_Z = 3.0
MAD_TO_SD = 1.4826
MIN_SPREAD = 1e-3  # a class's spread at least this, so a class of copies gives no division by 0
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
    b: Bottlenecks,
    labels: list[str],
    settings: AuditConfig,
    training: HeadTrainingConfig,
    head: Head | None = None,
) -> AuditReport:
    """Audit the usable images of `b` (every split) with class (multi-label: label) names
    `labels`; the folds' layers are trained for `head` (default: softmax over the classes)
    with `training`'s settings. Streams the vectors from the cache (see the module docstring).
    Writes the CSVs if `settings.output_dir`."""
    start = time.perf_counter()
    head = head or SoftmaxHead(len(labels))
    features = FeatureSplit(b.cache, b.locations, b.labels)
    report = AuditReport(images=len(features))
    probabilities = out_of_sample_probabilities(features, head, settings, training)
    report.suspects = _suspects(probabilities, b, labels, head)
    index = _build_index(features, training.random_seed)
    centroids = _centroids(features, index, head)
    near, closeness = _search(features, index, centroids, settings.duplicate_similarity, head)
    report.duplicates = _duplicates(near, b, labels, head)
    report.outliers = _outliers(closeness, b, labels, head)
    report.seconds = time.perf_counter() - start
    if settings.output_dir:
        report.files = write_csvs(report, settings.output_dir)
    return report


def out_of_sample_probabilities(
    features: FeatureSplit, head: Head, settings: AuditConfig, training: HeadTrainingConfig
) -> np.ndarray:
    """float32 [n, outputs]: each row predicted by a layer trained on the other folds only
    (on a random sample of them where they do not fit in memory), in one streamed pass."""
    from retrain.training.head import train_head

    folds = np.random.default_rng(training.random_seed).permutation(len(features))
    folds %= settings.folds
    layers = []
    for fold in range(settings.folds):
        rest = np.flatnonzero(folds != fold)
        others = FeatureSplit(features.cache, features.locations[rest], features.y[rest])
        sample = others.subset(FOLD_TRAINING_ROWS, training.random_seed + fold)
        trained = train_head(sample.load(), None, head, training)
        layers.append((trained.weights, trained.biases))
    probabilities = np.zeros((len(features), head.num_outputs), np.float32)
    for rows, x in _vector_chunks(features):
        for fold, (weights, biases) in enumerate(layers):
            held = folds[rows] == fold
            logits = x[held].astype(np.float64) @ weights + biases
            probabilities[rows[held]] = head.probabilities(logits).numpy()
    return probabilities


def _suspects(
    probabilities: np.ndarray, b: Bottlenecks, labels: list[str], head: Head
) -> list[dict]:
    """Confident learning's label issues, most doubtful first: one row per image (per image
    and label for multi-label data)."""
    filters = _cleanlab_filters()
    if head.multi_label:
        return _label_suspects(filters, probabilities, b, labels)
    ranked = filters.find_label_issues(
        b.labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    rows = []
    for i in ranked:
        given = b.labels[i]
        expected = int(np.argmax(probabilities[i]))
        rows.append(
            _suspect_row(
                b,
                i,
                labels[given],
                labels[expected],
                probabilities[i, given],
                probabilities[i, expected],
            )
        )
    return rows


def _label_suspects(filters, probabilities: np.ndarray, b: Bottlenecks, labels) -> list[dict]:
    """Per label, the images whose 0/1 for it confident learning doubts: `label` is what the
    CSV says ("hat" or "not hat"), `expected` the other, with the probabilities of both."""
    applies = [np.flatnonzero(row).tolist() for row in b.labels]
    ranked, _, _ = filters.find_multilabel_issues_per_class(
        applies, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    rows = []
    for k, indices in enumerate(ranked):
        for i in indices:
            p = float(probabilities[i, k])
            given = (labels[k], p) if b.labels[i, k] else (f"not {labels[k]}", 1.0 - p)
            other = (f"not {labels[k]}", 1.0 - p) if b.labels[i, k] else (labels[k], p)
            rows.append(_suspect_row(b, i, given[0], other[0], given[1], other[1]))
    return sorted(rows, key=lambda r: r["p_label"])


def _suspect_row(b: Bottlenecks, i: int, label: str, expected: str, p_label, p_expected) -> dict:
    return {
        "path": scan.display_path(b.paths[i]),
        "finding": "suspect label",
        "label": label,
        "expected": expected,
        "p_label": round(float(p_label), 4),
        "p_expected": round(float(p_expected), 4),
        "split": scan.SPLITS[b.split_codes[i]],
    }


def _cleanlab_filters() -> SimpleNamespace:
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.multilabel_classification.filter import find_multilabel_issues_per_class
    except ImportError as err:
        raise RetrainError(
            f"the audit of labels needs cleanlab: pip install 'retrain[audit]' ({err})"
        ) from None
    return SimpleNamespace(
        find_label_issues=find_label_issues,
        find_multilabel_issues_per_class=find_multilabel_issues_per_class,
    )


def _duplicates(near: dict, b: Bottlenecks, labels: list[str], head: Head) -> list[dict]:
    """Rows for the pairs (i < j) of identical files (one cached vector) and the pairs `near`
    ({(i, j): cosine similarity}), most similar first."""
    identical = identical_pairs(b.locations)
    rows = []
    for (i, j), similarity in {**near, **{pair: 1.0 for pair in identical}}.items():
        kind = "identical file" if (i, j) in identical else "near duplicate"
        rows.append(
            {
                "path_a": scan.display_path(b.paths[i]),
                "path_b": scan.display_path(b.paths[j]),
                "finding": kind,
                "similarity": round(float(similarity), 4),
                "label_a": head.label_text(b.labels[i], labels, ";"),
                "label_b": head.label_text(b.labels[j], labels, ";"),
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


@dataclass
class _Index:
    """A faiss index of the unit vectors. Exact (inner products) up to EXACT_SEARCH_ROWS;
    beyond, approximate: PCA to SEARCH_DIMS, an inverted file of 8-bit codes (one byte a
    dimension), squared L2 distances. A projection never lengthens a difference, so a pair
    over the threshold stays a candidate; candidates are then checked on the exact vectors."""

    faiss_index: object
    approximate: bool

    def similarities(self, unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's `k` nearest neighbours: estimated cosine similarities and their rows."""
        found, neighbours = self.faiss_index.search(unit, k)
        return (1.0 - found / 2.0 if self.approximate else found), neighbours


def _build_index(features: FeatureSplit, seed: int) -> _Index:
    """An empty index for `features`, trained on a sample of them if it is approximate."""
    faiss = _faiss()
    n, dim = len(features), features.feature_dim
    if n <= EXACT_SEARCH_ROWS:
        return _Index(faiss.IndexFlatIP(dim), approximate=False)
    lists = max(1, n // LIST_ROWS)  # their centroids in a small graph (HNSW): cheap to find
    index = faiss.index_factory(dim, f"PCA{min(SEARCH_DIMS, dim)},IVF{lists}_HNSW32,SQ8")
    rows = min(IN_MEMORY_LIMIT_BYTES // (4 * dim), 64 * lists)
    sample = features.subset(rows, seed).load()
    index.train(_normalised(sample.x))
    faiss.extract_index_ivf(index).nprobe = SEARCH_LISTS
    return _Index(index, approximate=True)


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise RetrainError(
            f"the audit of duplicates needs faiss: pip install 'retrain[audit]' ({err})"
        ) from None
    return faiss


def _centroids(features: FeatureSplit, index: _Index, head: Head) -> np.ndarray:
    """One streamed pass: every unit vector added to `index`; returns the unit mean vector
    of each class (multi-label: of the images of each label), float32 [outputs, dim]."""
    sums = np.zeros((head.num_outputs, features.feature_dim), np.float64)
    for rows, x in _vector_chunks(features):
        unit = _normalised(x)
        index.faiss_index.add(unit)
        sums += head.membership(features.y[rows]).T @ unit
    return _normalised(sums)


@dataclass
class _Closeness:
    """Each vector's cosine similarity to the nearest class centroid (`nearest`), to the
    nearest centroid of its own classes or labels (`own`; NaN for an image without a label),
    and that own class (`group`; -1 for none)."""

    nearest: np.ndarray
    own: np.ndarray
    group: np.ndarray

    @classmethod
    def empty(cls, n: int) -> _Closeness:
        """Room for `n` vectors."""
        return cls(np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.int64))

    def fill(self, rows: np.ndarray, similarities: np.ndarray, members: np.ndarray) -> None:
        """Set `rows` from their similarities to every centroid [rows, outputs] and their
        membership [rows, outputs] (1 where the class or label is theirs)."""
        self.nearest[rows] = similarities.max(axis=1)
        own = np.where(members > 0, similarities, -np.inf)
        self.group[rows] = np.where(members.any(axis=1), own.argmax(axis=1), -1)
        self.own[rows] = np.where(self.group[rows] >= 0, own.max(axis=1), np.nan)


def _search(
    features: FeatureSplit,
    index: _Index,
    centroids: np.ndarray,
    threshold: float,
    head: Head,
    k: int = 8,
) -> tuple[dict, _Closeness]:
    """One streamed pass of queries: {(i, j): cosine similarity} of each vector's `k` nearest
    neighbours at or over `threshold`, and each vector's closeness to the class centroids."""
    pairs, closeness = {}, _Closeness.empty(len(features))
    margin = APPROXIMATION_MARGIN if index.approximate else 0.0
    for rows, x in _vector_chunks(features):
        unit = _normalised(x)
        closeness.fill(rows, unit @ centroids.T, head.membership(features.y[rows]))
        similarity, neighbours = index.similarities(unit, min(k + 1, len(features)))
        i = np.repeat(np.arange(len(rows)), neighbours.shape[1])
        j, s = neighbours.ravel(), similarity.ravel()
        keep = (j >= 0) & (j != rows[i]) & (s >= threshold - margin)
        i, j, s = i[keep], j[keep], s[keep]
        if index.approximate and len(j):
            s = _exact_similarities(features, unit[i], j)
            i, j, s = i[s >= threshold], j[s >= threshold], s[s >= threshold]
        for a, c, sim in zip(rows[i].tolist(), j.tolist(), s.tolist()):
            pairs[(min(a, c), max(a, c))] = min(sim, 1.0)
    return pairs, closeness


def _exact_similarities(features: FeatureSplit, unit: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cosine similarity of each of `unit` to the cached vector of the same place in `rows`,
    reading CHUNK_ROWS of those at a time."""
    out = np.empty(len(rows), np.float32)
    for block in _chunks(np.argsort(rows, kind="stable")):
        others = _normalised(features.read(rows[block]))
        out[block] = np.einsum("ij,ij->i", unit[block], others)
    return out


def outlier_scores(closeness: _Closeness) -> np.ndarray:
    """float64 [n]: how far each vector's similarity to the nearest centroid of any class
    falls under the median similarity of its own class's vectors to their own centroid, in
    that class's robust standard deviations (MAD_TO_SD median absolute deviations); images
    without a label are measured against every image's median and spread."""
    scores = np.zeros(len(closeness.nearest))
    for group in np.unique(closeness.group):
        members = closeness.group == group
        reference = closeness.own[members] if group >= 0 else closeness.nearest
        median = np.median(reference)
        spread = max(MAD_TO_SD * float(np.median(np.abs(reference - median))), MIN_SPREAD)
        scores[members] = (median - closeness.nearest[members]) / spread
    return scores


def _outliers(closeness: _Closeness, b: Bottlenecks, labels: list[str], head: Head) -> list[dict]:
    """Images whose `outlier_scores` exceed OUTLIER_Z, the highest score first."""
    scores = outlier_scores(closeness)
    return [
        {
            "path": scan.display_path(b.paths[i]),
            "finding": "outlier",
            "label": head.label_text(b.labels[i], labels, ";"),
            "similarity_to_nearest_class": round(float(closeness.nearest[i]), 4),
            "score": round(float(scores[i]), 2),
            "split": scan.SPLITS[b.split_codes[i]],
        }
        for i in np.argsort(-scores, kind="stable")
        if scores[i] > OUTLIER_Z
    ]


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


def _vector_chunks(features: FeatureSplit) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, their vectors) of `features` in consecutive chunks of CHUNK_ROWS."""
    for rows in _chunks(np.arange(len(features))):
        yield rows, features.read(rows)


def _chunks(indices: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), CHUNK_ROWS):
        yield indices[start : start + CHUNK_ROWS]


def log_findings(findings: AuditReport, output_dir: str | None) -> None:
    """The audit's counts, and the first suspect labels, in the log."""
    log.info(
        "Audit of %d images in %.1f s: %d suspect labels, %d duplicate pairs (%d across "
        "splits), %d outliers%s",
        findings.images,
        findings.seconds,
        len(findings.suspects),
        len(findings.duplicates),
        len(findings.cross_split_duplicates()),
        len(findings.outliers),
        f"; CSVs in {output_dir}" if findings.files else "",
    )
    for row in findings.suspects[:5]:
        log.info(
            "Suspect: %s is filed under %s, looks like %s (%.2f vs %.2f)",
            row["path"],
            row["label"],
            row["expected"],
            row["p_label"],
            row["p_expected"],
        )
