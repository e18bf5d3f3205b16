"""Data that arrives already split (issue 36, items 1 and 2): train/ val/ test/ folders each
holding the class folders, and a split column in the labels CSV."""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import retrain
from retrain.cli import retrain as cli
from retrain.config import DataConfig, OutputsConfig, RetrainConfig
from retrain.data.labels_csv import find_images, read_labels_csv
from retrain.data.layout import find_split_folders
from retrain.data.scan import SPLITS, scan_image_dir, split_for_file
from retrain.data.stage import scan_images
from retrain.errors import ConfigError
from tests.conftest import EXAMPLE_DIR, retrain_args, write_image
from tests.fault_tools import save_tiny_module


def photos(label: str) -> list[Path]:
    return sorted((EXAMPLE_DIR / label).iterdir())


def presplit(root: Path, layout: dict[str, dict[str, slice]]) -> Path:
    """A folder split as `layout` says: {split folder: {class folder: which of the class's
    example photos}}, the photos copied in."""
    for split_folder, classes in layout.items():
        for label, picks in classes.items():
            (root / split_folder / label).mkdir(parents=True)
            for photo in photos(label.lower())[picks]:
                shutil.copy(photo, root / split_folder / label / photo.name)
    return root


def splits_by_file(image_set) -> dict[str, tuple[str, str]]:
    """{path relative to the image folder: (label, split)}."""
    return {
        os.path.relpath(path, image_set.image_dir): (image_set.label_text(i), image_set.split_of(i))
        for i, path in enumerate(image_set.paths)
    }


def test_split_folders_give_the_split_and_the_union_of_classes(tmp_path, caplog):
    root = presplit(
        tmp_path / "photos",
        {
            "Train": {"daisy": slice(0, 8), "roses": slice(0, 8)},
            "VALIDATION": {"daisy": slice(8, 10), "Roses": slice(8, 10), "tulips": slice(0, 2)},
            "test": {"daisy": slice(10, 12), "roses": slice(10, 12)},
        },
    )
    (root / "Train" / "tulips").mkdir()
    for photo in photos("tulips")[2:8]:
        shutil.copy(photo, root / "Train" / "tulips")
    caplog.set_level(logging.INFO, logger="retrain")
    image_set = scan_images(RetrainConfig(image_dir=str(root)), write_manifest=False)

    assert image_set.labels == ["daisy", "roses", "tulips"]
    folder_split = {"Train": "training", "VALIDATION": "validation", "test": "testing"}
    assert {
        rel: (rel.split(os.sep)[1].lower(), folder_split[rel.split(os.sep)[0]])
        for rel in splits_by_file(image_set)
    } == splits_by_file(image_set)
    assert image_set.split_counts() == {"training": 22, "validation": 6, "testing": 4}
    messages = [r.getMessage() for r in caplog.records]
    assert (
        f"{root} is split into folders: training from Train/, validation from VALIDATION/, "
        "testing from test/" in messages
    )
    assert (
        "class 'tulips' has no testing images (none under test/); its testing accuracy is not "
        "measured" in messages
    )
    assert "Found 3 classes, 32 images (training 22, validation 6, testing 4)" in messages


def test_a_split_without_a_folder_is_taken_from_train_by_the_hash(tmp_path):
    root = presplit(
        tmp_path / "photos",
        {"train": {"daisy": slice(0, 30), "roses": slice(0, 30)}, "val": {"daisy": slice(30, 33)}},
    )
    image_set = find_images(root, DataConfig(testing_percentage=20, validation_percentage=5))
    expected = {}
    for label in ("daisy", "roses"):
        for photo in photos(label)[:30]:
            split = split_for_file(photo.name, 0, 20)  # validation comes from val/
            expected[os.path.join("train", label, photo.name)] = (label, split)
    expected.update(
        {
            os.path.join("val", "daisy", p.name): ("daisy", "validation")
            for p in photos("daisy")[30:33]
        }
    )
    assert splits_by_file(image_set) == expected
    assert 0 < image_set.split_counts()["testing"] < 30
    assert image_set.split_note.endswith(
        "training from train/, validation from val/, testing 20% of train/ by hash"
    )


def test_split_hash_path_hashes_the_path_through_the_train_folder(tmp_path):
    presplit(
        tmp_path / "photos",
        {"train": {"daisy": slice(0, 20), "roses": slice(0, 20)}, "test": {"roses": slice(20, 22)}},
    )
    spelled = str(tmp_path / "photos")
    image_set = find_images(spelled, DataConfig(validation_percentage=30, split_hash="path"))
    for rel, (_, split) in splits_by_file(image_set).items():
        if rel.startswith("train"):
            assert split == split_for_file(os.path.join(spelled, rel), 30, 0)
        else:
            assert split == "testing"


def test_plain_class_folders_split_exactly_as_before(tmp_path):
    root = presplit(tmp_path / "photos", {".": {"daisy": slice(0, 40), "roses": slice(0, 40)}})
    for split_from in ("auto", "hash"):
        for split_hash in ("basename", "path"):
            data = DataConfig(20, 20, split_hash=split_hash, split_from=split_from)
            ours, before = find_images(root, data), scan_image_dir(root, 20, 20, split_hash)
            assert ours.labels == before.labels and list(ours.paths) == list(before.paths)
            assert np.array_equal(ours.split_codes, before.split_codes)
            assert ours.split_folders is None and ours.split_note is None


def test_split_from_hash_takes_split_folders_as_classes(tmp_path):
    root = presplit(
        tmp_path / "photos", {"train": {"daisy": slice(0, 4)}, "val": {"daisy": slice(4, 6)}}
    )
    image_set = find_images(root, DataConfig(split_from="hash"))
    assert image_set.labels == ["train", "val"] and image_set.split_folders is None


@pytest.mark.parametrize(
    "folders, split_from, words",
    [
        (["train", "val", "roses"], "auto", r"mixes split folders \(train, val\) with other"),
        (["train", "val", "validation"], "auto", "two folders for the validation split"),
        (["daisy", "roses"], "folders", "is folders, but"),
        (["train", "roses"], "folders", "has no train folder beside a val or test folder"),
    ],
)
def test_layouts_that_cannot_be_used_are_one_clear_error(tmp_path, folders, split_from, words):
    for folder in folders:
        (tmp_path / folder).mkdir()
    with pytest.raises(ConfigError, match=words) as info:
        find_split_folders(tmp_path, split_from)
    assert "\n" not in str(info.value)


def test_a_lone_split_name_among_classes_stays_a_class(tmp_path):
    for folder in ("test", "roses", "daisy"):
        (tmp_path / folder).mkdir()
    assert find_split_folders(tmp_path, "auto") is None


def test_command_line_errors_name_the_flags_exit_2(tmp_path, capsys):
    root = presplit(
        tmp_path / "photos",
        {"train": {"daisy": slice(0, 4)}, "test": {"daisy": slice(4, 6)}},
    )
    (root / "roses").mkdir()
    for extra, message in (
        ([], f"--image_dir: {root} mixes split folders (test, train) with other folders (roses)"),
        (["--split_from=auto_please"], "flag --split_from=auto_please: value should be one of"),
    ):
        assert cli.main(retrain_args(root, tmp_path / "out", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"retrain: error: {message}"), err
    shutil.rmtree(root / "roses")
    (root / "daisy").mkdir()
    (root / "train").rename(root / "roses")
    assert cli.main(retrain_args(root, tmp_path / "out", "--split_from=folders")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("retrain: error: --split_from is folders, but"), err


def test_an_empty_split_folder_is_an_error_naming_it(tmp_path):
    root = presplit(tmp_path / "photos", {"train": {"daisy": slice(0, 4), "roses": slice(0, 4)}})
    (root / "val" / "daisy").mkdir(parents=True)
    with pytest.raises(ConfigError, match="image_dir: val/ holds no images in class folders"):
        scan_images(RetrainConfig(image_dir=str(root)), write_manifest=False)


def write_rows(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def tagged(tmp_path) -> Path:
    """Ten images under tmp_path/images, part{i}/img{i}.png."""
    for i in range(10):
        write_image(tmp_path / "images" / f"part{i % 2}" / f"img{i}.png", color=(20 * i, 0, 0))
    return tmp_path / "images"


def test_a_split_column_gives_the_split_and_empty_values_the_hash(tagged, tmp_path):
    values = ["train", "Validation", "TEST", "dev", "", "training", "testing", "val", "", "x"]
    rows = [[f"part{i % 2}/img{i}.png", i % 2, value, 1 - i % 2] for i, value in enumerate(values)]
    csv_path = write_rows(tmp_path / "labels.csv", ["path", "red", "Split", "blue"], rows)
    image_set = read_labels_csv(csv_path, tagged, 30, 30)

    assert image_set.labels == ["red", "blue"]
    given = ["training", "validation", "testing", "validation", None, "training", "testing"]
    given += ["validation", None]
    expected = [split or split_for_file(f"img{i}.png", 30, 30) for i, split in enumerate(given)]
    assert [image_set.split_of(i) for i in range(len(image_set))] == expected
    assert image_set.targets.tolist() == [[i % 2, 1 - i % 2] for i in range(9)]
    ((where, reason),) = image_set.ignored
    assert where == f"{csv_path} line 11" and reason.startswith("split 'x' is not one of")
    assert image_set.split_note == (
        f"{csv_path}: 7 row(s) take their split from its split column, 2 (no value) the hash"
    )

    by_hash = read_labels_csv(csv_path, tagged, 30, 30, split_from="hash")
    assert by_hash.labels == ["red", "blue"] and by_hash.split_note is None
    assert [by_hash.split_of(i) for i in range(len(by_hash))] == [
        split_for_file(f"img{i}.png", 30, 30) for i in range(10)
    ]


def test_a_split_column_row_with_a_missing_value_is_skipped(tagged, tmp_path):
    rows = [[f"part{i % 2}/img{i}.png", "train", i % 2, 1 - i % 2] for i in range(10)]
    rows[3] = ["part1/img3.png", "train", 1]
    csv_path = write_rows(tmp_path / "labels.csv", ["path", "split", "red", "blue"], rows)
    image_set = read_labels_csv(csv_path, tagged, 0, 0)
    assert len(image_set) == 9
    assert image_set.ignored == [
        (f"{csv_path} line 5", "3 values, expected 4 (path, split and one per label); row skipped")
    ]


def test_split_from_folders_needs_a_split_column(tagged, tmp_path):
    csv_path = write_rows(tmp_path / "labels.csv", ["path", "red"], [["part0/img0.png", 1]])
    with pytest.raises(ConfigError, match="is folders, but .* has no split column"):
        read_labels_csv(csv_path, tagged, 0, 0, split_from="folders")


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "module"
    save_tiny_module(path)
    return path


def test_a_run_trains_and_reports_on_the_folder_splits(tmp_path, tiny_module):
    root = presplit(
        tmp_path / "photos",
        {
            "train": {"daisy": slice(0, 8), "roses": slice(0, 8)},
            "valid": {"daisy": slice(8, 11), "roses": slice(8, 11)},
            "test": {"daisy": slice(11, 13), "roses": slice(11, 13)},
        },
    )
    result = retrain.run(
        RetrainConfig(
            image_dir=str(root),
            module=retrain.ModuleConfig(handle=str(tiny_module), extraction_backend="tensorflow"),
            training=retrain.HeadTrainingConfig(how_many_training_steps=5),
            outputs=OutputsConfig(split_manifest=str(tmp_path / "split.csv")),
        )
    )
    assert result.labels == ["daisy", "roses"]
    assert result.images == {"training": 16, "validation": 6, "testing": 4}
    assert result.metrics()["images"] == result.images
    splits_from = result.metrics()["splits_from"]
    assert splits_from["folders"] == {"training": "train", "validation": "valid", "testing": "test"}
    assert "split into folders" in splits_from["note"]
    with open(tmp_path / "split.csv") as handle:
        manifest = {
            os.path.relpath(r["path"], root): (r["label"], r["split"])
            for r in csv.DictReader(handle)
        }
    folder_split = {"train": "training", "valid": "validation", "test": "testing"}
    assert manifest == {
        rel: (rel.split(os.sep)[1], folder_split[rel.split(os.sep)[0]]) for rel in manifest
    }
    assert len(manifest) == 26 and set(SPLITS) == {split for _, split in manifest.values()}
