"""Partial fine-tuning: the blocks above a cut trained on their cached input activations.

`retrain.training.cut` splits the network and caches the activations at the cut. Training here is
`retrain.training.fine_tune_loop`'s (the same step function, validation watch, plateau, early
stopping,
best
network kept, the head alone included), but each batch is read from the cache and runs only
through the blocks above the cut; validation and test images are evaluated from their cached
activations too. The tuned variables are then copied into a fresh load of the module, which
is exported like any fine-tuned module.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import tensorflow as tf

from retrain.bottlenecks.splits import FeatureSplit
from retrain.bottlenecks.stage import Bottlenecks
from retrain.config import FineTuningConfig
from retrain.errors import RetrainError
from retrain.heads.evaluation import Evaluation
from retrain.heads.head import Head
from retrain.models.loading import ImageModule
from retrain.models.rebuild import copy_values
from retrain.training.activity import ActivityProbe
from retrain.training.cut import CutModule, cut_name
from retrain.training.fine_tune_loop import (
    DEFAULT_OPTIONS,
    FIND_MIN_RATE,
    FIND_STEPS,
    FineTuneOptions,
    FineTuneResult,
    Guarded,
    check_batch,
    find_rate,
    log_test,
    make_train_step,
    optimizer_for,
    run_guarded,
    watch_validation,
)
from retrain.training.fine_tune_network import probe_images, split_images, training_order
from retrain.training.lr_find import RateSearch
from retrain.utils.interrupt import check as check_interrupt

log = logging.getLogger(__name__)

# Batches read ahead of the step that takes them.
PREFETCH_BATCHES = 2


class CutModel(tf.Module):
    """The blocks above a cut, the head and a dense layer initialised from the trained one,
    taking the flattened activations at the cut."""

    def __init__(self, part: CutModule, weights: np.ndarray, biases: np.ndarray):
        super().__init__(name="fine_tune_from_cut")
        self.part = part
        self.final_weights = tf.Variable(weights.astype(np.float32), name="final_weights")
        self.final_biases = tf.Variable(biases.astype(np.float32), name="final_biases")
        self.trainable = [*part.net.backbone.variables_above(part.cut)]
        self.trainable += [self.final_weights, self.final_biases]

    def features(self, activations: tf.Tensor) -> tf.Tensor:
        """The pooled feature vectors of flattened activations [b, h * w * c] at the cut."""
        x = tf.reshape(activations, [-1, *self.part.shape])
        return self.part.net.backbone.above(x, self.part.cut)

    def __call__(self, activations: tf.Tensor) -> tf.Tensor:
        """Logits of flattened activations at the cut."""
        return tf.matmul(self.features(activations), self.final_weights) + self.final_biases


def activation_batches(
    split: FeatureSplit, head: Head, settings: FineTuningConfig, seed: int
) -> tf.data.Dataset:
    """`settings.steps` batches of (activations, labels, ok) read from the cache, the images
    in `fine_tune_network.training_order` (seeded shuffles, epoch after epoch); ok is always
    True."""
    order = training_order(len(split), settings.steps, settings.batch_size, seed)
    labels = head.label_array(split.y[order])
    size = settings.batch_size

    def batches():
        for start in range(0, len(order), size):
            check_interrupt()
            picks = order[start : start + size]
            yield split.read(picks), labels[start : start + size], np.ones(len(picks), bool)

    signature = (
        tf.TensorSpec([None, split.feature_dim], tf.float32),
        head.label_spec(None),
        tf.TensorSpec([None], tf.bool),
    )
    return tf.data.Dataset.from_generator(batches, output_signature=signature).prefetch(
        PREFETCH_BATCHES
    )


def evaluate_activations(
    features: Any,
    split: FeatureSplit,
    head: Head,
    weights: np.ndarray,
    biases: np.ndarray,
    batch_size: int,
) -> Evaluation | None:
    """The evaluation on `split` (cached activations) of `features` (activations -> feature
    vectors) with the layer (`weights`, `biases`) of `head`; None if the split is empty."""
    if not len(split):
        return None
    chunks = []
    for start in range(0, len(split), batch_size):
        check_interrupt()
        rows = np.arange(start, min(start + batch_size, len(split)))
        chunks.append((features(split.read(rows)).numpy(), split.y[rows]))
    return head.evaluate(weights, biases, chunks)


def picked(split: FeatureSplit, size: int, seed: int) -> FeatureSplit:
    """A seeded random `size` of `split`'s rows (the same draw as
    `fine_tune_network.subset`'s); all of
    them if size <= 0."""
    return split.subset(size, seed) if size > 0 else split


def fine_tune_from_cut(
    module: ImageModule,
    part: CutModule,
    head: Head,
    layer: tuple[np.ndarray, np.ndarray],
    activations: Bottlenecks,
    settings: FineTuningConfig,
    strategy: tf.distribute.Strategy | None = None,
    options: FineTuneOptions = DEFAULT_OPTIONS,
) -> FineTuneResult:
    """Fine-tune the blocks of `part`'s network above its cut, its head and the trained
    `layer` (weights, biases) of `head` on the cached `activations` (`retrain.training.cut`)
    of the training images and their cached distorted copies, for `settings.steps` steps of
    `settings.batch_size`, as `fine_tune_network.fine_tune` does: validation (all of its
    images) watched every `options.log_every` steps, the best network
    kept (the head alone included), the test split (a seeded `options.test_images` of it; all
    if <= 0) evaluated before and after.

    `part.net`'s variables must have been made under `strategy`'s scope. The result's module
    is a fresh load of `module` with the tuned weights. Raises RetrainError when there is
    nothing to train on.
    """
    train = activations.training()
    if not len(train):
        raise RetrainError("fine-tuning: no training images to fine-tune on")
    active = strategy or tf.distribute.get_strategy()
    check_batch(settings, active)
    with active.scope():
        model = CutModel(part, *layer)
        optimizer = optimizer_for(model, settings)
    log.info(
        "Fine-tuning from %s up: %d steps of %d cached activations, learning rate %g, "
        "%d replica(s)",
        cut_name(part.cut, len(part.net.backbone.blocks)),
        settings.steps,
        settings.batch_size,
        settings.learning_rate,
        active.num_replicas_in_sync,
    )
    features = tf.function(model.features, reduce_retracing=True)

    def evaluate(split: FeatureSplit, weights: np.ndarray, biases: np.ndarray):
        return evaluate_activations(features, split, head, weights, biases, settings.batch_size)

    test = picked(activations.split("testing"), options.test_images, options.seed)
    evaluate_test = partial(_evaluate_now, evaluate, test, model)
    before = log_test("before", evaluate_test())
    # All of validation: an evaluation reads cached activations, cheap beside the steps.
    validation = activations.split("validation")
    watch, plateau = watch_validation(
        partial(evaluate, validation) if len(validation) else None, model, optimizer, settings
    )
    dataset = active.experimental_distribute_dataset(
        activation_batches(train, head, settings, options.seed)
    )
    job = Guarded(
        model,
        head,
        optimizer,
        active,
        dataset,
        watch,
        plateau,
        probe=partial(_probe, part, module, activations, options.max_pixels),
        evaluate_test=evaluate_test,
        before=before,
        exportable=partial(_exportable, part, module),
    )
    return run_guarded(job, settings, module.input_size, options)


def _probe(
    part: CutModule, module: ImageModule, activations: Bottlenecks, max_pixels: int | None
) -> ActivityProbe | None:
    """The sparsity probe of the network being tuned, on the first training images."""
    if max_pixels is None:
        return None
    images = probe_images(split_images(activations, "training"), module.input_size, max_pixels)
    return ActivityProbe(part.net, images)  # measures the net as it is


def _exportable(part: CutModule, module: ImageModule) -> Any:
    """The loaded module the cut was made from (a fresh load of `module` if none) with the
    tuned network's weights."""
    module_object = part.module_object if part.module_object is not None else module.load()
    copy_values(part.net.backbone.variables, module_object.variables)
    return module_object


def _evaluate_now(evaluate: Any, split: FeatureSplit, model: CutModel) -> Evaluation | None:
    return evaluate(split, model.final_weights.numpy(), model.final_biases.numpy())


def search_rate_from_cut(
    part: CutModule,
    head: Head,
    layer: tuple[np.ndarray, np.ndarray],
    activations: Bottlenecks,
    settings: FineTuningConfig,
    *,
    seed: int = 0,
) -> RateSearch:
    """Fine-tuning's learning-rate finder (`fine_tune_loop.find_rate`) from the cut: the blocks
    above
    it with the trained `layer`, on the cached training activations. Nothing it trains is
    kept: `part.net`'s values are put back afterwards."""
    search_settings = replace(
        settings, steps=FIND_STEPS, learning_rate=FIND_MIN_RATE, lr_schedule="constant"
    )
    strategy = tf.distribute.get_strategy()
    model = CutModel(part, *layer)
    saved = [v.numpy() for v in model.trainable]
    optimizer = optimizer_for(model, search_settings)
    batches = activation_batches(activations.training(), head, search_settings, seed)
    step = make_train_step(strategy, model, head, optimizer, settings.batch_size)
    log.info(
        "Fine-tuning's learning-rate finder from the cut: up to %d steps of %d",
        FIND_STEPS,
        settings.batch_size,
    )
    try:
        return find_rate(step, iter(strategy.experimental_distribute_dataset(batches)), optimizer)
    finally:
        for variable, value in zip(model.trainable, saved, strict=True):
            variable.assign(value)
