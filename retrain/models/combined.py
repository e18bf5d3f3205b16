"""Several bundled networks as one: their feature vectors side by side.

A head trained on EfficientNet-Lite1's and Lite2's features together was 2.8 points more
accurate on clothing_dev than on Lite0's alone, and 2.2-2.6 more than on either part alone
(docs/benchmarks.md, "Backbones"). `CombinedNetwork` makes such a pair one image module, so the
cache, the exports and their clients see a single network: images at the largest part's size,
resized inside for the smaller parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from retrain.models.savedmodel import ImageNetwork

__all__ = ["CombinedNetwork"]


class _Backbones(tf.Module):
    """The parts' backbones: exactly the variables the combined features use."""

    def __init__(self, backbones: Sequence[tf.Module]) -> None:
        super().__init__(name="backbones")
        self.parts = list(backbones)


class CombinedNetwork(tf.Module):
    """`features`: the parts' feature vectors concatenated in order; `logits`: the mean of the
    parts' ImageNet logits. Images come in `[batch, H, W, 3]` in `[0, 1]` at the largest of
    `input_sizes` (one per part, (height, width)); a part whose size differs gets them resized
    bilinearly, as retrain resizes photos for a module."""

    def __init__(
        self, parts: Sequence[ImageNetwork], input_sizes: Sequence[tuple[int, int]]
    ) -> None:
        super().__init__(name="combined")
        if len(parts) != len(input_sizes) or not parts:
            raise ValueError("a combined network needs one input size for each of its parts")
        self.parts = list(parts)
        self.input_sizes = [tuple(size) for size in input_sizes]
        self.input_size = max(self.input_sizes)
        self.backbone = _Backbones([part.backbone for part in parts])

    def _sized(self, images: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
        if size == self.input_size:
            return images
        return tf.image.resize(images, size, method="bilinear")

    def features(self, images: tf.Tensor) -> tf.Tensor:
        """`[batch, H, W, 3]` images in `[0, 1]` -> the parts' features side by side."""
        return tf.concat(
            [
                part.features(self._sized(images, size))
                for part, size in zip(self.parts, self.input_sizes)
            ],
            axis=-1,
        )

    def logits(self, images: tf.Tensor) -> tf.Tensor:
        """`[batch, H, W, 3]` images in `[0, 1]` -> the mean of the parts' ImageNet logits."""
        return tf.add_n(
            [
                part.logits(self._sized(images, size))
                for part, size in zip(self.parts, self.input_sizes)
            ]
        ) / len(self.parts)
