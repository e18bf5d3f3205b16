"""The bundled EfficientNet-Lite modules rebuilt in Python around a loaded module's weights.

A loaded SavedModel hides its blocks. Partial fine-tuning (`retrain.training.cut`) and the sparsity
probe (`retrain.training.activity`) need them, so they rebuild the network from its stage table and
copy
the loaded module's variables into it (the same variables, in the same order: see
`retrain.models.savedmodel`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from retrain.models.efficientnet_lite import LITE_VARIANTS, EfficientNetLite
from retrain.models.loading import ImageModule


def rebuild(module: ImageModule, module_object: Any) -> EfficientNetLite | None:
    """The network of a bundled EfficientNet-Lite `module` with `module_object`'s weights
    copied in; None for any other module, or one whose variables do not fit."""
    variant = module.handle.removeprefix("efficientnet_")
    if variant not in LITE_VARIANTS:
        return None
    net = EfficientNetLite(variant)
    ours, theirs = net.backbone.variables, list(module_object.variables)
    if [v.shape for v in ours] != [v.shape for v in theirs]:
        return None
    copy_values(theirs, ours)
    return net


def copy_values(sources: Sequence[Any], targets: Sequence[Any]) -> None:
    """Assign each source variable's value to the target variable at the same place."""
    for target, source in zip(targets, sources, strict=True):
        target.assign(source.read_value())


class CheckpointedNetwork:
    """A rebuilt network as a module object (called on float images in [0, 1], with
    `variables` and `trainable_variables`) whose backward pass recomputes each block's
    activations from the block's input instead of keeping them (`tf.recompute_grad`).

    Whole-network fine-tuning keeps every intermediate activation of the batch for the
    gradients otherwise: at 224x224 and batch 32 the expanded activations of the early,
    high-resolution blocks alone take gigabytes. Keeping only the blocks' inputs costs one more
    forward pass per step.
    """

    def __init__(self, net: EfficientNetLite):
        import tensorflow as tf

        self.net = net
        self.variables = list(net.backbone.variables)
        self.trainable_variables = list(net.backbone.trainable_variables)
        self._blocks = [tf.recompute_grad(block) for block in net.backbone.blocks]

    def __call__(self, images: Any) -> Any:
        """Feature vectors [n, 1280] of float32 images [n, h, w, 3] in [0, 1]."""
        import tensorflow as tf

        backbone = self.net.backbone
        x = backbone.stem(self.net.preprocess(images))
        for block in self._blocks:
            x = block(x)
        return tf.reduce_mean(backbone.head(x), axis=[1, 2])
