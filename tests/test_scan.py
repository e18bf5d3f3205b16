import csv
import hashlib
import os
import re

import numpy as np
import pytest

from retrain.errors import ConfigError, UsageError
from retrain.scan import (
    PathList,
    check_splits_populated,
    label_for_folder,
    scan_image_dir,
    split_for_file,
    write_split_manifest,
)
from tests.conftest import write_image


def retrain_py_split(file_name, validation_percentage, testing_percentage):
    """retrain.py's which_set logic, verbatim in spirit."""
    hash_name = re.sub(r"_nohash_.*$", "", file_name)
    hashed = hashlib.sha1(hash_name.encode()).hexdigest()
    pct = (int(hashed, 16) % (2**27 - 1 + 1)) * (100.0 / (2**27 - 1))
    if pct < validation_percentage:
        return "validation"
    if pct < testing_percentage + validation_percentage:
        return "testing"
    return "training"


def test_split_matches_retrain_py_formula():
    names = [f"img_{i}.jpg" for i in range(500)] + ["a_nohash_1.jpg", "a_nohash_2.jpg"]
    for name in names:
        assert split_for_file(name, 10, 10) == retrain_py_split(name, 10, 10)
    assert split_for_file("a_nohash_1.jpg", 10, 10) == split_for_file("a_nohash_2.jpg", 10, 10)


def test_split_uses_base_name_not_path(tmp_path):
    for root in (tmp_path / "one", tmp_path / "elsewhere" / "two"):
        for name in ("cats", "dogs"):
            for i in range(30):
                write_image(root / name / f"photo{i}.jpg")
    first = scan_image_dir(tmp_path / "one", 10, 10)
    second = scan_image_dir(tmp_path / "elsewhere" / "two", 10, 10)

    def named_splits(image_set):
        return [(os.path.basename(p), image_set.split_of(i)) for i, p in enumerate(image_set.paths)]

    assert named_splits(first) == named_splits(second)
    assert {split for _, split in named_splits(first)} == {"training", "validation", "testing"}
    assert first.split_counts() == {
        split: int(first.in_split(split).sum()) for split in ("training", "validation", "testing")
    }


def test_labels_follow_retrain_py():
    assert label_for_folder("Sun-Flowers_2") == "sun flowers 2"
    assert label_for_folder("roses") == "roses"


def test_classes_sorted_extensions_case_insensitive_hidden_ignored(tmp_path):
    write_image(tmp_path / "b_dogs" / "x.JPG", fmt="JPEG")
    write_image(tmp_path / "b_dogs" / "y.Jpeg", fmt="JPEG")
    write_image(tmp_path / "b_dogs" / "z.webp", fmt="WEBP")
    write_image(tmp_path / "a_cats" / "p.PNG", fmt="PNG")
    write_image(tmp_path / "a_cats" / "q.bmp")
    write_image(tmp_path / "a_cats" / "r.gif")
    write_image(tmp_path / "a_cats" / ".hidden.jpg", fmt="JPEG")
    write_image(tmp_path / ".hidden_class" / "h.jpg", fmt="JPEG")
    (tmp_path / "a_cats" / "notes.txt").write_text("not an image")
    image_set = scan_image_dir(tmp_path, 0, 0)
    assert image_set.labels == ["a cats", "b dogs"]
    names = sorted(os.path.basename(p) for p in image_set.paths)
    assert names == ["p.PNG", "q.bmp", "r.gif", "x.JPG", "y.Jpeg", "z.webp"]


def test_colliding_labels_are_an_error(tmp_path):
    write_image(tmp_path / "Sun Flowers" / "a.jpg")
    write_image(tmp_path / "sun_flowers" / "b.jpg")
    with pytest.raises(UsageError, match="both map to the label 'sun flowers'"):
        scan_image_dir(tmp_path, 10, 10)


@pytest.mark.parametrize("layout", ["missing", "empty", "one_class", "no_images"])
def test_unusable_image_dir(tmp_path, layout):
    root = tmp_path / "images"
    if layout != "missing":
        root.mkdir()
    if layout == "one_class":
        write_image(root / "cats" / "a.jpg")
    if layout == "no_images":
        (root / "cats").mkdir()
        (root / "dogs").mkdir()
    with pytest.raises(ConfigError, match="^image_dir: ") as info:
        scan_image_dir(root, 10, 10)
    assert info.value.fields[0] == "image_dir" and info.value.exit_code == 2


def test_symlinks_followed_once_without_loops(tmp_path):
    write_image(tmp_path / "data" / "cats" / "a.jpg")
    write_image(tmp_path / "data" / "dogs" / "b.jpg")
    os.symlink(tmp_path / "data" / "cats", tmp_path / "data" / "cats" / "loop")
    os.symlink(tmp_path / "data" / "cats" / "a.jpg", tmp_path / "data" / "cats" / "a_link.jpg")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "data" / "dogs" / "broken.jpg")
    image_set = scan_image_dir(tmp_path / "data", 0, 0)
    assert sorted(os.path.basename(p) for p in image_set.paths) == ["a.jpg", "b.jpg"]
    assert any("broken" in path for path, _ in image_set.ignored)


def test_non_utf8_and_non_ascii_names(tmp_path):
    write_image(tmp_path / "cats" / "chat_été_猫.jpg")
    raw = os.path.join(os.fsencode(tmp_path / "dogs"), b"bad_\xff_name.jpg")
    os.makedirs(os.path.dirname(raw))
    os.rename(write_image(tmp_path / "tmp.jpg"), raw)
    image_set = scan_image_dir(tmp_path, 0, 0)
    assert len(image_set) == 2
    assert os.fsencode(image_set.paths[1]).endswith(b"bad_\xff_name.jpg")  # kept byte for byte
    split_for_file(os.path.basename(image_set.paths[1]), 10, 10)  # hashes raw bytes


def test_split_checks(tmp_path):
    for i in range(3):
        write_image(tmp_path / "cats" / f"c{i}.jpg")
        write_image(tmp_path / "dogs" / f"d{i}.jpg")
    image_set = scan_image_dir(tmp_path, 0, 0)
    assert check_splits_populated(image_set, ()) == []
    with pytest.raises(UsageError, match="testing split is empty") as info:
        check_splits_populated(image_set, ("testing",))
    assert info.value.render(lambda field: "--" + field.split(".")[-1]).endswith(
        "raise --validation_percentage/--testing_percentage"
    )


def test_split_manifest(tmp_path):
    for i in range(5):
        write_image(tmp_path / "imgs" / "cats" / f"c{i}.jpg")
        write_image(tmp_path / "imgs" / "dogs" / f"d{i}.jpg")
    image_set = scan_image_dir(tmp_path / "imgs", 20, 20)
    out = tmp_path / "manifest.csv"
    write_split_manifest(image_set, out)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10
    assert {r["label"] for r in rows} == {"cats", "dogs"}
    for row in rows:
        assert row["split"] == split_for_file(os.path.basename(row["path"]), 20, 20)


def test_path_list_packs_paths_and_gives_them_back():
    names = ["cats/a.jpg", "dogs/ü_猫.png", os.fsdecode(b"x/bad_\xff.jpg"), "", "z"]
    paths = PathList(names)
    assert len(paths) == 5 and list(paths) == names
    assert [paths[i] for i in range(5)] == names and paths[-1] == "z" and paths[-5] == names[0]
    with pytest.raises(IndexError):
        paths[5]
    assert list(paths.take([4, 0, 2])) == ["z", names[0], names[2]]
    assert list(paths.take(np.array([True, False, False, True, True]))) == ["cats/a.jpg", "", "z"]
    assert list(paths.take([])) == [] and list(paths[1:3]) == names[1:3]
    joined = PathList.concat([paths.take([1]), PathList(), paths.take([0, 4])])
    assert list(joined) == [names[1], names[0], "z"]
    assert joined == PathList([names[1], names[0], "z"])
