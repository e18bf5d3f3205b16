"""Fault injection: real `retrain` processes killed, interrupted, run side by side, fed bad caches.

Every scenario runs `python -m retrain` on a copy of the bundled example photos and compares
against one uninterrupted reference run with the same flags (same seed, so training is
deterministic). Kill moments are random within each phase: while caching, at a random count of
the progress bar (the child runs on a pseudo-terminal); while training or exporting, a random
delay after a log line, scaled by how long that phase took in the reference run. Set
RETRAIN_FAULT_SEED to replay a session's choices (the seed is printed with each scenario).

Covered: SIGKILL during caching / training / export, then restart (`--resume`) with identical
results; SIGINT (exit 130, one line, finished bottlenecks kept); concurrent runs on one
--bottleneck_dir (same module and another module); damaged cache shards and rows; changed
images; and, below the command, cache and output writers killed at random moments.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from retrain.bottlenecks.cache import file_content_key
from tests.conftest import EXAMPLE_DIR
from tests.fault_tools import (
    ATOMIC_WRITER_CHILD,
    SHARD_WRITER_CHILD,
    Fault,
    atomic_payloads,
    copy_cache_resharded,
    decode_row_key,
    flip_byte_in_row,
    graph_scores,
    inspect_cache,
    kill_after,
    load_test_images,
    module_features,
    module_folders,
    phase_window,
    progress_at_least,
    read_metrics,
    run_retrain,
    save_tiny_module,
    shard_row,
    start_python,
    start_retrain,
    unexpected_files,
    vector_mismatches,
    watch,
)

STEPS = 1500
CHECKPOINT_EVERY = 500  # retrain.config.HeadTrainingConfig.checkpoint_every
N_IMAGES = 79
OUTPUTS = {"graph.pb", "labels.txt", "metrics.json"}

CACHING_END = r"^I Computed \d+ bottlenecks"
EXPORT_BEGIN = r"^I Final test accuracy"
EXPORT_END = r"^I Saved the frozen graph"
CACHE_WARNING = r"^W .*bottleneck cache"

SEED = int(os.environ.get("RETRAIN_FAULT_SEED", time.time_ns() % 2**31))


# tqdm redraws its bar at most every 0.1 s: on a fast pass that can skip from a few images to
# the last, so a trigger on the bar's count would fire after caching ended. Redraw every batch.
EVERY_BATCH = {"TQDM_MININTERVAL": "0"}


def rng_for(name: str) -> random.Random:
    """A random stream per scenario, reproducible with RETRAIN_FAULT_SEED."""
    print(f"{name}: RETRAIN_FAULT_SEED={SEED}")
    return random.Random(f"{SEED}-{name}")


def retrain_args(photos: Path, out: Path, bottlenecks: Path, *extra: str) -> list[str]:
    """The flags every run shares: small, deterministic, checkpointed every 500 steps, and
    evaluated (with summaries) every step, so that training lasts long enough to be interrupted
    between two checkpoints."""
    return [
        f"--image_dir={photos}",
        f"--bottleneck_dir={bottlenecks}",
        f"--summaries_dir={out / 'logs'}",
        f"--output_graph={out / 'graph.pb'}",
        f"--output_labels={out / 'labels.txt'}",
        f"--metrics_json={out / 'metrics.json'}",
        f"--checkpoint_path={out / 'checkpoints'}",
        f"--how_many_training_steps={STEPS}",
        "--eval_step_interval=1",
        "--extraction_batch_size=4",
        "--random_seed=7",
        *extra,
    ]


def the_module_folder(bottlenecks: Path) -> Path:
    (folder,) = module_folders(bottlenecks)
    return folder


def final_step_values(run) -> tuple[float, float, float]:
    """(train accuracy %, cross-entropy, validation accuracy %) logged at the last step."""
    values = []
    for what in ("Train accuracy", "Cross entropy", "Validation accuracy"):
        match = run.search(rf"^I Step {STEPS}: {what} = ([0-9.]+)")
        assert match, f"no '{what}' line for step {STEPS}:\n{run.summary()}"
        values.append(float(match.group(1)))
    return tuple(values)


def cached_count(run) -> tuple[int, int]:
    """(cached, to compute) from the run's lookup line."""
    match = run.search(r"^I (\d+) images: (\d+) bottlenecks cached, (\d+) to compute")
    assert match, run.summary()
    assert int(match.group(1)) == N_IMAGES
    return int(match.group(2)), int(match.group(3))


def assert_scores_match(scores: np.ndarray, reference_scores: np.ndarray) -> None:
    # Equal up to float noise (cached vectors may come from TFLite or TensorFlow, within 1e-4).
    np.testing.assert_allclose(scores, reference_scores, rtol=1e-3, atol=1e-4)


def assert_clean_interrupt(run) -> None:
    """Exit 130, no traceback, and one 'retrain: interrupted' line as the last word."""
    assert run.returncode == 130, run.summary()
    assert "Traceback" not in run.stderr, run.summary()
    interrupted = run.matching(r"^retrain: interrupted")
    assert len(interrupted) == 1 and run.lines[-1] == interrupted[0], run.summary()


# ----------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """One read-only copy of the example photos, shared by the scenarios that do not edit it."""
    target = tmp_path_factory.mktemp("photos") / "flower_photos"
    shutil.copytree(EXAMPLE_DIR, target)
    return target


@pytest.fixture(scope="module")
def images(photos) -> np.ndarray:
    """A few photos, one per class, ready for the frozen graph."""
    classes = sorted(d for d in photos.iterdir() if d.is_dir())
    return load_test_images([sorted(d.glob("*.jpg"))[0] for d in classes])


@pytest.fixture(scope="module")
def reference(photos, images, tmp_path_factory):
    """The uninterrupted run every scenario is compared with."""
    out = tmp_path_factory.mktemp("reference")
    run = run_retrain(retrain_args(photos, out, out / "bottlenecks"))
    assert run.returncode == 0, run.summary()
    folder = the_module_folder(out / "bottlenecks")
    cache = inspect_cache(folder)
    assert not cache.warnings and cache.bad_rows == 0 and len(cache.vectors) == N_IMAGES
    metrics = read_metrics(out / "metrics.json")
    assert metrics["bottlenecks_computed"] == N_IMAGES
    return SimpleNamespace(
        out=out,
        run=run,
        metrics=metrics,
        labels=(out / "labels.txt").read_text(),
        scores=graph_scores(out / "graph.pb", images),
        cache_folder=folder,
        vectors=cache.vectors,
        checkpoint_seconds=phase_window(
            run,
            rf"^I Step {2 * CHECKPOINT_EVERY}: Validation",
            rf"^I Step {2 * CHECKPOINT_EVERY + 1}: ",
        ),
        export_seconds=phase_window(run, EXPORT_BEGIN, EXPORT_END),
    )


# ----------------------------------------------------------------------------- SIGKILL + restart


@pytest.fixture(scope="module")
def killed_chain(reference, photos, images, tmp_path_factory):
    """The same command (with --resume) run four times: killed at a random moment while
    caching, while training (after the first checkpoint), while exporting, then left to finish.
    What each kill left behind is recorded right away; the tests below judge it."""
    rng = rng_for("killed_chain")
    out = tmp_path_factory.mktemp("chain")
    bottlenecks = out / "bottlenecks"
    args = retrain_args(photos, out, bottlenecks, "--resume")
    chain = SimpleNamespace(out=out)

    # On a terminal retrain shows a progress bar: kill when it passes a random count.
    fault = Fault(progress_at_least(rng.randrange(4, N_IMAGES - 8)), signal.SIGKILL)
    run = run_retrain(args, fault, tty=True, env=EVERY_BATCH)
    chain.caching = SimpleNamespace(
        run=run,
        cache=inspect_cache(the_module_folder(bottlenecks)),
        files=unexpected_files(out, set()),
        outputs=sorted(name for name in OUTPUTS if (out / name).exists()),
    )

    # Training logs in bursts of up to 500 steps (one graph call each), then checkpoints: kill
    # at a random moment between the step-1000 lines and the next burst (saving checkpoint 1000
    # or computing steps 1001-1500), so the run resumes from checkpoint 500 or 1000.
    fault = Fault(
        rf"^I Step {2 * CHECKPOINT_EVERY}: Validation accuracy",
        signal.SIGKILL,
        rng.uniform(0.0, 0.5) * reference.checkpoint_seconds,
    )
    run = run_retrain(args, fault)
    checkpoint_state = out / "checkpoints" / "checkpoint"
    chain.training = SimpleNamespace(
        run=run,
        cache=inspect_cache(the_module_folder(bottlenecks)),
        checkpoint=checkpoint_state.read_text() if checkpoint_state.exists() else "",
        files=unexpected_files(out, set()),
        outputs=sorted(name for name in OUTPUTS if (out / name).exists()),
    )

    # Outputs of an earlier run, which the killed export must leave whole or replace whole.
    (out / "graph.pb").write_bytes(b"previous graph\n")
    (out / "labels.txt").write_text("previous labels\n")
    # The first (reference) run exports slower than later ones: kill early in its window.
    fault = Fault(EXPORT_BEGIN, signal.SIGKILL, rng.uniform(0.0, 0.25) * reference.export_seconds)
    run = run_retrain(args, fault)
    graph = (out / "graph.pb").read_bytes()
    if graph == b"previous graph\n":
        graph_state = "previous"
    else:
        try:
            graph_state = graph_scores(out / "graph.pb", images)
        except Exception as err:  # noqa: BLE001 - recorded, asserted on below
            graph_state = f"unreadable ({len(graph)} bytes): {err}"
    chain.export = SimpleNamespace(
        run=run,
        graph=graph_state,
        labels=(out / "labels.txt").read_text(),
        files=unexpected_files(out, OUTPUTS),
    )

    run = run_retrain(args)
    chain.final = SimpleNamespace(
        run=run,
        metrics=read_metrics(out / "metrics.json") if run.returncode == 0 else None,
        labels=(out / "labels.txt").read_text(),
        scores=graph_scores(out / "graph.pb", images) if run.returncode == 0 else None,
        cache=inspect_cache(the_module_folder(bottlenecks)),
        files=unexpected_files(out, OUTPUTS),
    )
    return chain


def test_a_piped_run_logs_step_lines_and_draws_no_progress_bar(reference):
    assert reference.run.search(r"^I Step \d+: Train accuracy = "), reference.run.summary()
    assert "Training:" not in reference.run.stderr


def test_sigkill_while_caching_leaves_only_valid_entries(killed_chain, reference):
    step = killed_chain.caching
    assert step.run.returncode == -signal.SIGKILL, step.run.summary()
    assert step.run.time_of(CACHING_END) is None, "killed too late: caching had finished"
    cache = step.cache
    assert not cache.warnings and cache.bad_rows == 0 and not cache.strays, cache.describe()
    # Unflushed rows are lost by design; every row that did reach the disk is the right vector.
    assert vector_mismatches(cache, reference.vectors) == []
    assert step.files == [] and step.outputs == []


def test_restart_after_a_kill_computes_only_what_is_missing(killed_chain, reference):
    kept = len(killed_chain.caching.cache.vectors)
    run = killed_chain.training.run
    assert cached_count(run) == (kept, N_IMAGES - kept)
    cache = killed_chain.training.cache
    assert not cache.warnings and cache.bad_rows == 0, cache.describe()
    assert set(cache.vectors) == set(reference.vectors)
    assert vector_mismatches(cache, reference.vectors) == []


def saved_step(checkpoint_state: str) -> int | None:
    match = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', checkpoint_state)
    return int(match.group(1)) if match else None


def test_sigkill_while_training_keeps_the_last_checkpoint(killed_chain):
    step = killed_chain.training
    assert step.run.returncode == -signal.SIGKILL, step.run.summary()
    assert step.run.time_of(rf"^I Step {STEPS}: ") is None, "killed too late: training had ended"
    # Checkpoint 1000 if the kill came after its save, else 500; never a broken one.
    saved = saved_step(step.checkpoint)
    assert saved in (CHECKPOINT_EVERY, 2 * CHECKPOINT_EVERY), step.checkpoint
    assert step.files == [] and step.outputs == []


def test_resumed_training_ends_where_the_uninterrupted_run_ends(killed_chain, reference):
    run = killed_chain.export.run
    saved = saved_step(killed_chain.training.checkpoint)
    assert run.search(rf"^I Resumed training from step {saved}\b"), run.summary()
    assert run.time_of(rf"^I Step {saved}: ") is None, "steps before the checkpoint were rerun"
    assert run.time_of(rf"^I Step {saved + 1}: ") is not None, run.summary()
    resumed = final_step_values(run)
    expected = final_step_values(reference.run)
    assert resumed[0] == expected[0] and resumed[2] == expected[2]
    assert resumed[1] == pytest.approx(expected[1], abs=1e-5)
    assert run.matching(EXPORT_BEGIN) == reference.run.matching(EXPORT_BEGIN)


def test_sigkill_while_exporting_leaves_no_half_written_output(killed_chain, reference):
    step = killed_chain.export
    assert step.run.returncode == -signal.SIGKILL, step.run.summary()
    assert step.run.time_of(EXPORT_END) is None, "killed too late: export had finished"
    if isinstance(step.graph, str):
        assert step.graph == "previous", step.graph
    else:  # the new graph was already in place: then it is whole
        assert_scores_match(step.graph, reference.scores)
    assert step.labels in ("previous labels\n", reference.labels)
    assert step.files == [], "files that could be mistaken for outputs"


def test_rerun_after_kills_matches_the_uninterrupted_run(killed_chain, reference):
    final = killed_chain.final
    assert final.run.returncode == 0, final.run.summary()
    metrics = final.metrics
    assert metrics["bottlenecks_computed"] == 0  # every finished entry reused
    assert metrics["resumed_from_step"] == STEPS  # the export kill came after the last save
    assert metrics["test_accuracy"] == reference.metrics["test_accuracy"]
    assert metrics["test_cross_entropy"] == pytest.approx(
        reference.metrics["test_cross_entropy"], rel=1e-4
    )
    assert metrics["per_class_test_accuracy"] == reference.metrics["per_class_test_accuracy"]
    assert final.labels == reference.labels
    assert_scores_match(final.scores, reference.scores)
    assert not final.cache.warnings and final.cache.bad_rows == 0
    assert len(final.cache.vectors) == N_IMAGES
    assert final.files == []


def test_resume_after_finished_training_still_reports_training_metrics(killed_chain, reference):
    metrics = killed_chain.final.metrics
    assert metrics["final_train_accuracy"] == reference.metrics["final_train_accuracy"]
    assert metrics["final_validation_accuracy"] == reference.metrics["final_validation_accuracy"]


def test_resume_from_an_incompatible_checkpoint_is_a_clear_error(reference, tmp_path):
    photos4 = tmp_path / "four_classes"
    for name in ("daisy", "dandelion", "roses", "sunflowers"):
        shutil.copytree(EXAMPLE_DIR / name, photos4 / name)
    shutil.copytree(reference.out / "checkpoints", tmp_path / "checkpoints")
    shutil.copytree(reference.out / "bottlenecks", tmp_path / "bottlenecks")
    run = run_retrain(retrain_args(photos4, tmp_path, tmp_path / "bottlenecks", "--resume"))
    assert run.returncode in (1, 2), run.summary()
    assert "Traceback" not in run.stderr, run.summary()
    assert run.lines[-1].startswith("retrain: error:") and "checkpoint" in run.lines[-1]


# ----------------------------------------------------------------------------- SIGINT


@pytest.fixture(scope="module")
def interrupted(reference, photos, tmp_path_factory):
    """Ctrl-C at a random moment while caching, then (same command) at a random step."""
    rng = rng_for("interrupted")
    out = tmp_path_factory.mktemp("sigint")
    bottlenecks = out / "bottlenecks"
    args = retrain_args(photos, out, bottlenecks)
    # The bar redraws at every batch of 4 (EVERY_BATCH), and 32 images are left after the
    # trigger, so the signal cannot land after the last batch ("interrupted too late").
    at_least = rng.randrange(8, N_IMAGES - 32)
    caching = run_retrain(
        args, Fault(progress_at_least(at_least), signal.SIGINT), tty=True, env=EVERY_BATCH
    )
    kept = inspect_cache(the_module_folder(bottlenecks))
    # Training logs its steps in bursts, one per graph call: interrupt after the first burst.
    fault = Fault(rf"^I Step {CHECKPOINT_EVERY}: Validation accuracy", signal.SIGINT)
    training = run_retrain(args, fault)
    return SimpleNamespace(
        caching=caching,
        at_least=at_least,
        kept=kept,
        training=training,
        after=inspect_cache(the_module_folder(bottlenecks)),
        outputs=sorted(name for name in OUTPUTS if (out / name).exists()),
    )


def test_sigint_while_caching_exits_130_and_keeps_finished_bottlenecks(interrupted, reference):
    assert_clean_interrupt(interrupted.caching)
    assert interrupted.caching.time_of(CACHING_END) is None, "interrupted too late"
    kept = interrupted.kept
    assert not kept.warnings and kept.bad_rows == 0 and not kept.strays, kept.describe()
    # What was computed before Ctrl-C was flushed on the way out.
    assert interrupted.at_least <= len(kept.vectors) < N_IMAGES, kept.describe()
    assert vector_mismatches(kept, reference.vectors) == []
    # The next run starts from them.
    assert cached_count(interrupted.training) == (len(kept.vectors), N_IMAGES - len(kept.vectors))


def test_sigint_while_training_exits_130_and_writes_no_outputs(interrupted, reference):
    run = interrupted.training
    assert_clean_interrupt(run)
    assert run.time_of(rf"^I Step {STEPS}: ") is None, "interrupted too late"
    assert interrupted.outputs == []
    after = interrupted.after
    assert not after.warnings and after.bad_rows == 0 and len(after.vectors) == N_IMAGES
    assert vector_mismatches(after, reference.vectors) == []


def test_sigint_during_startup_prints_only_the_interrupted_line(photos, tmp_path):
    # 1.5 s after start retrain is importing TensorFlow, whose C++ start-up chatter goes to a
    # capture file: none of it may reach the terminal. (Should the import be done already,
    # retrain's own log lines may precede the 'interrupted' line.)
    run = run_retrain(
        retrain_args(photos, tmp_path, tmp_path / "bottlenecks"),
        Fault(None, signal.SIGINT, 1.5),
    )
    assert_clean_interrupt(run)
    foreign = [line for line in run.lines[:-1] if not re.match(r"^[DIWEF] ", line)]
    assert foreign == [], run.summary()


# ----------------------------------------------------------------------------- concurrency


@pytest.fixture(scope="module")
def concurrent(reference, photos, images, tmp_path_factory):
    """Three runs started together on one --bottleneck_dir: two with the bundled module
    (different outputs), one with another module (a small SavedModel folder)."""
    root = tmp_path_factory.mktemp("concurrent")
    shared = root / "shared_bottlenecks"
    tiny = root / "tiny_module"
    save_tiny_module(tiny)
    outs = [root / name for name in ("first", "second", "other_module")]
    jobs = []
    for out in outs:
        out.mkdir()
        if out.name == "other_module":
            # Its TFLite conversion goes to a private cache, not the user's.
            args = retrain_args(photos, out, shared, f"--tfhub_module={tiny}")
            jobs.append(start_retrain(args, env={"RETRAIN_CACHE_DIR": str(root / "cache")}))
        else:
            jobs.append(start_retrain(retrain_args(photos, out, shared)))
    with ThreadPoolExecutor(len(jobs)) as pool:
        runs = list(pool.map(watch, jobs))
    return SimpleNamespace(root=root, shared=shared, tiny=tiny, outs=outs, runs=runs)


def test_concurrent_runs_of_one_module_both_match_the_reference(concurrent, reference, images):
    for out, run in zip(concurrent.outs[:2], concurrent.runs[:2]):
        assert run.returncode == 0, run.summary()
        assert not run.matching(CACHE_WARNING), run.summary()
        metrics = read_metrics(out / "metrics.json")
        for key in ("test_accuracy", "final_train_accuracy", "per_class_test_accuracy"):
            assert metrics[key] == reference.metrics[key], key
        assert (out / "labels.txt").read_text() == reference.labels
        assert_scores_match(graph_scores(out / "graph.pb", images), reference.scores)


def test_concurrent_run_of_another_module_finishes(concurrent, reference):
    run = concurrent.runs[2]
    assert run.returncode == 0, run.summary()
    assert not run.matching(CACHE_WARNING), run.summary()
    metrics = read_metrics(concurrent.outs[2] / "metrics.json")
    assert metrics["module"] == str(concurrent.tiny)
    assert metrics["classes"] == reference.metrics["classes"]
    assert metrics["images"] == reference.metrics["images"]


def test_concurrent_runs_leave_an_uncorrupted_cache(concurrent, reference, photos):
    folders = module_folders(concurrent.shared)
    assert len(folders) == 2, folders  # one per module, never mixed
    by_name = {f.name: f for f in folders}
    bundled = inspect_cache(by_name.pop(reference.cache_folder.name))
    assert not bundled.warnings and bundled.bad_rows == 0 and not bundled.strays
    assert set(bundled.vectors) == set(reference.vectors)
    assert vector_mismatches(bundled, reference.vectors) == []
    (other_folder,) = by_name.values()
    other = inspect_cache(other_folder)
    assert not other.warnings and other.bad_rows == 0 and not other.strays, other.describe()
    expected = module_features(concurrent.tiny, sorted(photos.rglob("*.jpg")))
    assert set(other.vectors) == set(expected)
    assert vector_mismatches(other, expected, atol=1e-6) == []


# ----------------------------------------------------------------------------- cache integrity


@pytest.fixture(scope="module")
def damaged(reference, photos, images, tmp_path_factory):
    """The reference vectors re-stored as 10-row shards, three of them then damaged: a vector
    file cut short, an index file cut short, one byte flipped in one stored vector. Then two
    runs of the same command."""
    out = tmp_path_factory.mktemp("damaged")
    bottlenecks = out / "bottlenecks"
    index_files = copy_cache_resharded(reference.cache_folder, bottlenecks, shard_rows=10)
    assert len(index_files) == 8
    lost = len(np.load(index_files[1])) + len(np.load(index_files[2])) + 1
    vec_file = index_files[1].with_name(index_files[1].name.replace(".idx.", ".vec."))
    vec_file.write_bytes(vec_file.read_bytes()[:-100])
    index_files[2].write_bytes(index_files[2].read_bytes()[:-7])
    flipped_row = 3
    flip_byte_in_row(index_files[4], flipped_row)
    flipped_key = bytes(np.load(index_files[4])["content"][flipped_row])
    by_key = {file_content_key(p): p for p in photos.rglob("*.jpg")}
    args = retrain_args(photos, out, bottlenecks)
    first = run_retrain(args)
    first_metrics = read_metrics(out / "metrics.json") if first.returncode == 0 else None
    scores = graph_scores(out / "graph.pb", images) if first.returncode == 0 else None
    second = run_retrain(args)
    return SimpleNamespace(
        lost=lost,
        first=first,
        first_metrics=first_metrics,
        scores=scores,
        flipped_image=by_key[flipped_key],
        second=second,
        second_metrics=read_metrics(out / "metrics.json") if second.returncode == 0 else None,
    )


def test_damaged_cache_entries_are_recomputed_with_a_warning(damaged, reference):
    run = damaged.first
    assert run.returncode == 0, run.summary()
    shard_warnings = run.matching(r"^W bottleneck cache: ignoring damaged shard")
    row_warnings = run.matching(r"^W bottleneck cache: the entry for .* failed its checksum")
    assert len(shard_warnings) == 2, run.summary()
    assert len(row_warnings) == 1 and damaged.flipped_image.name in row_warnings[0]
    metrics = damaged.first_metrics
    assert metrics["bottlenecks_computed"] == damaged.lost  # two shards and one row
    assert metrics["test_accuracy"] == reference.metrics["test_accuracy"]
    assert metrics["final_train_accuracy"] == reference.metrics["final_train_accuracy"]
    assert_scores_match(damaged.scores, reference.scores)


def test_recomputed_entry_is_used_by_the_next_run(damaged):
    run = damaged.second
    assert run.returncode == 0, run.summary()
    assert damaged.second_metrics["bottlenecks_computed"] == 0
    assert not run.matching(CACHE_WARNING), run.summary()


def test_changed_image_bytes_invalidate_its_entry(reference, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(EXAMPLE_DIR, photos)
    shutil.copytree(reference.out / "bottlenecks", tmp_path / "bottlenecks")
    changed = sorted((photos / "roses").glob("*.jpg"))[0]
    old_key = file_content_key(changed)
    with Image.open(changed) as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, "JPEG", quality=90)
    new_key = file_content_key(changed)
    assert new_key != old_key
    run = run_retrain(retrain_args(photos, tmp_path, tmp_path / "bottlenecks"))
    assert run.returncode == 0, run.summary()
    assert not run.matching(CACHE_WARNING), run.summary()
    assert read_metrics(tmp_path / "metrics.json")["bottlenecks_computed"] == 1
    cache = inspect_cache(the_module_folder(tmp_path / "bottlenecks"))
    assert new_key in cache.vectors and old_key in cache.vectors
    assert not np.allclose(cache.vectors[new_key], cache.vectors[old_key], atol=1e-3)


# ----------------------------------------------------------------------------- the writers


def test_shard_writers_killed_at_random_moments_leave_only_complete_shards(tmp_path):
    """Two writers at a time add 3-row shards to one folder until SIGKILLed at random."""
    rng = rng_for("shard_writers")
    dim = 2048
    rows_before = 0
    for trial in range(5):
        writers = [
            start_python(SHARD_WRITER_CHILD, str(tmp_path), str(prefix), str(dim))
            for prefix in (2 * trial, 2 * trial + 1)
        ]
        for proc in writers:
            assert kill_after(proc, rng.uniform(0.0, 0.3)) == -signal.SIGKILL
        state = inspect_cache(tmp_path / "m", dim)
        assert not state.warnings and state.bad_rows == 0 and not state.strays, state.describe()
        rows: dict[int, set[int]] = {}
        for key, vector in state.vectors.items():
            prefix, i = decode_row_key(key)
            np.testing.assert_array_equal(vector, shard_row(prefix, i, dim)[2])
            rows.setdefault(prefix, set()).add(i)
        for prefix, seen in rows.items():  # whole shards, written in order
            assert seen == set(range(len(seen))) and len(seen) % 3 == 0, (prefix, sorted(seen))
        assert state.rows >= rows_before
        rows_before = state.rows
    assert rows_before > 0


def test_outputs_killed_mid_write_are_old_or_new_never_partial(tmp_path):
    """A writer replacing one file with atomic_write_bytes in a loop, SIGKILLed at random."""
    rng = rng_for("atomic_writes")
    target = tmp_path / "output_graph.pb"
    size = 4 << 20
    payloads = atomic_payloads(size)
    for _ in range(6):
        proc = start_python(ATOMIC_WRITER_CHILD, str(target), str(size))
        assert kill_after(proc, rng.uniform(0.0, 0.3)) == -signal.SIGKILL
        if target.exists():
            assert target.read_bytes() in payloads
        assert unexpected_files(tmp_path, {target.name}) == []
