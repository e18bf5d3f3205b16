"""The scan-and-split stage: a run's images, labels and splits, as the config says.

Class folders (`scan`), split folders holding them (`layout`) or a CSV of labels (`labels_csv`)
give the images; where the splits came from and warnings about the data are logged, and the
split manifest is written if the config names one.
"""

from __future__ import annotations

import logging

from retrain.config import RetrainConfig
from retrain.data import labels_csv, scan

log = logging.getLogger("retrain")


def scan_images(config: RetrainConfig, write_manifest: bool = True) -> scan.ImageSet:
    """The scan-and-split stage: classes, images and their splits, with warnings logged and
    the split manifest written if the config names one (and `write_manifest`)."""
    data = config.data
    image_set = labels_csv.find_images(config.image_dir, data)
    if image_set.split_note:
        log.info("%s", image_set.split_note)
    folders = image_set.split_folders or {}
    needed = tuple(
        split
        for split, pct in (
            ("validation", data.validation_percentage),
            ("testing", data.testing_percentage),
        )
        if pct > 0 or split in folders
    )
    for warning in scan.check_splits_populated(image_set, needed):
        log.warning(warning)
    for path, reason in image_set.ignored:
        log.warning("Ignoring %s: %s", path, reason)
    if image_set.unlisted:
        log.warning(
            "Ignoring %d image files under %s that %s does not list",
            image_set.unlisted,
            config.image_dir,
            data.labels_csv,
        )
    counts = image_set.split_counts()
    log.info(
        "Found %d %s, %d images (training %d, validation %d, testing %d)",
        len(image_set.labels),
        "labels" if image_set.multi_label else "classes",
        len(image_set),
        counts["training"],
        counts["validation"],
        counts["testing"],
    )
    if config.outputs.split_manifest and write_manifest:
        scan.write_split_manifest(image_set, config.outputs.split_manifest)
    return image_set
