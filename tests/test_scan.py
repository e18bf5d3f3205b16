import csv
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest

import retrain
from retrain.data.scan import (
    SPLITS,
    PathList,
    check_splits_populated,
    label_for_folder,
    scan_image_dir,
    split_for_file,
    write_split_manifest,
)
from retrain.errors import ConfigError, UsageError
from tests.conftest import write_image
from tests.fault_tools import save_tiny_module


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


# The extensions retrain.py globs at TF Hub's last commit (0163eda's list lacks png).
RETRAIN_PY_EXTENSIONS = ["JPEG", "JPG", "jpeg", "jpg", "png"]


def retrain_py_splits(image_dir: str, validation_percentage, testing_percentage) -> dict:
    """retrain.py's create_image_lists (TF Hub's last commit) as far as the split goes, with
    TensorFlow's own Walk and Glob as it calls them: {path relative to image_dir: split} of
    every file it lists."""
    import tensorflow as tf

    gfile = tf.compat.v1.gfile
    found = {}
    sub_dirs = sorted(x[0] for x in gfile.Walk(image_dir))
    for sub_dir in sub_dirs[1:]:  # the root comes first, and is skipped
        dir_name = os.path.basename(sub_dir[:-1] if sub_dir.endswith("/") else sub_dir)
        if dir_name == image_dir:
            continue
        for extension in sorted(set(RETRAIN_PY_EXTENSIONS)):
            for file_name in gfile.Glob(os.path.join(image_dir, dir_name, "*." + extension)):
                split = retrain_py_split(file_name, validation_percentage, testing_percentage)
                found[os.path.relpath(file_name, image_dir)] = split
    return found


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


# Files only retrain.py lists (hidden), and only we list (nested, or an extension in a letter
# case or a format retrain.py does not glob), in make_photo_tree.
ONLY_RETRAIN_PY = {"Sun Flowers/.hidden.jpg"}
ONLY_OURS = {"Sun Flowers/more/n0.jpg", "Sun Flowers/more/n1.jpg", "roses/g.gif", "daisy/odd.Jpg"}


def make_photo_tree(root: Path) -> None:
    """Three classes of empty files (scanning never opens them): plain photos, each extension
    retrain.py globs, `_nohash_` variants of one photo, and the files of ONLY_*."""
    for i in range(30):
        touch(root / "daisy" / f"d{i}.jpg")
        touch(root / "roses" / f"r{i}.JPG")
        touch(root / "Sun Flowers" / f"s{i}.jpeg")
    for name in ("x.JPEG", "y.png", "leaf_nohash_0.jpg", "leaf_nohash_1.jpg", "leaf_nohash_2.png"):
        touch(root / "roses" / name)
    for rel in ONLY_RETRAIN_PY | ONLY_OURS:
        touch(root / rel)


def split_by_path(image_set) -> dict:
    """{path relative to the image folder: split} of a scan."""
    return {
        os.path.relpath(path, image_set.image_dir): image_set.split_of(i)
        for i, path in enumerate(image_set.paths)
    }


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


@pytest.mark.parametrize(
    "spelling",
    ["{abs}", "{abs}/", "{abs}//", "photos", "photos/", "./photos", "photos/.", "../here/photos"],
)
def test_path_split_is_retrain_py_s_for_the_same_image_dir(tmp_path, monkeypatch, spelling):
    """--split_hash path: every file retrain.py lists lands in its split, for the image folder
    spelled absolute or relative, with or without a trailing slash."""
    make_photo_tree(tmp_path / "here" / "photos")
    monkeypatch.chdir(tmp_path / "here")
    image_dir = spelling.format(abs=tmp_path / "here" / "photos")
    theirs = retrain_py_splits(image_dir, 20, 20)
    ours = split_by_path(scan_image_dir(image_dir, 20, 20, split_hash="path"))
    assert set(theirs) - set(ours) == ONLY_RETRAIN_PY  # hidden files: we skip them
    assert set(ours) - set(theirs) == ONLY_OURS
    assert {rel: ours[rel] for rel in theirs.keys() - ONLY_RETRAIN_PY} == {
        rel: split for rel, split in theirs.items() if rel not in ONLY_RETRAIN_PY
    }
    for rel in ONLY_OURS:  # the same formula on the path spelled the same way
        assert ours[rel] == retrain_py_split(os.path.join(image_dir, rel), 20, 20)
    assert set(ours.values()) == set(SPLITS)
    nohash = {ours[f"roses/leaf_nohash_{i}.{ext}"] for i, ext in enumerate(["jpg", "jpg", "png"])}
    assert len(nohash) == 1


def test_path_split_follows_the_spelling_the_basename_split_does_not(tmp_path, monkeypatch):
    make_photo_tree(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    spellings = [str(tmp_path / "photos"), "photos", "photos/", "./photos"]
    scans = {
        (spelling, mode): scan_image_dir(spelling, 20, 20, split_hash=mode)
        for spelling in spellings
        for mode in ("basename", "path")
    }
    by_mode = {
        mode: [split_by_path(scans[spelling, mode]) for spelling in spellings]
        for mode in ("basename", "path")
    }
    assert all(splits == by_mode["basename"][0] for splits in by_mode["basename"])
    absolute, plain, slash, dotted = by_mode["path"]
    # os.path.join("photos/", "daisy") is "photos/daisy": a trailing slash changes nothing.
    assert plain == slash and absolute != plain and dotted != plain
    for rel, split in by_mode["basename"][0].items():
        assert split == split_for_file(os.path.basename(rel), 20, 20)
    # Either way the same files, in the same order, under the same paths: the cache's keys.
    assert len({tuple(scans[key].paths) for key in scans if key[0] == "photos"}) == 1


def test_path_split_ignores_everything_after_nohash_in_folders_too(tmp_path):
    """retrain.py strips the whole path after the first `_nohash_`: under a folder so named,
    every file lands in one split."""
    image_dir = str(tmp_path / "set_nohash_1" / "photos")
    make_photo_tree(Path(image_dir))
    theirs = retrain_py_splits(image_dir, 20, 20)
    ours = split_by_path(scan_image_dir(image_dir, 20, 20, split_hash="path"))
    assert len(set(ours.values())) == 1
    assert {rel: ours[rel] for rel in theirs.keys() - ONLY_RETRAIN_PY} == {
        rel: split for rel, split in theirs.items() if rel not in ONLY_RETRAIN_PY
    }


def test_unknown_split_hash_is_a_config_error(tmp_path):
    make_photo_tree(tmp_path)
    with pytest.raises(ConfigError, match="data.split_hash must be one of basename, path"):
        scan_image_dir(tmp_path, 10, 10, split_hash="sha1")


@pytest.fixture(scope="module")
def tiny_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "module"
    save_tiny_module(path)
    return path


def test_runs_split_either_way_write_the_manifest_and_share_the_cache(
    tmp_path, monkeypatch, tiny_module
):
    """A run with --split_hash path trains and tests on retrain.py's split (a relative image
    folder with a trailing slash); a run with the default then finds every vector cached."""
    for i in range(15):
        write_image(tmp_path / "photos" / "red" / f"r{i}.jpg", color=(200 + i, 20, 20))
        write_image(tmp_path / "photos" / "blue" / f"b{i}.jpg", color=(20, 20, 200 + i))
    monkeypatch.chdir(tmp_path)

    def run(split_hash: str):
        config = retrain.RetrainConfig(
            image_dir="photos/",
            data=retrain.DataConfig(20, 20, split_hash=split_hash),
            module=retrain.ModuleConfig(handle=str(tiny_module), extraction_backend="tensorflow"),
            cache=retrain.CacheConfig(bottleneck_dir="cache"),
            training=retrain.HeadTrainingConfig(how_many_training_steps=20),
            outputs=retrain.OutputsConfig(split_manifest=f"{split_hash}.csv"),
        )
        result = retrain.run(config)
        with open(f"{split_hash}.csv") as manifest:
            rows = {
                os.path.relpath(r["path"], "photos"): r["split"] for r in csv.DictReader(manifest)
            }
        assert result.images == {split: list(rows.values()).count(split) for split in SPLITS}
        return result, rows

    by_path, path_rows = run("path")
    assert path_rows == retrain_py_splits("photos/", 20, 20)
    by_name, name_rows = run("basename")
    assert name_rows == {rel: split_for_file(os.path.basename(rel), 20, 20) for rel in name_rows}
    assert name_rows != path_rows
    assert (by_path.bottlenecks_computed, by_name.bottlenecks_computed) == (30, 0)


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
