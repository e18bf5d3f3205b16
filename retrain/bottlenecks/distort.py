"""Distorted training images (retrain.py's four flags), made on whole batches.

retrain.py resized each photo to `scale` times the module's input size, with
scale = (1 + random_crop/100) * uniform(1, 1 + random_scale/100), cut out a random crop of the
input size, flipped it left-right half of the time, and multiplied its pixels by
uniform(1 - random_brightness/100, 1 + random_brightness/100). Here the same geometry is a box
of 1/scale of the photo's height and width at a random place, cut and resized by one
`tf.image.crop_and_resize` for the whole batch; the photo is first decoded at the largest scale's
size, so no detail is lost. Pixels stay in [0, 1] (retrain.py let brightness push them above).

Each image's randomness is five numbers (`distortion_params`) drawn from its own seed, so the
distorted copy `c` of a photo is the same whatever batch it lands in: what the bottleneck cache
(and Beam's workers) need to compute each copy once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from retrain.bottlenecks.backends import Extractor
from retrain.bottlenecks.cache import KEY_BYTES
from retrain.bottlenecks.extract import decoded_batches
from retrain.config import DEFAULT_MAX_IMAGE_PIXELS, DistortionConfig
from retrain.data.sampling import draw

if TYPE_CHECKING:
    from retrain.heads.head import Head  # a stream asks the head for its labels' form

# Part of every distorted copy's cache key: bump when the recipe below changes.
DISTORTION_VERSION = 1
# Columns of `distortion_params`: uniform [0, 1) numbers for the scale, the box's top and
# left, the flip and the brightness.
PARAMS = 5


def distortion_id(settings: DistortionConfig) -> str:
    """The recipe of `settings`' distortions, for cache keys: equal ids, equal copies."""
    return (
        f"distort-v{DISTORTION_VERSION}/flip={int(settings.flip_left_right)}"
        f"/crop={settings.random_crop}/scale={settings.random_scale}"
        f"/brightness={settings.random_brightness}"
    )


def source_size(settings: DistortionConfig, input_size: tuple[int, int]) -> tuple[int, int]:
    """The size photos are decoded at: the module's input at the largest scale."""
    largest = (1 + settings.random_crop / 100) * (1 + settings.random_scale / 100)
    return tuple(int(math.ceil(side * largest)) for side in input_size)


def copy_key(key: bytes, settings: DistortionConfig, number: int) -> bytes:
    """The cache key (content or file) of copy `number` that `settings` make of the image whose
    key is `key`: no original, other copy or other recipe has it."""
    recipe = distortion_id(settings).encode()
    data = b"distorted copy\0" + key + b"\0" + recipe + b"\0" + int(number).to_bytes(4, "little")
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()


def copy_params(content_keys: Sequence[bytes]) -> np.ndarray:
    """The distortion parameters of the copies whose content keys (`copy_key`) are given:
    drawn from the key, so a copy is the same on every machine and in every run."""
    return distortion_params([int.from_bytes(key[:8], "little") for key in content_keys])


def distortion_params(seeds: Sequence[int]) -> np.ndarray:
    """float32 [len(seeds), PARAMS] uniform numbers, one row per seed."""
    rows = [np.random.default_rng(seed).random(PARAMS) for seed in seeds]
    return np.asarray(rows, np.float32).reshape(-1, PARAMS)


def distort_batch(
    images: tf.Tensor,
    params: tf.Tensor,
    settings: DistortionConfig,
    input_size: tuple[int, int],
) -> tf.Tensor:
    """Distort float32 images [b, H, W, 3] in [0, 1] (decoded at `source_size`) with `params`
    [b, PARAMS] into module input [b, height, width, 3] in [0, 1]."""
    scale_u, top_u, left_u, flip_u, bright_u = tf.unstack(params, axis=1)
    margin = 1.0 + settings.random_crop / 100.0
    scale = margin * (1.0 + scale_u * settings.random_scale / 100.0)
    side = 1.0 / scale  # of the photo's height and width
    top, left = top_u * (1.0 - side), left_u * (1.0 - side)
    shape = tf.shape(images)
    ys = _sample_span(top, side, shape[1], input_size[0])
    xs = _sample_span(left, side, shape[2], input_size[1])
    boxes = tf.stack([ys[0], xs[0], ys[1], xs[1]], axis=1)
    out = tf.image.crop_and_resize(images, boxes, tf.range(shape[0]), input_size)
    if settings.flip_left_right:
        flip = tf.reshape(flip_u < 0.5, [-1, 1, 1, 1])
        out = tf.where(flip, tf.reverse(out, axis=[2]), out)
    if settings.random_brightness:
        spread = settings.random_brightness / 100.0
        factor = 1.0 - spread + 2.0 * spread * bright_u
        out = tf.clip_by_value(out * tf.reshape(factor, [-1, 1, 1, 1]), 0.0, 1.0)
    return out


def _sample_span(
    start: tf.Tensor, side: tf.Tensor, pixels: tf.Tensor, samples: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """crop_and_resize's box ends (which place its first and last samples on pixel centres,
    normalised by pixels - 1) for resizing the span [start, start + side) of an image axis of
    `pixels` (fractions of its length) to `samples` pixels as a plain resize would: the centre
    of output pixel j falls at start + (j + 0.5) * side / samples."""
    n = tf.cast(pixels, tf.float32)
    step = side * n / samples
    first = start * n + 0.5 * step - 0.5
    last = first + (samples - 1) * step
    return first / (n - 1.0), last / (n - 1.0)


def distorted_batches(
    paths: Sequence[str | Path],
    params: np.ndarray,
    settings: DistortionConfig,
    input_size: tuple[int, int],
    batch_size: int,
    errors: dict[int, str],
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tf.data.Dataset:
    """Like `extract.decoded_batches` (positions, images, ok), with image `i` distorted by
    `params[i]`."""
    table = tf.constant(params, tf.float32)

    def distort(positions: tf.Tensor, images: tf.Tensor, ok: tf.Tensor):
        return (
            positions,
            distort_batch(images, tf.gather(table, positions), settings, input_size),
            ok,
        )

    source = source_size(settings, input_size)
    return decoded_batches(paths, source, batch_size, errors, max_pixels).map(distort).prefetch(2)


@dataclass
class DistortedStream:
    """A training split whose features are computed afresh at every step, from images
    distorted anew (retrain.py's way of distorting): random batches drawn with replacement,
    decoded in parallel, distorted as a batch and run through the module by `extractor`, all
    in one tf.data pipeline (no TensorFlow runs inside a Python generator, which would hang
    the process's exit)."""

    paths: Sequence[str | Path]
    y: np.ndarray
    settings: DistortionConfig
    extractor: Extractor
    input_size: tuple[int, int]
    feature_dim: int
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __len__(self) -> int:
        return len(self.y)

    def dataset(
        self,
        batch_size: int,
        seed: int,
        head: Head,
        cdf: np.ndarray | None = None,
        batches: int | None = None,
    ) -> tf.data.Dataset:
        """`batches` (None: endless) batches of (features [batch, dim], labels in `head`'s
        form), drawn uniformly or by the cumulative probabilities `cdf` (see
        retrain.data.sampling). Give the number a trainer takes: a stream still running after it
        keeps the module busy in tf.data's threads, which hangs the process's exit."""
        labels = tf.constant(head.label_array(self.y))
        params = tf.random.Generator.from_seed(seed + 1)
        picks = tf.data.Dataset.from_generator(
            lambda: self._picks(seed, cdf), output_signature=tf.TensorSpec([], tf.int64)
        )
        if batches is not None:
            picks = picks.take(batches * batch_size)
        errors: dict[int, str] = {}
        source = source_size(self.settings, self.input_size)
        decoded = decoded_batches(
            self.paths, source, batch_size, errors, self.max_pixels, positions=picks
        )

        def features(positions: tf.Tensor, images: tf.Tensor, ok: tf.Tensor):
            drawn = params.uniform([batch_size, PARAMS])
            distorted = distort_batch(images, drawn, self.settings, self.input_size)
            vectors = tf.numpy_function(self.extractor, [distorted], tf.float32)
            vectors.set_shape([batch_size, self.feature_dim])
            batch_labels = tf.gather(labels, positions)
            batch_labels.set_shape([batch_size, *labels.shape[1:]])
            return vectors, batch_labels

        return decoded.map(features).prefetch(2)

    def _picks(self, seed: int, cdf: np.ndarray | None) -> Iterator[int]:
        rng = np.random.default_rng(seed)
        while True:
            yield from draw(rng, len(self), 1024, cdf).tolist()
