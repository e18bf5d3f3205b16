"""Image folders that arrive already split: `train/ val/ test/`, each holding the class folders.

Photo sets from Kaggle, Ultralytics' classify format or Keras tutorials often look like this.
The top-level folders are split names (any letter case; see SPLIT_NAMES); at least a training
folder and one other make the layout. The folders give each file's split; a split without a
folder is taken from the training folder by retrain.py's hash with its percentage, as a plain
folder's would be. The classes are the union of the class folders of every split.

`data.split_from` decides: "auto" uses the layout when it is there, "folders" insists on it,
"hash" takes every top-level folder as a class, as retrain.py did.
"""

from __future__ import annotations

import os
from pathlib import Path

from retrain.config import SPLIT_FROM
from retrain.data.scan import (
    SPLITS,
    ImageSet,
    check_split_hash,
    display_path,
    image_root,
    image_set_of,
    scan_classes,
    split_for_file,
    subfolders,
)
from retrain.errors import ConfigError

# A split folder's name, lower-cased -> the split it holds.
SPLIT_NAMES = {
    "train": "training",
    "training": "training",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "dev": "validation",
    "test": "testing",
    "testing": "testing",
}


def split_name(name: str) -> str | None:
    """The split (one of SPLITS) that a folder or CSV value `name` names, or None."""
    return SPLIT_NAMES.get(name.strip().lower())


def check_split_from(split_from: str) -> None:
    """Raise ConfigError (naming `data.split_from`) unless `split_from` is in SPLIT_FROM."""
    if split_from not in SPLIT_FROM:
        raise ConfigError(
            f"{{0}} must be one of {', '.join(SPLIT_FROM)}, got {split_from!r}",
            "data.split_from",
        )


def find_split_folders(image_dir: str | os.PathLike, split_from: str) -> dict[str, str] | None:
    """The split folders of `image_dir` ({split: folder name}) when `split_from` says to use
    them and they are there, else None (the top-level folders are classes).

    Raises ConfigError when split folders sit beside other folders or two folders name one
    split (naming `image_dir`), or when `split_from` is "folders" and there are none (naming
    `data.split_from`). A missing `image_dir` gives None: the scan reports it.
    """
    check_split_from(split_from)
    root = Path(os.path.expanduser(os.fspath(image_dir)))
    if split_from == "hash" or not root.is_dir():
        return None
    names = [entry.name for entry in subfolders(root)]
    named = {name: split_name(name) for name in names if split_name(name)}
    if "training" not in named.values() or len(set(named.values())) < 2:
        if split_from == "folders":
            raise ConfigError(
                f"{{0}} is folders, but {display_path(root)} has no train folder beside a val "
                "or test folder (each holding the class folders)",
                "data.split_from",
            )
        return None
    others = [name for name in names if name not in named]
    if others:
        raise ConfigError(
            f"{{0}}: {display_path(root)} mixes split folders ({', '.join(named)}) with other "
            f"folders ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); move the "
            "class folders into the split folders, or set {1}=hash to take every top folder "
            "as a class",
            "image_dir",
            "data.split_from",
        )
    folders: dict[str, str] = {}
    for name, split in named.items():
        if split in folders:
            raise ConfigError(
                f"{{0}}: {display_path(root)} has two folders for the {split} split "
                f"({folders[split]} and {name}); merge them",
                "image_dir",
            )
        folders[split] = name
    return folders


def scan_split_folders(
    image_dir: str | os.PathLike,
    folders: dict[str, str],
    validation_percentage: float,
    testing_percentage: float,
    split_hash: str = "basename",
) -> ImageSet:
    """The images of a pre-split folder (`folders` from `find_split_folders`): each split
    folder's files in its split, but a split without a folder takes its percentage of the
    training folder's files by the hash of `split_hash` (spelled as
    `image_dir/<train folder>/<class>/<file>` for "path").

    Raises ConfigError (naming `image_dir`) as `scan.scan_image_dir` does.
    """
    check_split_hash(split_hash)
    spelled, root = image_root(image_dir)
    hashed = {
        "validation": 0 if "validation" in folders else validation_percentage,
        "testing": 0 if "testing" in folders else testing_percentage,
    }
    ignored: list[tuple[str, str]] = []
    classes = []
    for split in SPLITS:
        if split not in folders:
            continue
        folder = os.path.join(spelled, folders[split])

        def split_of(name: str, given: str = split) -> str:
            if given != "training":
                return given
            return split_for_file(name, hashed["validation"], hashed["testing"])

        classes += scan_classes(subfolders(folder), folder, split_hash, split_of, ignored)
    # The training folder's classes in its order (a plain folder's), then any others.
    labels = list(dict.fromkeys(found.label for found in classes))
    image_set = image_set_of(root, labels, classes, ignored)
    image_set.split_folders = dict(folders)
    image_set.split_note = _note(root, folders, hashed)
    return image_set


def _note(root: Path, folders: dict[str, str], hashed: dict[str, float]) -> str:
    """The log line saying that the layout was recognised and where each split comes from."""
    parts = [
        f"{split} from {folders[split]}/"
        if split in folders
        else f"{split} {hashed[split]:g}% of {folders['training']}/ by hash"
        for split in SPLITS
        if split in folders or hashed[split]
    ]
    return f"{display_path(root)} is split into folders: " + ", ".join(parts)
