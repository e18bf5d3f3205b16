"""The fine-tuning stage: from a run's config, bottlenecks and trained layer to a
`FineTuneResult`, fine-tuning the whole network (`fine_tune_network`) or the blocks above a
cut on their cached activations (`fine_tune_partial`), each finding its learning rate first
when asked ('auto')."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from retrain.bottlenecks import distribute
from retrain.bottlenecks.stage import Bottlenecks, CachedRun
from retrain.config import AUTO, FineTuningConfig, RetrainConfig
from retrain.errors import RetrainError
from retrain.models.loading import ImageModule
from retrain.training import cut, fine_tune_network, fine_tune_partial, lr_find
from retrain.training.fine_tune_loop import FineTuneOptions, FineTuneResult
from retrain.training.head import TrainResult

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger("retrain")


def fine_tune_stage(
    config: RetrainConfig,
    run: CachedRun,
    trained: TrainResult,
    cluster: tf.distribute.Strategy | None,
) -> FineTuneResult:
    """Fine-tune as the config says: above its cut (activations cached into the run's
    bottleneck folder) or the whole network (under `cluster` if given)."""
    if config.fine_tuning.from_block:
        return fine_tune_from_cut(config, run, trained)
    return fine_tune_whole(config, run.module, run.bottlenecks, trained, cluster)


def fine_tune_whole(
    config: RetrainConfig,
    module: ImageModule,
    b: Bottlenecks,
    trained: TrainResult,
    cluster: tf.distribute.Strategy | None,
) -> FineTuneResult:
    """Fine-tune the network on the training split's images, guarded by the validation split's
    and evaluated on the test split's (the configured subset of it). Under `cluster` if given,
    else the configured strategy."""
    strategy = cluster
    if strategy is None:
        strategy = distribute.make_strategy(config.distribution.strategy, log)
    seed = config.training.random_seed
    settings, search = _with_rate(
        config.fine_tuning, partial(search_network_rate, config, module, b, trained)
    )
    tuned = fine_tune_network.fine_tune(
        module,
        trained.head,
        (trained.weights, trained.biases),
        fine_tune_network.split_images(b, "training"),
        fine_tune_network.subset(
            fine_tune_network.split_images(b, "testing"), config.evaluation.test_batch_size, seed
        ),
        settings,
        strategy,
        replace(_options(config), validation=fine_tune_network.split_images(b, "validation")),
    )
    return _finish(tuned, search)


def fine_tune_from_cut(
    config: RetrainConfig, run: CachedRun, trained: TrainResult
) -> FineTuneResult:
    """Fine-tune the blocks above the configured cut on the cached activations there
    (computing what is missing into the run's folder), as `fine_tune_whole` the whole
    network."""
    strategy = distribute.make_strategy(config.distribution.strategy, log)
    part, activations = cut_activations(config, run, strategy)
    module = run.module
    settings, search = _with_rate(
        config.fine_tuning, partial(search_rate_from_cut, config, part, activations, trained)
    )
    tuned = fine_tune_partial.fine_tune_from_cut(
        module,
        part,
        trained.head,
        (trained.weights, trained.biases),
        activations,
        settings,
        strategy,
        replace(_options(config), test_images=config.evaluation.test_batch_size),
    )
    tuned.cut = cut.metrics(part, activations)
    return _finish(tuned, search)


def _finish(tuned: FineTuneResult, search: lr_find.RateSearch | None) -> FineTuneResult:
    """`tuned` with the finder's search (None: the rate was given); logs why the fine-tuned
    steps were thrown away, if they were."""
    tuned.rate_search = search
    discarded = tuned.discarded
    if discarded is not None:
        log.warning("Fine-tuning: %s. Suggestion: %s", discarded.message, discarded.suggestion)
    return tuned


def _with_rate(
    settings: FineTuningConfig, search: Callable[[], lr_find.RateSearch]
) -> tuple[FineTuningConfig, lr_find.RateSearch | None]:
    """`settings` with the finder's suggestion for rate if it is 'auto' (`search()` runs
    the finder), and the search (None when the rate was given)."""
    if settings.learning_rate != AUTO:
        return settings, None
    found = search()
    return replace(settings, learning_rate=found.suggestion), found


def _options(config: RetrainConfig) -> FineTuneOptions:
    """How the config's fine-tuning runs: its scalars, seed, log interval, decoding guard and
    distortions."""
    return FineTuneOptions(
        summaries_dir=config.outputs.summaries_dir,
        seed=config.training.random_seed,
        log_every=max(1, config.training.eval_step_interval),
        max_pixels=config.data.max_image_pixels,
        distortions=config.distortions,
    )


def cut_activations(
    config: RetrainConfig, run: CachedRun, strategy: tf.distribute.Strategy | None = None
) -> tuple[cut.CutModule, Bottlenecks]:
    """The configured cut of the run's module (its network rebuilt under `strategy`'s scope)
    and the activations there of the images whose bottlenecks the run holds, in the same
    order."""
    b = run.bottlenecks
    part = cut.cut_module(run.module, config.fine_tuning.from_block, strategy)
    activations = cut.cut_activations(
        run.image_set,
        part,
        run.folder,
        config.module,
        config.data.max_image_pixels,
        config.distortions,
    )
    if len(activations.paths) != len(b.paths):
        raise RetrainError(
            f"fine-tuning: {len(b.paths) - len(activations.paths)} image(s) could not be read "
            "again for their activations at the cut (changed during the run?); run again"
        )
    return part, activations


def search_fine_tuning_rate(
    config: RetrainConfig, run: CachedRun, trained: TrainResult
) -> lr_find.RateSearch:
    """The learning-rate finder of fine-tuning as the config sets it up (above its cut, or the
    whole network), starting from the trained layer."""
    if config.fine_tuning.from_block:
        part, activations = cut_activations(config, run)
        return search_rate_from_cut(config, part, activations, trained)
    return search_network_rate(config, run.module, run.bottlenecks, trained)


def search_network_rate(
    config: RetrainConfig, module: ImageModule, b: Bottlenecks, trained: TrainResult
) -> lr_find.RateSearch:
    """The range test of whole-network fine-tuning on the training split's images, logged."""
    search = fine_tune_network.search_rate(
        module,
        trained.head,
        (trained.weights, trained.biases),
        fine_tune_network.split_images(b, "training"),
        config.fine_tuning,
        seed=config.training.random_seed,
        max_pixels=config.data.max_image_pixels,
        distortions=config.distortions,
    )
    _log_search(search)
    return search


def search_rate_from_cut(
    config: RetrainConfig, part: cut.CutModule, activations: Bottlenecks, trained: TrainResult
) -> lr_find.RateSearch:
    """The range test of partial fine-tuning on the cached activations at the cut, logged."""
    search = fine_tune_partial.search_rate_from_cut(
        part,
        trained.head,
        (trained.weights, trained.biases),
        activations,
        config.fine_tuning,
        seed=config.training.random_seed,
    )
    _log_search(search)
    return search


def _log_search(search: lr_find.RateSearch) -> None:
    log.info(
        "Fine-tuning's learning-rate finder: %d steps in %.1f s; the loss was lowest at %.2g, "
        "suggested fine-tuning learning rate %g",
        len(search.rates),
        search.seconds,
        search.best_rate,
        search.suggestion,
    )
