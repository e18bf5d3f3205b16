"""The cut of partial fine-tuning: the network split at a block, its activations there cached.

`--fine_tune_from BLOCK` freezes the stem and the blocks before BLOCK and fine-tunes BLOCK, the
blocks after it and the head, with the new layer. What the frozen part computes never changes,
so it is computed once per image (and per cached distorted copy of a training image) and kept
in the bottleneck cache like a bottleneck: in a folder of its own, keyed by the module's
fingerprint, the cut and the preprocessing (copies add their recipe and number, as bottleneck
copies do), in atomic, checksummed shards, read back batch by batch. Fine-tuning then reads
activations: no decoding, no pass through the frozen blocks.

Only the bundled EfficientNet-Lite modules can be cut: a loaded SavedModel hides its blocks,
so the network is rebuilt in Python around the module's weights (`retrain.models.rebuild`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from retrain.bottlenecks.stage import Bottlenecks, LazyModule, compute_bottlenecks
from retrain.config import CUT_PATTERN, DistortionConfig, ModuleConfig
from retrain.data import scan
from retrain.errors import ConfigError
from retrain.models.efficientnet_lite import LITE_VARIANTS, EfficientNetLite
from retrain.models.loading import ImageModule
from retrain.models.rebuild import rebuild

log = logging.getLogger("retrain")

SETTING = "fine_tuning.from_block"
# Bumped whenever what the frozen part computes, or how it is stored, changes.
CUT_FORMAT = "cut-activations/v1"
# The activations are cached in half precision: half the disk and reads, and a relative
# rounding of 5e-4 (Lite0 from block12: features move by at most 7e-4 of values up to 5.4).
VECTOR_DTYPE = "float16"


def cut_index(value: str, blocks: int) -> int:
    """The block number that `value` names: "block<N>" or "<N>" (0 <= N < `blocks`), or
    "head" (`blocks`: only the final 1x1 convolution is trained). ConfigError otherwise."""
    if value == "head":
        return blocks
    match = re.fullmatch(CUT_PATTERN, value)
    if match is None or int(match.group(1)) >= blocks:
        raise ConfigError(
            "{0}: "
            + repr(value)
            + f" is not a block of this network: give block0 to block{blocks - 1}, or head",
            SETTING,
        )
    return int(match.group(1))


def cut_name(cut: int, blocks: int) -> str:
    """The name of cut `cut` ("block<N>" or "head")."""
    return "head" if cut == blocks else f"block{cut}"


@dataclass(frozen=True)
class CutModule:
    """The frozen part of a bundled module, below a cut, seen as an image module whose feature
    vector is the flattened activations at the cut: what the bottleneck stage computes and
    caches (`compute_bottlenecks` takes it where it takes an ImageModule)."""

    module: ImageModule
    net: EfficientNetLite = field(compare=False, repr=False)
    cut: int
    shape: tuple[int, int, int]  # of the activations at the cut: height, width, channels
    # The loaded module `net` was rebuilt from (plain variables): what the tuned weights are
    # copied into for export.
    module_object: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(
        cls, module: ImageModule, net: EfficientNetLite, cut: int, module_object: Any = None
    ) -> CutModule:
        """The part of `net` (rebuilt from `module`, loaded as `module_object`) below block
        `cut`."""
        height, width = module.input_size
        probe = net.backbone.below(tf.zeros([1, height, width, 3]), cut)
        return cls(module, net, cut, tuple(int(d) for d in probe.shape[1:]), module_object)

    @property
    def handle(self) -> str:
        return f"{self.module.handle} below {cut_name(self.cut, len(self.net.backbone.blocks))}"

    @property
    def path(self) -> Path:
        return self.module.path

    @property
    def input_size(self) -> tuple[int, int]:
        return self.module.input_size

    @property
    def feature_dim(self) -> int:
        return int(np.prod(self.shape))

    vector_dtype = VECTOR_DTYPE

    @property
    def fingerprint(self) -> str:
        text = f"{CUT_FORMAT}\0{VECTOR_DTYPE}\0{self.module.fingerprint}\0{self.cut}"
        return hashlib.sha256(text.encode()).hexdigest()

    def load(self) -> Any:
        """A callable: float32 images [n, h, w, 3] in [0, 1] -> [n, feature_dim] activations."""
        net, cut, dim = self.net, self.cut, self.feature_dim

        def below(images: tf.Tensor) -> tf.Tensor:
            activations = net.backbone.below(net.preprocess(images), cut)
            return tf.reshape(activations, [tf.shape(activations)[0], dim])

        return below


def cut_activations(
    image_set: scan.ImageSet,
    part: CutModule,
    bottleneck_dir: str | Path,
    settings: ModuleConfig,
    max_pixels: int,
    distortions: DistortionConfig | None = None,
) -> Bottlenecks:
    """Every usable image's activations at the cut (and those of the distorted copies of the
    training images, if `distortions.copies`), found in the cache or computed by the
    extraction backend `settings` asks for (`auto`: the frozen part converted to TFLite on a
    CPU, once checked against TensorFlow; about 3x faster) and cached; in the same order as
    the image set's bottlenecks."""
    log.info(
        "Fine-tuning from %s: activations of %d values an image at the cut",
        cut_name(part.cut, len(part.net.backbone.blocks)),
        part.feature_dim,
    )
    return compute_bottlenecks(
        image_set,
        part,  # type: ignore[arg-type]  # an ImageModule in all that extraction reads
        LazyModule(part),  # type: ignore[arg-type]
        bottleneck_dir,
        settings,
        max_pixels,
        distortions=distortions,
    )


def check_cut(module: ImageModule, from_block: str) -> None:
    """ConfigError if `module` cannot be cut at `from_block`: it is not a bundled
    EfficientNet-Lite (only their blocks are known), or has no such block. Builds nothing."""
    variant = LITE_VARIANTS.get(module.handle.removeprefix("efficientnet_"))
    if variant is None:
        raise ConfigError(
            "{0} needs a bundled EfficientNet-Lite module (its blocks are known); "
            + repr(module.handle)
            + " cannot be cut: leave {0} empty to fine-tune the whole network",
            SETTING,
        )
    cut_index(from_block, sum(stage.repeats for stage in variant.stages()))


def cut_module(
    module: ImageModule, from_block: str, strategy: tf.distribute.Strategy | None = None
) -> CutModule:
    """The part of `module` below the block `from_block` names (see `cut_index`), its network
    rebuilt under `strategy`'s scope (None: TensorFlow's default). ConfigError if `module` is
    not a bundled EfficientNet-Lite (nothing else can be cut)."""
    check_cut(module, from_block)
    module_object = module.load()  # outside the scope: export needs plain variables
    with (strategy or tf.distribute.get_strategy()).scope():
        net = rebuild(module, module_object)
    if net is None:
        raise ConfigError("{0}: the weights of " + repr(module.handle) + " do not fit", SETTING)
    cut = cut_index(from_block, len(net.backbone.blocks))
    return CutModule.of(module, net, cut, module_object)


def metrics(part: CutModule, activations: Bottlenecks) -> dict:
    """The cut's figures for --metrics_json: where, how big, how many activations computed."""
    copies = activations.copies
    return {
        "from": cut_name(part.cut, len(part.net.backbone.blocks)),
        "shape": list(part.shape),
        "values_per_image": part.feature_dim,
        "computed": activations.computed + (copies.computed if copies else 0),
        "training_rows": len(activations.training()),
        "seconds": round(activations.seconds + (copies.seconds if copies else 0.0), 3),
    }
