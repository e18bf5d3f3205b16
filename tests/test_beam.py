"""retrain-beam-extract: a Beam pipeline on the DirectRunner fills the cache retrain reads."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from retrain.cli import beam_extract
from retrain.cli import retrain as cli
from retrain.cli.flags import FLAG_FIELDS  # noqa: E402
from retrain.config import leaf_fields  # noqa: E402
from tests.conftest import EXAMPLE_DIR, retrain_args  # noqa: E402

CLASSES = ("daisy", "roses")
PER_CLASS = 4


def beam_args(image_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        beam_extract.PROG,
        f"--image_dir={image_dir}",
        f"--bottleneck_dir={out / 'bottlenecks'}",
        f"--summary_json={out / 'summary.json'}",
        "--extraction_batch_size=4",
        "--runner=DirectRunner",
        *extra,
    ]


def open_cache(out: Path):
    """The module's folder in out/bottlenecks, as retrain opens it, and the module."""
    from retrain.bottlenecks.cache import BottleneckCache, module_cache_key
    from retrain.data.preprocess import PREPROCESSING_ID
    from retrain.models.loading import resolve_module

    module = resolve_module("efficientnet_lite0")
    key = module_cache_key(module.fingerprint, PREPROCESSING_ID)
    return BottleneckCache(out / "bottlenecks", key, module.feature_dim), module


@dataclass
class Extracted:
    out: Path
    image_dir: Path
    paths: list[Path]
    status: int
    summary: dict
    temp_leftovers: list[str]  # what the run left in its temporary folder


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """2 classes x 4 example photos plus a broken file, through the pipeline once."""
    out = tmp_path_factory.mktemp("beam")
    image_dir = out / "photos"
    for name in CLASSES:
        (image_dir / name).mkdir(parents=True)
        for photo in sorted((EXAMPLE_DIR / name).glob("*.jpg"))[:PER_CLASS]:
            shutil.copy(photo, image_dir / name / photo.name)
    (image_dir / "roses" / "broken.jpg").write_bytes(b"this is not a JPEG")
    scratch = out / "tmp"
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(scratch))
        status = beam_extract.main(beam_args(image_dir, out))
    summary = json.loads((out / "summary.json").read_text())
    paths = sorted(p for p in image_dir.rglob("*.jpg"))
    leftovers = sorted(p.name for p in scratch.iterdir())
    return Extracted(out, image_dir, paths, status, summary, leftovers)


def test_pipeline_summary(extracted):
    status, summary = extracted.status, extracted.summary
    assert status == 0
    assert summary["images"] == len(CLASSES) * PER_CLASS + 1
    assert (summary["computed"], summary["cached"], summary["failed"]) == (8, 0, 1)
    assert "copies" not in summary  # only with --distorted_copies


def test_direct_runner_runs_locally_and_leaves_no_temporary_files(extracted):
    """The DirectRunner goes straight to the FnApiRunner: Beam's own DirectRunner would first
    try to download Prism from GitHub and leave temporary folders behind."""
    assert extracted.status == 0 and extracted.temp_leftovers == []


@pytest.mark.parametrize(
    ("runner", "runs_on"),
    [
        (None, "FnApiRunner"),
        ("DirectRunner", "FnApiRunner"),
        ("direct", "FnApiRunner"),
        ("apache_beam.runners.direct.direct_runner.DirectRunner", "FnApiRunner"),
        ("PrismRunner", "PrismRunner"),
        ("DataflowRunner", "DataflowRunner"),
    ],
)
def test_which_runner_runs(runner, runs_on):
    from apache_beam.options.pipeline_options import StandardOptions

    flags = [] if runner is None else [f"--runner={runner}"]
    options = beam_extract.pipeline_options(flags, beam_extract.argument_parser())
    assert options.view_as(StandardOptions).runner == runs_on


def test_cache_holds_retrains_vectors(extracted):
    """Every good photo is in the cache, passes its CRC, and equals retrain's own vector."""
    from retrain.bottlenecks import backends, extract
    from retrain.bottlenecks.cache import BottleneckCache

    out, paths = extracted.out, extracted.paths
    cache, module = open_cache(out)
    found = extract.lookup(paths, cache)
    broken = [i for i, p in enumerate(paths) if p.name == "broken.jpg"]
    good = [i for i in range(len(paths)) if i not in broken]
    assert found.missing() == broken  # what retrain would still try: only the broken file
    extract.verify(found, cache, paths)
    assert not cache.warnings and found.missing() == broken  # every CRC passed
    vectors, ok = cache.read(found.locations[good])
    assert ok.all()

    reference = BottleneckCache(out / "reference", cache.folder.name, module.feature_dim)
    mine = extract.lookup(paths, reference)
    extractor = backends.tensorflow_backend(module.load())
    stats = extract.extract_missing(
        paths, mine, reference, extractor, extract.DecodedBatches(module.input_size)
    )
    assert stats.computed == len(good) and list(mine.skipped) == broken
    expected, ok = reference.read(mine.locations[good])
    assert ok.all()
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-4)
    assert np.abs(vectors).sum(axis=1).min() > 0


def test_retrain_computes_nothing(extracted, tmp_path):
    out, image_dir = extracted.out, extracted.image_dir
    status = cli.main(
        [
            "retrain",
            f"--image_dir={image_dir}",
            f"--bottleneck_dir={out / 'bottlenecks'}",
            f"--summaries_dir={tmp_path / 'logs'}",
            f"--output_graph={tmp_path / 'graph.pb'}",
            f"--output_labels={tmp_path / 'labels.txt'}",
            f"--metrics_json={tmp_path / 'metrics.json'}",
            "--how_many_training_steps=10",
            "--validation_percentage=0",
            "--testing_percentage=0",
        ]
    )
    assert status == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bottlenecks_computed"] == 0
    assert [Path(s["file"]).name for s in metrics["skipped"]] == ["broken.jpg"]


def test_second_run_finds_everything_cached(extracted):
    out, image_dir = extracted.out, extracted.image_dir
    assert beam_extract.main(beam_args(image_dir, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    # The broken file is tried again (the cache stores vectors only) and skipped again.
    assert (summary["computed"], summary["cached"], summary["failed"]) == (0, 8, 1)


def test_found_by_content_when_paths_differ(extracted, tmp_path):
    """A copy of the photos elsewhere (as on a worker with another mount point) is cached."""
    out, image_dir = extracted.out, extracted.image_dir
    moved = tmp_path / "moved"
    shutil.copytree(image_dir, moved)
    (moved / "roses" / "broken.jpg").unlink()
    assert beam_extract.main(beam_args(moved, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["computed"], summary["cached"], summary["failed"]) == (0, 8, 0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--extraction_batch_size=0"], "--extraction_batch_size must be positive"),
        (["--extraction_batch_size=x"], "invalid int value"),
        (["--bottleneckdir=/tmp/x"], "unknown flag --bottleneckdir; did you mean --bottleneck_dir"),
        (["--direct_num_worker=2"], "did you mean --direct_num_workers"),
        (["--direct_running_mode=bogus"], "invalid choice: 'bogus'"),
        (["--runner=NoSuchRunner"], "Unexpected pipeline runner: NoSuchRunner"),
        (["--extraction_backend=gpu"], "invalid choice: 'gpu'"),
        (["--bottleneck_dir=gs://bucket/cache"], "--bottleneck_dir: gs://bucket/cache is a URL"),
        (["--module_cache_dir=s3://bucket/models"], "--module_cache_dir: s3://bucket/models is"),
        (["--shard_rows=0"], "--shard_rows must be positive, got 0"),
        (["--num_threads=-1"], "--num_threads must be 0 (all CPUs) or positive, got -1"),
        (["--summary_json=/proc/version/s.json"], "--summary_json: cannot write there"),
        (["--tfhub_module=no_such_model"], "--tfhub_module: unknown module 'no_such_model'"),
        (["stray"], "unexpected argument 'stray'"),
        (["--flip_left_right=maybe"], "argument --flip_left_right: expected true or false"),
        (["--distorted_copies=two"], "argument --distorted_copies: invalid int value: 'two'"),
        (["--random_scale=1.5"], "argument --random_scale: invalid int value: '1.5'"),
        (["--testing_percentage="], "argument --testing_percentage: invalid int value: ''"),
        (["--random_cropp=10"], "unknown flag --random_cropp; did you mean --random_crop"),
    ],
)
def test_bad_flags(tmp_path, capsys, extra, message):
    (tmp_path / "a").mkdir()
    status = beam_extract.main(beam_args(tmp_path, tmp_path, *extra))
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"{beam_extract.PROG}: error: ")
    assert message in err


def test_missing_image_dir(capsys):
    assert beam_extract.main([beam_extract.PROG]) == 2
    assert "--image_dir is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad",
    [
        "--image_dir=",
        "--image_dir=/no/such/folder",
        "--extraction_batch_size=0",
        "--max_image_pixels=-1",
        "--tfhub_module=",
        "--tfhub_module=no_such_model",
        "--tfhub_module=./no/such/dir",
        "--bottleneck_dir=/proc/version",
        "--module_cache_dir=/proc/version",
        "--testing_percentage=100",
        "--validation_percentage=-1",
        "--random_crop=101",
        "--random_scale=-5",
        "--random_brightness=150",
        "--distorted_copies=-1",
        "--distorted_copies=3",  # without a distortion
    ],
)
def test_a_bad_common_flag_gives_retrains_line(tmp_path, capsys, bad):
    """The flags shared with `retrain` are checked by the same code: the same line, exit 2."""
    (tmp_path / "photos" / "a").mkdir(parents=True)
    image_dir = tmp_path / "photos"
    assert cli.main(retrain_args(image_dir, tmp_path / "retrain", bad)) == 2
    retrains = capsys.readouterr().err.strip().removeprefix("retrain: error: ")
    assert beam_extract.main(beam_args(image_dir, tmp_path / "beam", bad)) == 2
    beams = capsys.readouterr().err.strip().removeprefix(f"{beam_extract.PROG}: error: ")
    assert beams == retrains
    assert len(beams.splitlines()) == 1 and beams.startswith(bad.split("=")[0])


def test_an_unusable_image_dir_is_named_by_its_flag(tmp_path, capsys):
    """Errors raised while running name the flag too, as `retrain` does."""
    (tmp_path / "photos" / "a").mkdir(parents=True)
    assert beam_extract.main(beam_args(tmp_path / "photos", tmp_path)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    photos = tmp_path / "photos"
    assert last.startswith(f"{beam_extract.PROG}: error: --image_dir: no images found in {photos}")


def test_common_flags_fill_the_settings_retrain_maps_them_to(tmp_path):
    values = {
        "image_dir": str(tmp_path),
        "bottleneck_dir": str(tmp_path / "b"),
        "tfhub_module": "some_module",
        "module_cache_dir": str(tmp_path / "m"),
        "extraction_backend": "tflite",
        "extraction_batch_size": 7,
        "max_image_pixels": 1234,
        "testing_percentage": 15,
        "validation_percentage": 5,
        "flip_left_right": True,
        "random_crop": 10,
        "random_scale": 20,
        "random_brightness": 30,
        "distorted_copies": 4,
    }
    argv = [f"--{name}={value}" for name, value in values.items()]
    args, _ = beam_extract.argument_parser().parse_known_args(argv)
    config, _ = beam_extract.settings_from_args(args)
    settings = dict(leaf_fields(config))
    assert {name: settings[FLAG_FIELDS[name]] for name in values} == values


@pytest.mark.parametrize(
    ("argv", "value"),
    [([], False), (["--flip_left_right"], True), (["--flip_left_right=false"], False)],
)
def test_boolean_flags_read_as_retrains(argv, value):
    args, _ = beam_extract.argument_parser().parse_known_args([*argv, "--noflip_left_right"])
    assert args.flip_left_right is False  # the last one wins, as with absl
    args, _ = beam_extract.argument_parser().parse_known_args(argv)
    assert args.flip_left_right is value


def test_new_flags_take_retrains_defaults_and_help():
    from absl import flags

    from retrain.cli.flags import define_flags, flag_named

    defined = flags.FlagValues()
    define_flags(defined)
    parser = beam_extract.argument_parser()
    actions = {flag: a for a in parser._actions for flag in a.option_strings}
    for name in beam_extract.RETRAIN_FLAGS:
        action = actions[f"--{name}"]
        assert action.default == defined[name].default
        assert action.help.startswith(flag_named(name).help)
        assert action.help == beam_extract.retrain_flag_help(name)


def test_distortion_flags_cache_the_copies_retrain_uses(tmp_path):
    """The command with retrain's split and distortion flags caches the distorted copies of
    the training images: `retrain` with the same flags computes nothing (the small generated
    module, as the library's test; tests/test_beam_pipeline.py also compares the vectors)."""
    from tests.fault_tools import save_tiny_module

    save_tiny_module(tmp_path / "module")
    image_dir = tmp_path / "photos"
    for name in CLASSES:
        shutil.copytree(EXAMPLE_DIR / name, image_dir / name)
    shared = [
        f"--tfhub_module={tmp_path / 'module'}",
        "--extraction_backend=tensorflow",
        "--testing_percentage=20",
        "--validation_percentage=20",
        "--flip_left_right",
        "--random_crop=10",
        "--random_brightness=20",
        "--distorted_copies=2",
    ]
    assert beam_extract.main(beam_args(image_dir, tmp_path, *shared)) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    copies = summary["copies"]
    assert copies["per_image"] == 2 and copies["cached"] == copies["failed"] == 0
    assert 0 < copies["computed"] == copies["total"] < 2 * summary["images"]  # training only

    assert cli.main(retrain_args(image_dir, tmp_path, *shared, steps=5)) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bottlenecks_computed"] == 0
    assert metrics["distortions"]["computed"] == 0
    assert metrics["distortions"]["reused"] == copies["total"]


@pytest.mark.slow
def test_multi_processing_two_workers(tmp_path):
    """Two worker processes, each with its own model and shards, fill one cache."""
    out = tmp_path
    image_dir = out / "photos"
    for name in CLASSES:
        shutil.copytree(EXAMPLE_DIR / name, image_dir / name)
    extra = ["--direct_num_workers=2", "--direct_running_mode=multi_processing", "--num_threads=1"]
    assert beam_extract.main(beam_args(image_dir, out, *extra)) == 0
    summary = json.loads((out / "summary.json").read_text())
    total = sum(1 for _ in image_dir.rglob("*.jpg"))
    assert (summary["computed"], summary["failed"]) == (total, 0)
    cache, _ = open_cache(out)
    assert len(cache) == total
