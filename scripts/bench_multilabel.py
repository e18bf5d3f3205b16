"""The `multilabel` benchmark suite (scripts/benchmark.py): a labels CSV of N rows (800,000 by
default) and 19 labels over synthetic vectors written to the bottleneck cache, no image files.

The labels have the seeds' user's shares: from 70.7% of the images down to 0.0056%, with the
validation split shifted on purpose (the first label on 33.3% of validation images, the
eleventh and the last on none), so the health report's shift test and undefined AUCs are
measured at that size too. A process of its own (its peak RSS is the figure) then times:

- scan: the CSV read into the image list, labels and splits (`read_labels_csv`; its check
  that each listed file exists is answered yes, as there are no files: a real run adds one
  stat per row);
- lookup: the cache located for every row (what a run with a filled cache does);
- training: the default 4,000 steps of the sigmoid layer, streamed from the cache;
- evaluation: thresholds chosen on the validation split and the test split evaluated;
- report: the shares per split, the shift test and the per-label summary.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

DIM = 1280
SHARES = [0.707, 0.35, 0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.05]
SHARES += [0.0398, 0.03, 0.02, 0.015, 0.01, 0.005, 0.002, 0.0005, 0.000056]
LABELS = [f"label{j:02d}" for j in range(len(SHARES))]
# Validation's own shares where they differ (the seeds' user's: 70.7% -> 33.3%, 3.98% -> 0).
VALIDATION_SHARES = {0: 0.333, 10: 0.0, 18: 0.0}
CHUNK = 16_384


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def _name(i: int) -> str:
    return f"img{i:07d}.jpg"


def write_case(folder: Path, rows: int) -> None:
    """folder/labels.csv (path and 19 labels, `rows` rows) and a bottleneck cache in
    folder/cache whose entry i (keys i) is image i's vector: a shared base, one direction per
    label it has, noise."""
    from retrain.bottlenecks.cache import BottleneckCache
    from retrain.data.scan import split_for_file

    rng = np.random.default_rng(0)
    base = np.abs(rng.normal(size=DIM))
    directions = rng.normal(size=(len(SHARES), DIM)) * 0.04
    cache = BottleneckCache(folder / "cache", "synthetic", DIM)
    with open(folder / "labels.csv", "w") as csv, cache.writer() as writer:
        csv.write(",".join(["path", *LABELS]) + "\n")
        for start in range(0, rows, CHUNK):
            index = range(start, min(start + CHUNK, rows))
            validation = np.array([split_for_file(_name(i), 10, 10) == "validation" for i in index])
            shares = np.tile(SHARES, (len(index), 1))
            for j, share in VALIDATION_SHARES.items():
                shares[validation, j] = share
            y = (rng.random(shares.shape) < shares).astype(np.uint8)
            x = np.abs(base + y @ directions + rng.normal(size=(len(index), DIM)))
            csv.writelines(
                _name(i) + "," + ",".join(map(str, row)) + "\n" for i, row in zip(index, y.tolist())
            )
            keys = [_key(i) for i in index]
            writer.add_many(zip(keys, keys), x.astype(np.float32))


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure_case(folder: Path) -> None:
    """The measured process: each phase's seconds and the peak RSS after it, and what the
    evaluation and report found, to folder/metrics.json."""
    import os
    from unittest import mock

    from retrain.bottlenecks.cache import BottleneckCache, key_array
    from retrain.bottlenecks.stage import Bottlenecks
    from retrain.config import RetrainConfig
    from retrain.data.labels_csv import read_labels_csv
    from retrain.heads.head import make_head
    from retrain.reporting import health
    from retrain.training import evaluate
    from retrain.training.head import train_head
    from retrain.training.inputs import training_inputs

    config = RetrainConfig(image_dir=str(folder / "images"))
    phases, clock = {}, time.perf_counter()

    def done(phase: str) -> None:
        nonlocal clock
        phases[phase] = {
            "seconds": round(time.perf_counter() - clock, 2),
            "peak_rss_mb": _peak_mb(),
        }
        clock = time.perf_counter()

    with mock.patch.object(os.path, "isfile", return_value=True):
        image_set = read_labels_csv(folder / "labels.csv", config.image_dir, 10, 10)
    done("scan")
    cache = BottleneckCache(folder / "cache", "synthetic", DIM)
    locations = cache.locate(key_array([_key(i) for i in range(len(image_set.paths))]))
    cache.release_index()
    b = Bottlenecks(
        cache=cache,
        locations=locations,
        labels=image_set.targets,
        split_codes=image_set.split_codes,
        paths=image_set.paths,
        skipped=[],
        computed=0,
        seconds=0.0,
    )
    done("lookup")
    head = make_head(image_set)
    trained = train_head(*training_inputs(config, b, None, None), head, config.training)
    done("training")
    evaluations = evaluate.calibrate(b, trained, image_set.labels)
    test, _ = evaluate.testing_split(config, b)
    evaluations.update(evaluate.evaluate_test(test, trained, image_set.labels))
    done("evaluation")
    counts = health.split_counts(b, head)
    shifts = health.share_shifts(image_set.labels, counts)
    report = evaluations["testing"].report(image_set.labels)
    done("report")
    summary = {
        "rows": len(image_set.paths),
        "images": {split: c["images"] for split, c in counts.items()},
        "phases": phases,
        "test_mean_roc_auc": report["mean_roc_auc"],
        "test_mean_roc_auc_labels": report["mean_roc_auc_labels"],
        "test_undefined_roc_auc": report["undefined_roc_auc"],
        "validation_undefined_roc_auc": evaluations["validation"].report(image_set.labels)[
            "undefined_roc_auc"
        ],
        "shifted_labels": sorted({(r["label"], r["split"]) for r in shifts}),
    }
    (folder / "metrics.json").write_text(json.dumps(summary))


def suite_multilabel(args) -> dict:
    """Write the case (`args.multilabel_rows` rows) in a temporary folder, then measure it in
    a process of its own (this script with `--case FOLDER`): wall s and peak RSS of that
    process, the setup's seconds, and its phases and findings."""
    import tempfile

    from bench_measure import timed_run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_case(tmp, args.multilabel_rows)
        made = time.perf_counter() - start
        run = timed_run([sys.executable, __file__, "--case", str(tmp)])
        metrics = json.loads((tmp / "metrics.json").read_text())
    return {**run, "setup_seconds": round(made, 1), **metrics}


if __name__ == "__main__":  # the measured process
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_measure  # noqa: F401  (puts the repository on the path)

    measure_case(Path(sys.argv[sys.argv.index("--case") + 1]))
