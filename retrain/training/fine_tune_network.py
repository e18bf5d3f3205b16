"""Fine-tuning the whole network after the new layer was trained on bottlenecks.

The recipe that keeps the pretrained features: first the base is frozen and only the new layer
is trained (on cached bottlenecks, `retrain.training.head`), then the module and the layer are
trained
together at a small learning rate, on decoded images. BatchNorm stays in inference mode (moving
statistics), so small batches do not overwrite the statistics learnt on ImageNet.

Training is data-parallel over any ``tf.distribute`` strategy (None: TensorFlow's default):
each global batch is split over the replicas, the loss is summed over the replicas and divided
by the global batch size, and the optimizer all-reduces the gradients. Once the module is
fine-tuned, cached bottlenecks no longer describe it, so the test split is evaluated on images.

With validation images, fine-tuning is safe (`retrain.training.early_stopping`): the network is
evaluated
on them every `log_every` steps, the rate is lowered on a plateau of their loss, fine-tuning
stops early when they stop improving, and the best network seen is kept, the head alone (step 0)
included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from retrain.bottlenecks import distort, distribute, extract
from retrain.config import DEFAULT_MAX_IMAGE_PIXELS, DistortionConfig, FineTuningConfig
from retrain.data.sampling import random_picks
from retrain.errors import RetrainError
from retrain.heads.evaluation import Evaluation
from retrain.heads.head import Head
from retrain.models.loading import ImageModule
from retrain.models.rebuild import CheckpointedNetwork, copy_values, rebuild
from retrain.training.activity import PROBE_IMAGES, ActivityProbe
from retrain.training.early_stopping import (
    VALIDATION_IMAGES,
    DecodedImages,
)
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
from retrain.training.lr_find import RateSearch
from retrain.utils.interrupt import check as check_interrupt

if TYPE_CHECKING:
    from retrain.bottlenecks.stage import Bottlenecks

log = logging.getLogger(__name__)

# The learning-rate finder for fine-tuning: a few hundred images, a range test of few steps.
FIND_IMAGES = 300


@dataclass(frozen=True)
class LabeledImages:
    """Image files with their labels (in their head's form, see retrain.heads.head)."""

    paths: Sequence[str | Path]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


class FineTuneModel(tf.Module):
    """The image module followed by a dense layer initialised from the trained one."""

    def __init__(self, module_object: Any, weights: np.ndarray, biases: np.ndarray):
        super().__init__(name="fine_tune")
        self.module = module_object
        self.final_weights = tf.Variable(weights.astype(np.float32), name="final_weights")
        self.final_biases = tf.Variable(biases.astype(np.float32), name="final_biases")
        self._training_arg = _takes_training_arg(module_object)
        self.trainable = [*module_trainable_variables(module_object)]
        self.trainable += [self.final_weights, self.final_biases]

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        """Logits of `images` (float32 [b, h, w, 3] in [0, 1]); BatchNorm in inference mode."""
        if self._training_arg:
            features = self.module(images, training=False)
        else:
            features = self.module(images)
        return tf.matmul(features, self.final_weights) + self.final_biases


def module_trainable_variables(module_object: Any) -> list[tf.Variable]:
    """The module's trainable variables (TF Hub's reusable SavedModel attribute)."""
    variables = list(getattr(module_object, "trainable_variables", None) or [])
    if not variables:
        raise RetrainError(
            "{0}: the module has no trainable_variables (not a reusable TF2 "
            "SavedModel), so it cannot be fine-tuned; run with {0}=0",
            "fine_tuning.steps",
        )
    return variables


def _takes_training_arg(module_object: Any) -> bool:
    """Whether the module's __call__ was saved with a `training` argument."""
    functions = getattr(module_object.__call__, "concrete_functions", None) or []
    return any(
        len(fn.structured_input_signature[0]) > 1 or "training" in fn.structured_input_signature[1]
        for fn in functions
    )


def training_order(count: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the images of `steps` batches: seeded shuffles of all `count`, one epoch after
    another (the same for every worker, so a multi-worker run agrees on its batches)."""
    needed = steps * batch_size
    rng = np.random.default_rng(seed)
    epochs = -(-needed // count)
    return np.concatenate([rng.permutation(count) for _ in range(epochs)])[:needed]


def training_dataset(
    images: LabeledImages,
    input_size: tuple[int, int],
    head: Head,
    settings: FineTuningConfig,
    seed: int,
    max_pixels: int,
    errors: dict[int, str],
    distortions: DistortionConfig | None = None,
) -> tf.data.Dataset:
    """`settings.steps` global batches of (pixels, labels, ok), shuffled with `seed`, each
    image distorted afresh (`distort`) if `distortions` are active.

    Decoding is `extract.decoded_batches`'s; an image that no longer decodes has ok=False and
    weighs nothing in the loss. Shardable by data, for MultiWorkerMirroredStrategy.
    """
    order = training_order(len(images), settings.steps, settings.batch_size, seed)
    labels = tf.constant(head.label_array(np.asarray(images.labels)[order]))
    paths = [images.paths[i] for i in order]
    if distortions is not None and distortions.active:
        params = np.random.default_rng([seed, 1]).random((len(order), distort.PARAMS), np.float32)
        batches = distort.distorted_batches(
            paths, params, distortions, input_size, settings.batch_size, errors, max_pixels
        )
    else:
        batches = extract.decoded_batches(
            paths, input_size, settings.batch_size, errors, max_pixels
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return batches.map(
        lambda positions, pixels, ok: (pixels, tf.gather(labels, positions), ok)
    ).with_options(options)


def evaluate_images(
    extractor: Any,
    images: LabeledImages,
    head: Head,
    weights: np.ndarray,
    biases: np.ndarray,
    input_size: tuple[int, int],
    batch_size: int,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Evaluation | None:
    """Evaluate module (`extractor`: images -> features) + layer + `head` on image files;
    None if there are none.

    Images that no longer decode are left out.
    """
    if not len(images):
        return None
    errors: dict[int, str] = {}
    labels = np.asarray(images.labels)
    chunks = []
    for positions, pixels, ok in extract.decoded_batches(
        images.paths, input_size, batch_size, errors, max_pixels
    ):
        check_interrupt()
        keep = ok.numpy()
        chunks.append((extractor(pixels)[keep], labels[positions.numpy()[keep]]))
    return head.evaluate(weights, biases, chunks)


def fine_tune(
    module: ImageModule,
    head: Head,
    layer: tuple[np.ndarray, np.ndarray],
    train: LabeledImages,
    test: LabeledImages,
    settings: FineTuningConfig,
    strategy: tf.distribute.Strategy | None = None,
    options: FineTuneOptions = DEFAULT_OPTIONS,
) -> FineTuneResult:
    """Fine-tune `module` and the trained `layer` (weights, biases) of `head` on `train`'s
    images (distorted afresh if `options.distortions` are active) for `settings.steps` steps of
    `settings.batch_size`, logging every `options.log_every` steps.

    With `options.validation` images (a seeded VALIDATION_IMAGES of them, decoded once), the
    network is evaluated on them before the first step and every `log_every` steps; the
    "plateau" schedule watches their cross-entropy; fine-tuning stops after `settings.patience`
    evaluations without a better one; and the result holds the best network seen that beats
    the head alone beyond noise (`best_step`; 0 is the head alone, see
    `FineTuneResult.head_alone` and `early_stopping`). Without, the last step's network.

    The module is loaded afresh under `strategy`'s scope. `test` is evaluated before and after.
    Every worker of a multi-worker strategy must call this with the same arguments; only the
    chief writes TensorBoard scalars to `options.summaries_dir`/fine_tune. Raises RetrainError
    when there is nothing to train on or a replica would get an empty piece of each batch.
    """
    if not len(train):
        raise RetrainError("fine-tuning: no training images to fine-tune on")
    active = strategy or tf.distribute.get_strategy()
    check_batch(settings, active)
    module_object = distribute.load_module(module, strategy)
    with active.scope():
        module_object = checkpointed(module, module_object)
        model = FineTuneModel(module_object, *layer)
        optimizer = optimizer_for(model, settings)
    log.info(
        "Fine-tuning the whole network: %d steps of %d images, learning rate %g, %d replica(s)",
        settings.steps,
        settings.batch_size,
        settings.learning_rate,
        active.num_replicas_in_sync,
    )
    extractor = distribute.mirrored_backend(module_object, strategy)
    size, batch, max_pixels = module.input_size, settings.batch_size, options.max_pixels
    evaluate = partial(_evaluate, extractor, model, head, test, size, batch, max_pixels)
    before = log_test("before", evaluate())
    watch, plateau = watch_validation(
        _validation_evaluator(extractor, head, size, batch, options), model, optimizer, settings
    )
    errors: dict[int, str] = {}
    dataset = active.experimental_distribute_dataset(
        training_dataset(
            train, size, head, settings, options.seed, max_pixels, errors, options.distortions
        )
    )
    job = Guarded(
        model,
        head,
        optimizer,
        active,
        dataset,
        watch,
        plateau,
        probe=lambda: ActivityProbe.for_module(
            module, module_object, probe_images(train, size, max_pixels)
        ),
        evaluate_test=evaluate,
        before=before,
        exportable=lambda: _exportable(module, module_object, strategy),
    )
    tuned = run_guarded(job, settings, size, options)
    if errors:
        log.warning("Fine-tuning: %d training image(s) no longer decode; left out", len(errors))
    return tuned


def _validation_evaluator(
    extractor: Any,
    head: Head,
    input_size: tuple[int, int],
    batch_size: int,
    options: FineTuneOptions,
) -> Callable[[np.ndarray, np.ndarray], Evaluation] | None:
    """The evaluation of a layer on a seeded VALIDATION_IMAGES of the validation images,
    decoded once (None: there are none that decode)."""
    validation = options.validation
    if validation is None or not len(validation):
        return None
    validation = subset(validation, VALIDATION_IMAGES, options.seed)
    decoded = DecodedImages.decode(
        validation.paths, validation.labels, input_size, options.max_pixels
    )
    if not len(decoded):
        return None
    return partial(decoded.evaluate, extractor, head, batch_size=batch_size)


def search_rate(
    module: ImageModule,
    head: Head,
    layer: tuple[np.ndarray, np.ndarray],
    train: LabeledImages,
    settings: FineTuningConfig,
    *,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    distortions: DistortionConfig | None = None,
) -> RateSearch:
    """The learning-rate finder for fine-tuning (see retrain.training.lr_find): the module with the
    trained `layer` on top, trained on a seeded FIND_IMAGES of `train` in batches of
    `settings.batch_size` while the rate grows from FIND_MIN_RATE to FIND_MAX_RATE over at
    most FIND_STEPS steps. Nothing it trains is kept."""
    search_settings = replace(
        settings, steps=FIND_STEPS, learning_rate=FIND_MIN_RATE, lr_schedule="constant"
    )
    strategy = tf.distribute.get_strategy()
    model = FineTuneModel(checkpointed(module, module.load()), *layer)
    optimizer = optimizer_for(model, search_settings)
    images = subset(train, FIND_IMAGES, seed)
    batches = training_dataset(
        images, module.input_size, head, search_settings, seed, max_pixels, {}, distortions
    )
    iterator = iter(strategy.experimental_distribute_dataset(batches))
    step = make_train_step(strategy, model, head, optimizer, settings.batch_size)
    log.info(
        "Fine-tuning's learning-rate finder: up to %d steps of %d of %d training images",
        FIND_STEPS,
        settings.batch_size,
        len(images),
    )
    return find_rate(step, iterator, optimizer)


def _evaluate(
    extractor: Any,
    model: FineTuneModel,
    head: Head,
    images: LabeledImages,
    input_size: tuple[int, int],
    batch_size: int,
    max_pixels: int,
) -> Evaluation | None:
    return evaluate_images(
        extractor,
        images,
        head,
        model.final_weights.numpy(),
        model.final_biases.numpy(),
        input_size,
        batch_size,
        max_pixels,
    )


def probe_images(train: LabeledImages, input_size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """The sparsity probe's images: the first PROBE_IMAGES training images that decode, as
    the module takes them."""
    first = DecodedImages.decode(
        train.paths[:PROBE_IMAGES], train.labels[:PROBE_IMAGES], input_size, max_pixels
    )
    return first.pixels.astype(np.float32) / 255


def checkpointed(module: ImageModule, module_object: Any) -> Any:
    """`module_object` as fine-tuning runs it: a bundled EfficientNet-Lite rebuilt with its
    weights as a CheckpointedNetwork (its gradients recompute each block's activations: a
    third of the memory, for about a third more time a step); any other module as it is."""
    net = rebuild(module, module_object)
    if net is None:
        return module_object
    log.info("Fine-tuning: activations recomputed block by block in the backward pass")
    return CheckpointedNetwork(net)


def _exportable(module: ImageModule, module_object: Any, strategy: Any) -> Any:
    """The fine-tuned module as export takes it: a loaded module with plain variables. A
    rebuilt network's or distributed variables are copied into a fresh load of the module."""
    if strategy is None and not isinstance(module_object, CheckpointedNetwork):
        return module_object
    plain = module.load()
    copy_values(module_object.variables, plain.variables)
    return plain


def split_images(bottlenecks: Bottlenecks, name: str) -> LabeledImages:
    """The image files and labels of one split ("training", "validation", "testing")."""
    return LabeledImages(bottlenecks.paths_of(name), bottlenecks.labels[bottlenecks.in_split(name)])


def subset(images: LabeledImages, size: int, seed: int) -> LabeledImages:
    """A seeded random `size` of `images` (in their order); all of them if size <= 0."""
    if not 0 < size < len(images):
        return images
    picks = random_picks(len(images), size, seed)  # the same draw as the cached test subset
    return LabeledImages([images.paths[i] for i in picks], np.asarray(images.labels)[picks])
