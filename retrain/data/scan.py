"""Scanning an image folder into classes and a stable train/validation/test split.

As retrain.py: every direct subfolder of the image folder is a class (sorted), the label is the
folder name lower-cased with runs of other characters replaced by a space, and each file's split
comes from retrain.py's formula (SHA-1 of a name, anything after `_nohash_` ignored), so adding
files never moves old ones between splits.

What the formula hashes (`split_hash`) is where we differ by default:

- "basename" (default, ours): the file's base name. The split survives moving or renaming the
  image folder and does not depend on how the folder is spelled.
- "path" (retrain.py's): the path as retrain.py's glob spelled it, `os.path.join(image_dir,
  class_folder, file_name)` with `image_dir` as given, not resolved: a relative one stays
  relative and only `~` is expanded, as the shell did for retrain.py. So `photos` and `photos/`
  split alike (os.path.join adds no second slash), while `./photos`, `photos//` or the absolute
  path each split differently. This reproduces retrain.py's split file for file for the same
  `--image_dir` string, and changes when the folder moves. Files retrain.py never listed (in
  nested folders, or with extensions it does not glob) hash the path spelled the same way:
  `os.path.join(image_dir, class_folder, path_in_class)`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np

from retrain.config import SPLIT_HASHES
from retrain.errors import ConfigError
from retrain.utils.atomic import atomic_write_text

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})
SPLITS = ("training", "validation", "testing")
# retrain.py's constant: 2**27 - 1 files per class at most.
MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1


class PathList(Sequence[str]):
    """File paths packed into one bytes buffer with end offsets.

    A million paths cost about (length + 8) bytes each instead of the ~150 bytes of a str
    object in a list; indexing decodes one path back to str (also names that are not UTF-8).
    """

    def __init__(self, paths: Iterable[str | os.PathLike] = ()):
        encoded = [os.fsencode(p) for p in paths]
        self._buffer = b"".join(encoded)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    @classmethod
    def _packed(cls, buffers: Sequence[bytes], lengths: np.ndarray) -> PathList:
        """A list of the paths whose bytes, concatenated, are `buffers` joined."""
        packed = cls()
        packed._buffer = b"".join(buffers)
        packed._ends = np.cumsum(lengths, dtype=np.int64)
        return packed

    @classmethod
    def concat(cls, parts: Sequence[PathList]) -> PathList:
        """One list holding the paths of `parts`, in order."""
        lengths = [part._lengths() for part in parts]
        return cls._packed(
            [part._buffer for part in parts],
            np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
        )

    def _starts(self) -> np.ndarray:
        starts = np.zeros_like(self._ends)
        starts[1:] = self._ends[:-1]
        return starts

    def _lengths(self) -> np.ndarray:
        return self._ends - self._starts()

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> PathList: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        end = int(self._ends[index])  # raises IndexError past the end; negative counts back
        start = int(self._ends[index - 1]) if index % len(self) else 0
        return os.fsdecode(self._buffer[start:end])

    def __iter__(self) -> Iterator[str]:
        start = 0
        for end in self._ends.tolist():
            yield os.fsdecode(self._buffer[start:end])
            start = end

    def take(self, indices: Sequence[int] | np.ndarray) -> PathList:
        """The paths at `indices` (ints, or a boolean mask), as a new PathList."""
        indices = np.asarray(indices, dtype=bool if len(indices) == 0 else None)
        if indices.dtype == bool:
            if len(indices) == len(self) and indices.all():
                return self  # immutable: sharing it is safe, and costs nothing
            indices = np.flatnonzero(indices)
        starts, ends = self._starts()[indices], self._ends[indices]
        first, last = starts.tolist(), ends.tolist()
        # Joined chunk by chunk: no more than a chunk of small bytes objects exists at once.
        chunk = 65536
        buffers = [
            b"".join(self._buffer[a:b] for a, b in zip(first[i : i + chunk], last[i : i + chunk]))
            for i in range(0, len(first), chunk)
        ]
        return self._packed(buffers, ends - starts)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PathList):
            return self._buffer == other._buffer and np.array_equal(self._ends, other._ends)
        return NotImplemented

    def __repr__(self) -> str:
        return f"PathList({len(self)} paths)"


def split_mask(split_codes: np.ndarray, split: str) -> np.ndarray:
    """Mask of the rows of `split_codes` (indices into SPLITS) that belong to `split`."""
    return split_codes == SPLITS.index(split)


def count_splits(split_codes: np.ndarray) -> dict[str, int]:
    """Number of rows of `split_codes` (indices into SPLITS) per split."""
    counts = np.bincount(split_codes, minlength=len(SPLITS))
    return {split: int(n) for split, n in zip(SPLITS, counts)}


@dataclass
class ImageSet:
    """All images found under an image folder, with their labels and split.

    Column arrays, one row per image, so a million images cost tens of megabytes.
    """

    image_dir: Path
    labels: list[str]  # class names; an image's label index points here
    paths: PathList
    label_indices: np.ndarray  # int32 (-1 in a multi-label set: see `targets`)
    split_codes: np.ndarray  # int8, an index into SPLITS
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    targets: np.ndarray | None = None  # multi-label sets: uint8 [n, labels], 1 = label applies
    unlisted: int | None = None  # multi-label sets: image files the labels CSV does not name
    # Splits given by folders (split -> the folder's name, e.g. "validation" -> "val"), None
    # when none is; and one line for the log on where the splits came from, if not the hash.
    split_folders: dict[str, str] | None = None
    split_note: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def multi_label(self) -> bool:
        """Whether each image has a 0/1 vector of labels (`targets`) instead of one class."""
        return self.targets is not None

    def label_rows(self) -> np.ndarray:
        """Every image's label as training takes it: int64 class indices [n], or the 0/1
        matrix [n, labels] of a multi-label set."""
        if self.targets is not None:
            return self.targets
        return self.label_indices.astype(np.int64)

    def label_text(self, i: int) -> str:
        """Image i's label for people: its class, or its labels joined by ';'."""
        if self.targets is None:
            return self.labels[self.label_indices[i]]
        return ";".join(label for label, on in zip(self.labels, self.targets[i]) if on)

    def split_of(self, i: int) -> str:
        """The split of image i."""
        return SPLITS[self.split_codes[i]]

    def in_split(self, split: str) -> np.ndarray:
        """Mask of the images of one split."""
        return split_mask(self.split_codes, split)

    def split_counts(self) -> dict[str, int]:
        """Number of images per split."""
        return count_splits(self.split_codes)

    def class_split_counts(self) -> list[dict[str, int]]:
        """Per class, the number of images per split (multi-label: images where it applies)."""
        if self.targets is not None:
            counts = np.stack(
                [self.targets[self.split_codes == s].sum(axis=0) for s in range(len(SPLITS))], 1
            )
            return [dict(zip(SPLITS, row.tolist())) for row in counts]
        cells = self.label_indices.astype(np.int64) * len(SPLITS) + self.split_codes
        counts = np.bincount(cells, minlength=len(self.labels) * len(SPLITS))
        return [dict(zip(SPLITS, row.tolist())) for row in counts.reshape(-1, len(SPLITS))]


def label_for_folder(name: str) -> str:
    """retrain.py's label for a class folder name."""
    return re.sub(r"[^a-z0-9]+", " ", name.lower())


def split_for_file(name: str, validation_percentage: float, testing_percentage: float) -> str:
    """retrain.py's split for a file from `name`, the string its split is a hash of (see
    `split_hash_name`: the base name by default, the globbed path for retrain.py's split).

    Anything after the first `_nohash_` is ignored, so variants of one photo land in the same
    split (with a whole path hashed, that holds for `_nohash_` in a folder name too, as in
    retrain.py).
    """
    hash_name = re.sub(r"_nohash_.*$", "", name)
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


def split_hash_name(split_hash: str, image_dir: str, class_folder: str, in_class: str) -> str:
    """The string whose hash decides a file's split, for `split_hash` (one of SPLIT_HASHES).

    `image_dir` is the image folder as the user spelled it, `class_folder` the class folder's
    name and `in_class` the file's path inside that folder ("photo.jpg", or "sub/photo.jpg" in a
    nested folder). "basename" gives the file's base name; "path" gives
    `os.path.join(image_dir, class_folder, in_class)`, which for a file directly in the class
    folder is the path retrain.py's `os.path.join(image_dir, dir_name, '*.jpg')` glob returned.
    """
    if split_hash == "basename":
        return os.path.basename(in_class)
    return os.path.join(image_dir, class_folder, in_class)


def check_split_hash(split_hash: str) -> None:
    """Raise ConfigError (naming `data.split_hash`) unless `split_hash` is in SPLIT_HASHES."""
    if split_hash not in SPLIT_HASHES:
        raise ConfigError(
            f"{{0}} must be one of {', '.join(SPLIT_HASHES)}, got {split_hash!r}",
            "data.split_hash",
        )


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


@dataclass
class ClassImages:
    """The images found in one class folder, with the split of each."""

    label: str
    folder: str  # the class folder's name
    paths: PathList
    split_codes: np.ndarray  # int8, an index into SPLITS


def subfolders(folder: str | os.PathLike) -> list[os.DirEntry]:
    """The folder's subfolders (symlinks to folders too), hidden ones left out, by name."""
    return sorted(
        (e for e in os.scandir(folder) if e.is_dir() and not _is_hidden(e.name)),
        key=lambda e: e.name,
    )


def scan_classes(
    class_dirs: Sequence[os.DirEntry],
    spelled: str,
    split_hash: str,
    split_of: Callable[[str], str],
    ignored: list[tuple[str, str]],
) -> list[ClassImages]:
    """The images of each class folder in `class_dirs` (subfolders of the folder spelled
    `spelled`), in order; a file's split is `split_of` the name `split_hash_name` gives.

    Class folders without images are left out with a reason in `ignored`. Raises ConfigError
    (naming `image_dir`) when two of them map to the same label.
    """
    found: list[ClassImages] = []
    label_source: dict[str, str] = {}
    for entry in class_dirs:
        label = label_for_folder(entry.name)
        if label in label_source:
            raise ConfigError(
                f"{{0}}: class folders '{display_path(label_source[label])}' and "
                f"'{display_path(entry.name)}' both map to the label '{label}'; rename one",
                "image_dir",
            )
        images = _walk_images(entry.path, ignored)
        if not images:
            ignored.append((display_path(entry.path), "class folder has no images; skipped"))
            continue
        label_source[label] = entry.name
        # Every path found starts with the class folder's path and a separator.
        inside = len(entry.path) + 1
        splits = (
            split_of(split_hash_name(split_hash, spelled, entry.name, path[inside:]))
            for path in images
        )
        codes = np.array([SPLITS.index(split) for split in splits], dtype=np.int8)
        found.append(ClassImages(label, entry.name, PathList(images), codes))
    return found


def image_set_of(
    root: Path, labels: list[str], classes: list[ClassImages], ignored: list[tuple[str, str]]
) -> ImageSet:
    """The ImageSet of `classes` (each class's label among `labels`), in their order.

    Raises ConfigError (naming `image_dir`) when fewer than two labels hold images.
    """
    if len(labels) < 2:
        found = f"only {len(labels)} class" if labels else "no images"
        raise ConfigError(
            f"{{0}}: {found} found in {display_path(root)}; "
            "need at least two class subfolders with images",
            "image_dir",
        )
    number = {label: i for i, label in enumerate(labels)}
    return ImageSet(
        image_dir=root,
        labels=labels,
        paths=PathList.concat([c.paths for c in classes]),
        label_indices=np.concatenate(
            [np.full(len(c.paths), number[c.label], dtype=np.int32) for c in classes]
        ),
        split_codes=np.concatenate([c.split_codes for c in classes]),
        ignored=ignored,
    )


def image_root(image_dir: str | os.PathLike) -> tuple[str, Path]:
    """The image folder as the shell gave it to retrain.py (`~` expanded, nothing resolved),
    and as a Path; raises ConfigError (naming `image_dir`) when it is not a folder."""
    spelled = os.path.expanduser(os.fspath(image_dir))
    root = Path(spelled)
    if not root.is_dir():
        raise ConfigError(f"{{0}}: folder not found: {display_path(root)}", "image_dir")
    return spelled, root


def scan_image_dir(
    image_dir: str | os.PathLike,
    validation_percentage: float,
    testing_percentage: float,
    split_hash: str = "basename",
) -> ImageSet:
    """Find the classes and images under `image_dir` and assign each image its split.

    `split_hash` (one of SPLIT_HASHES) says what a file's split is a hash of: its base name, or
    (for retrain.py's split) its path spelled from `image_dir` as given (see `split_hash_name`).
    The paths found, and so the manifest and the cache keys, do not depend on it.

    Raises ConfigError (naming `image_dir`) when the folder is missing or empty, when two
    class folders map to the same label, or when fewer than two classes hold images; and
    (naming `data.split_hash`) for an unknown `split_hash`.
    """
    check_split_hash(split_hash)
    spelled, root = image_root(image_dir)
    class_dirs = subfolders(root)
    if not class_dirs:
        raise ConfigError(
            f"{{0}}: {display_path(root)} has no class subfolders "
            "(expected one subfolder of images per class)",
            "image_dir",
        )
    ignored: list[tuple[str, str]] = []
    classes = scan_classes(
        class_dirs,
        spelled,
        split_hash,
        lambda name: split_for_file(name, validation_percentage, testing_percentage),
        ignored,
    )
    return image_set_of(root, [c.label for c in classes], classes, ignored)


_SPLIT_FIELDS = ("image_dir", "data.validation_percentage", "data.testing_percentage")


def check_splits_populated(image_set: ImageSet, needed_overall: tuple[str, ...]) -> list[str]:
    """Check that every class can be trained and that the needed splits are not empty.

    Raises ConfigError (naming `image_dir`) when a class has no training image or a split in
    `needed_overall` has no image at all. Returns warnings for classes missing from the
    validation or testing split.
    """
    counts = image_set.class_split_counts()
    untrainable = [label for label, c in zip(image_set.labels, counts) if c["training"] == 0]
    if untrainable:
        raise ConfigError(
            "{0}: no training images for class "
            + ", ".join(f"'{label}'" for label in untrainable)
            + " (add more images, or lower {1}/{2})",
            *_SPLIT_FIELDS,
        )
    totals = image_set.split_counts()
    empty = [split for split in needed_overall if totals[split] == 0]
    folders = image_set.split_folders or {}
    if any(split in folders for split in empty):
        raise ConfigError(
            "{0}: "
            + " and ".join(f"{folders[split]}/" for split in empty if split in folders)
            + " holds no images in class folders",
            "image_dir",
        )
    if empty:
        raise ConfigError(
            f"{{0}}: the {' and '.join(empty)} split is empty; add more images or "
            "raise {1}/{2}",
            *_SPLIT_FIELDS,
        )
    return [
        f"class '{label}' has no {split} images"
        + (f" (none under {folders[split]}/)" if split in folders else "")
        + f"; its {split} accuracy is not measured"
        for label, c in zip(image_set.labels, counts)
        for split in needed_overall
        if c[split] == 0
    ]


def write_split_manifest(image_set: ImageSet, path: str | os.PathLike) -> None:
    """Write a CSV `path,label,split` of every image used, atomically (multi-label: the
    labels that apply, joined by ';')."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "split"])
    for i, image_path in enumerate(image_set.paths):
        writer.writerow([display_path(image_path), image_set.label_text(i), image_set.split_of(i)])
    atomic_write_text(path, out.getvalue(), "split manifest")


def walk_images(folder: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files under `folder`, walked as a class folder is (recursively, in name
    order, hidden and non-image files left out), and (path, reason) of those left out because
    they cannot be used (a broken link, a folder that cannot be listed)."""
    ignored: list[tuple[str, str]] = []
    return _walk_images(os.fspath(folder), ignored), ignored
