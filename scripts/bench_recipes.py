#!/usr/bin/env python3
"""Accuracy recipes (issue 33): whole `retrain` runs of each arm on each of three splits.

    python scripts/bench_recipes.py --image_dir PHOTOS --arms A,B,E --work /tmp/recipes

Runs one at a time, all sharing one bottleneck folder (bottlenecks, distorted copies and cut
activations are cached by image, not by split, so only an arm's first run computes them). Each
run is timed by /usr/bin/time (wall s, peak RSS) and writes --metrics_json under WORK/m. Prints
one JSON line per run, then a summary line per arm: mean, min and max test accuracy over the
splits. A run whose metrics file is already there is read back, not rerun (--rerun to redo).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FLIP = ["--flip_left_right", "--distorted_copies", "1"]
TUNE = ["--fine_tune_steps", "300", *FLIP]
PARTIAL = ["--fine_tune_from", "block12", *TUNE]  # Lite0's last four blocks
LITE1 = ["--tfhub_module", "efficientnet_lite1"]

ARMS: dict[str, list[str]] = {
    "A": [],
    "B": FLIP,
    "C": [*LITE1, *FLIP],
    "D": [*FLIP, "--label_smoothing", "0.1"],
    "E": [*PARTIAL, "--fine_tune_learning_rate", "0.003"],
    "F": [*PARTIAL, "--fine_tune_learning_rate", "auto"],
    # Lite1 has 21 blocks: block17 is its last four, like Lite0's block12
    "G": [*LITE1, "--fine_tune_from", "block17", *TUNE, "--fine_tune_learning_rate", "0.003"],
    "H": [*PARTIAL, "--fine_tune_learning_rate", "0.003", "--fine_tune_lr_schedule", "cosine"],
    # Lite1's and Lite2's features side by side, the head alone: --preset accurate
    "I": ["--tfhub_module", "efficientnet_lite1_lite2"],
}

SPLITS: dict[str, list[str]] = {
    "S1": ["--testing_percentage", "10", "--validation_percentage", "10", "--random_seed", "0"],
    "S2": ["--testing_percentage", "20", "--validation_percentage", "15", "--random_seed", "1"],
    "S3": [
        *["--testing_percentage", "15", "--validation_percentage", "15"],
        *["--split_hash", "path", "--random_seed", "2"],
    ],
}


def run_once(args: argparse.Namespace, arm: str, split: str) -> dict:
    """One timed `retrain` run of `arm` on `split`; returns its figures (rerun only if asked)."""
    work, name = Path(args.work), f"{arm}_{split}"
    metrics, timing = work / "m" / f"{name}.json", work / "time" / f"{name}.txt"
    for sub in ("m", "time", "runlogs", "out"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    if args.rerun or not metrics.exists():
        cmd = [
            *["/usr/bin/time", "-f", "%e s %M KB", "-o", str(timing)],
            *[sys.executable, "-m", "retrain", f"--image_dir={args.image_dir}"],
            f"--bottleneck_dir={args.bottleneck_dir or work / 'bn'}",
            f"--summaries_dir={work / 'logs' / name}",
            f"--output_graph={work / 'out' / name}.pb",
            f"--output_labels={work / 'out' / name}.txt",
            f"--metrics_json={metrics}",
            *SPLITS[split],
            *ARMS[arm],
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(work / "runlogs" / f"{name}.log", "w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                return {"arm": arm, "split": split, "error": f"failed, see {log.name}"}
    return summarize_run(arm, split, json.loads(metrics.read_text()), timing)


def summarize_run(arm: str, split: str, metrics: dict, timing: Path) -> dict:
    """The figures of one run: test accuracy, N and Wilson 95% interval, wall s, peak RSS."""
    wall, _, rss_kb, _ = timing.read_text().split()[-4:]
    test = metrics["test_evaluation"]
    low, high = test["accuracy_interval_95"]
    tune = metrics.get("fine_tune") or {}
    row = {
        "arm": arm,
        "split": split,
        "test_accuracy": round(test["accuracy"], 4),
        "test_n": test["n"],
        "wilson_95": [round(low, 4), round(high, 4)],
        "wall_s": float(wall),
        "peak_rss_gb": round(int(rss_kb) / 2**20, 2),
    }
    if tune:
        row["fine_tune"] = {
            "learning_rate": tune.get("learning_rate"),
            "kept": tune.get("kept"),
            "best_step": tune.get("best_step"),
            "steps_run": tune.get("steps_run"),
            "test_accuracy_before": tune.get("test_accuracy_before"),
        }
    return row


def summarize_arm(rows: list[dict]) -> dict:
    """Mean, min and max test accuracy (and the largest wall s and RSS) of one arm's runs."""
    accuracies = [r["test_accuracy"] for r in rows]
    return {
        "arm": rows[0]["arm"],
        "settings": " ".join(ARMS[rows[0]["arm"]]) or "(defaults)",
        "splits": {r["split"]: r["test_accuracy"] for r in rows},
        "mean": round(statistics.mean(accuracies), 4),
        "min": min(accuracies),
        "max": max(accuracies),
        "max_wall_s": max(r["wall_s"] for r in rows),
        "max_peak_rss_gb": max(r["peak_rss_gb"] for r in rows),
    }


def markdown_row(summary: dict, rows: list[dict]) -> str:
    """One line of the table in docs/benchmarks.md: per-split accuracy (N, Wilson 95%), mean,
    min-max, each run's wall s and the largest peak RSS."""
    per_split = [
        f"{r['test_accuracy']:.1%} (N={r['test_n']}, {low:.1%}-{high:.1%})"
        for r in rows
        for low, high in [r["wilson_95"]]
    ]
    return " | ".join(
        [
            f"| {summary['arm']}",
            f"`{summary['settings']}`",
            *per_split,
            f"**{summary['mean']:.1%}**",
            f"{summary['min']:.1%}-{summary['max']:.1%}",
            "/".join(f"{r['wall_s']:.0f}" for r in rows),
            f"{summary['max_peak_rss_gb']:.2f} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_dir", required=True)
    parser.add_argument("--arms", default="A,B,C,D,E,F", help=f"of {','.join(ARMS)}")
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--work", default="/tmp/recipes", help="outputs, logs and metrics")
    parser.add_argument("--bottleneck_dir", default="", help="default: WORK/bn")
    parser.add_argument("--rerun", action="store_true", help="rerun runs that have metrics")
    parser.add_argument("--markdown", action="store_true", help="then print a table per arm")
    args = parser.parse_args()
    table = []
    for arm in args.arms.split(","):
        rows = []
        for split in args.splits.split(","):
            rows.append(run_once(args, arm, split))
            print(json.dumps(rows[-1]), flush=True)
        good = [r for r in rows if "error" not in r]
        if good:
            print(json.dumps({"summary": summarize_arm(good)}), flush=True)
            table.append(markdown_row(summarize_arm(good), good))
    if args.markdown:
        print("\n".join(table))


if __name__ == "__main__":
    main()
