"""Scanning an image folder into classes and a stable train/validation/test split.

Follows retrain.py: every direct subfolder of the image folder is a class (sorted), the label is
the folder name lower-cased with runs of other characters replaced by a space, and each file's
split comes from a hash of its base name, so the split survives moving the folder and adding
files never moves old ones between splits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from retrain.atomic import atomic_write_text
from retrain.errors import UsageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})
SPLITS = ("training", "validation", "testing")
# retrain.py's constant: 2**27 - 1 files per class at most.
MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1


@dataclass(frozen=True, slots=True)  # a million of them: no per-object dict
class ImageFile:
    """One image: where it is, its class index and the split it belongs to."""

    path: str  # not a Path: a million Path objects cost half a gigabyte
    label_index: int
    split: str


@dataclass
class ImageSet:
    """All images found under an image folder, with their labels and split."""

    image_dir: Path
    labels: list[str]
    files: list[ImageFile]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def in_split(self, split: str) -> list[ImageFile]:
        """The images of one split, in scan order."""
        return [f for f in self.files if f.split == split]

    def split_counts(self) -> dict[str, int]:
        """Number of images per split."""
        counts = Counter(f.split for f in self.files)
        return {split: counts.get(split, 0) for split in SPLITS}

    def class_split_counts(self) -> list[dict[str, int]]:
        """Per class, the number of images per split."""
        counts = [dict.fromkeys(SPLITS, 0) for _ in self.labels]
        for f in self.files:
            counts[f.label_index][f.split] += 1
        return counts


def label_for_folder(name: str) -> str:
    """retrain.py's label for a class folder name."""
    return re.sub(r"[^a-z0-9]+", " ", name.lower())


def split_for_file(basename: str, validation_percentage: float, testing_percentage: float) -> str:
    """retrain.py's split for a file, from a hash of its base name.

    Anything after `_nohash_` is ignored, so variants of one photo land in the same split.
    """
    hash_name = re.sub(r"_nohash_.*$", "", basename)
    # os.fsencode gives the file name's original bytes, also for names that are not UTF-8.
    digest = hashlib.sha1(os.fsencode(hash_name)).hexdigest()
    percentage = (int(digest, 16) % (MAX_NUM_IMAGES_PER_CLASS + 1)) * (
        100.0 / MAX_NUM_IMAGES_PER_CLASS
    )
    if percentage < validation_percentage:
        return "validation"
    if percentage < validation_percentage + testing_percentage:
        return "testing"
    return "training"


def display_path(path: str | os.PathLike) -> str:
    """A printable form of a path, also for file names that are not valid UTF-8."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_images(class_dir: str, ignored: list[tuple[str, str]]) -> list[str]:
    """Image files under a class folder, recursively, following each symlink once.

    Hidden files and folders are skipped; a symlinked folder already visited (a loop) is not
    entered again, and a file reached twice through links is counted once.
    """
    found: list[str] = []
    seen_dirs: set[str] = set()
    through_links = False
    stack = [class_dir]
    while stack:
        directory = stack.pop()
        real = os.path.realpath(directory)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as err:
            ignored.append((display_path(directory), f"cannot list folder: {err.strerror}"))
            continue
        subdirs = []
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            try:
                through_links = through_links or entry.is_symlink()
                if entry.is_dir():  # follows symlinks
                    subdirs.append(entry.path)
                    continue
                is_file = entry.is_file()
            except OSError:
                is_file = False
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            if not is_file:
                ignored.append((display_path(entry.path), "broken link or not a regular file"))
                continue
            found.append(entry.path)
        stack.extend(reversed(subdirs))
    # Only links can lead to one file twice; without any, skip a million realpath calls.
    return _first_of_each_file(found) if through_links else found


def _first_of_each_file(paths: list[str]) -> list[str]:
    seen: set[str] = set()
    unique = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def scan_image_dir(
    image_dir: str | os.PathLike,
    validation_percentage: float,
    testing_percentage: float,
) -> ImageSet:
    """Find the classes and images under `image_dir` and assign each image its split.

    Raises UsageError when the folder is missing or empty, when two class folders map to the
    same label, or when fewer than two classes hold images.
    """
    root = Path(image_dir).expanduser()
    if not root.is_dir():
        raise UsageError(f"--image_dir: folder not found: {display_path(root)}")
    class_dirs = sorted(
        (e for e in os.scandir(root) if e.is_dir() and not _is_hidden(e.name)),
        key=lambda e: e.name,
    )
    if not class_dirs:
        raise UsageError(
            f"--image_dir: {display_path(root)} has no class subfolders "
            "(expected one subfolder of images per class)"
        )
    ignored: list[tuple[str, str]] = []
    labels: list[str] = []
    label_source: dict[str, str] = {}
    files: list[ImageFile] = []
    for entry in class_dirs:
        label = label_for_folder(entry.name)
        if label in label_source:
            raise UsageError(
                f"--image_dir: class folders '{display_path(label_source[label])}' and "
                f"'{display_path(entry.name)}' both map to the label '{label}'; rename one"
            )
        images = _walk_images(entry.path, ignored)
        if not images:
            ignored.append((display_path(entry.path), "class folder has no images; skipped"))
            continue
        label_source[label] = entry.name
        index = len(labels)
        labels.append(label)
        for path in images:
            name = os.path.basename(path)
            split = split_for_file(name, validation_percentage, testing_percentage)
            files.append(ImageFile(path=path, label_index=index, split=split))
    if len(labels) < 2:
        found = f"only {len(labels)} class" if labels else "no images"
        raise UsageError(
            f"--image_dir: {found} found in {display_path(root)}; "
            "need at least two class subfolders with images"
        )
    return ImageSet(image_dir=root, labels=labels, files=files, ignored=ignored)


def check_splits_populated(image_set: ImageSet, needed_overall: tuple[str, ...]) -> list[str]:
    """Check that every class can be trained and that the needed splits are not empty.

    Raises UsageError when a class has no training image or a split in `needed_overall` has no
    image at all. Returns warnings for classes missing from the validation or testing split.
    """
    counts = image_set.class_split_counts()
    untrainable = [label for label, c in zip(image_set.labels, counts) if c["training"] == 0]
    if untrainable:
        raise UsageError(
            "--image_dir: no training images for class "
            + ", ".join(f"'{label}'" for label in untrainable)
            + " (add more images, or lower --validation_percentage/--testing_percentage)"
        )
    totals = image_set.split_counts()
    empty = [split for split in needed_overall if totals[split] == 0]
    if empty:
        raise UsageError(
            f"--image_dir: the {' and '.join(empty)} split is empty; add more images or "
            "raise --validation_percentage/--testing_percentage"
        )
    return [
        f"class '{label}' has no {split} images; its {split} accuracy is not measured"
        for label, c in zip(image_set.labels, counts)
        for split in needed_overall
        if c[split] == 0
    ]


def write_split_manifest(image_set: ImageSet, path: str | os.PathLike) -> None:
    """Write a CSV `path,label,split` of every image used, atomically."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "split"])
    for f in image_set.files:
        writer.writerow([display_path(f.path), image_set.labels[f.label_index], f.split])
    atomic_write_text(path, out.getvalue())
