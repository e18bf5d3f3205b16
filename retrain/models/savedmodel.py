"""Export an image network as a TF2 SavedModel following TF Hub's reusable SavedModel convention.

The saved object has ``__call__(images, training=False)`` (traced for both ``training`` values)
mapping float32 ``[batch, H, W, 3]`` images in ``[0, 1]`` to ``[batch, feature_dim]``, the
attributes ``variables``, ``trainable_variables`` and ``regularization_losses`` (empty), a
``serving_default`` signature ``{'images': ...} -> {'feature_vector': ...}`` and, for
diagnostics, an ``imagenet_logits(images)`` function with the network's classifier.
"""

from __future__ import annotations

import os
from typing import Protocol

import tensorflow as tf

__all__ = ["ImageNetwork", "export_image_module"]


class ImageNetwork(Protocol):
    """What ``export_image_module`` needs from a network (``EfficientNetLite`` provides it)."""

    backbone: tf.Module  # owns exactly the variables that ``features`` uses

    def features(self, images: tf.Tensor) -> tf.Tensor: ...

    def logits(self, images: tf.Tensor) -> tf.Tensor: ...


class _ReusableImageModule(tf.Module):
    # Plain attributes shadowing tf.Module's computed properties, as the convention asks: the
    # classifier's variables are saved (for ``imagenet_logits``) but are not module variables.
    variables = ()
    trainable_variables = ()

    def __init__(self, net: ImageNetwork, input_size: tuple[int, int]) -> None:
        super().__init__(name="image_feature_vector")
        self.net = net
        self.variables = list(net.backbone.variables)
        self.trainable_variables = list(net.backbone.trainable_variables)
        self.regularization_losses = []
        height, width = input_size
        spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="images")
        self.imagenet_logits = tf.function(net.logits, input_signature=[spec])
        self.__call__.get_concrete_function(spec, training=False)
        self.__call__.get_concrete_function(spec, training=True)
        self.input_spec = spec

    @tf.function
    def __call__(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        # BatchNorm uses moving statistics in both modes (frozen-BN fine-tuning).
        del training
        return self.net.features(images)

    def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        """The ``serving_default`` signature body."""
        return {"feature_vector": self.net.features(images)}


def export_image_module(
    net: ImageNetwork, export_dir: str | os.PathLike[str], input_size: tuple[int, int]
) -> None:
    """Write ``net`` as a reusable image feature-vector SavedModel into ``export_dir``."""
    module = _ReusableImageModule(net, input_size)
    serve = tf.function(module.serve, input_signature=[module.input_spec])
    tf.saved_model.save(
        module, os.fspath(export_dir), signatures={"serving_default": serve.get_concrete_function()}
    )
