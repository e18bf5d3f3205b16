"""What the new layer trains and validates on: the cached vectors of the training split (in
memory when they fit, else streamed from the cache), or the training images distorted afresh at
every step; and the validation split, in memory (a random subset when it is too large)."""

from __future__ import annotations

import logging

from retrain.bottlenecks import distort
from retrain.bottlenecks.splits import Split
from retrain.bottlenecks.stage import Bottlenecks, LazyModule, make_extractor
from retrain.config import RetrainConfig
from retrain.errors import setting_name
from retrain.models.loading import ImageModule
from retrain.training.head import TrainingSource

log = logging.getLogger("retrain")

# A streamed validation split is evaluated on a random subset of at most this many images
# (51 MB of vectors: what a 100k-image run holds, so memory stays flat beyond it).
STREAMED_VALIDATION_ROWS = 10_000


def training_inputs(
    config: RetrainConfig, b: Bottlenecks, module: ImageModule, module_object: LazyModule
) -> tuple[TrainingSource, Split]:
    """The training split (in memory if it fits, else streamed from the cache, or distorted
    afresh at every step) and the validation split."""
    train = training_source(config, b, module, module_object)
    validation = b.split("validation")
    if not validation.fits_in_memory():
        validation = validation.subset(STREAMED_VALIDATION_ROWS, config.training.random_seed)
        log.info("Validating on a random %d of the validation images", len(validation))
    return train, validation.load()


def training_source(
    config: RetrainConfig, b: Bottlenecks, module: ImageModule, module_object: LazyModule
) -> TrainingSource:
    """The training split's vectors, or a stream of freshly distorted ones when the config
    distorts without cached copies."""
    distortions = config.distortions
    if distortions.active and not distortions.copies:
        paths = b.paths_of("training")
        log.info(
            "Distorting the training images afresh at every step (%s); %s would cache "
            "copies instead",
            distort.distortion_id(distortions),
            setting_name("distortions.copies"),
        )
        return distort.DistortedStream(
            paths,
            b.labels[b.in_split("training")],
            distortions,
            make_extractor(
                module,
                module_object,
                config.module,
                config.data.max_image_pixels,
                config.distribution.strategy == "mirrored",
                list(paths[:32]),
            ),
            module.input_size,
            module.feature_dim,
            config.data.max_image_pixels,
        )
    train = b.training()
    if train.fits_in_memory():
        return train.load()
    log.info(
        "Streaming %d training bottlenecks from the cache (%.1f GB)",
        len(train),
        train.nbytes / 1e9,
    )
    return train
