"""Activation sparsity during fine-tuning: per block of the network, the fraction of zero
activations and of units that never activate, measured on a fixed batch of training images.

A learning rate too high for fine-tuning kills units (their ReLU6 never fires again) and the
model stops learning; these figures show it while it happens. The measure needs the network's
blocks, which a loaded SavedModel does not expose: for the bundled EfficientNet-Lite models the
network is rebuilt in Python and given the fine-tuned weights before each measurement; other
modules have no probe.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import tensorflow as tf

from retrain.models.loading import ImageModule
from retrain.models.rebuild import CheckpointedNetwork, copy_values, rebuild

log = logging.getLogger(__name__)

PROBE_IMAGES = 16


class ActivityProbe:
    """Measures a module's activity per block on fixed images; see the module docstring."""

    def __init__(self, net: Any, images: np.ndarray, module_object: Any = None):
        self.net = net
        self.module_object = module_object  # whose weights are measured; None: net's own
        self.images = tf.constant(images, tf.float32)
        self.names = net.backbone.unit_names()
        self._measure = tf.function(lambda x: net.backbone.activity(net.preprocess(x)))

    @classmethod
    def for_module(
        cls, module: ImageModule, module_object: Any, images: np.ndarray
    ) -> ActivityProbe | None:
        """A probe for a bundled EfficientNet-Lite `module` whose variables match
        `module_object`'s; None for any other module (logged). A network fine-tuning runs
        rebuilt already (a CheckpointedNetwork) is measured as it is."""
        if isinstance(module_object, CheckpointedNetwork) and len(images):
            return cls(module_object.net, images)
        net = rebuild(module, module_object) if len(images) else None
        if net is None:
            log.info("Fine-tuning: no sparsity figures for module %s", module.handle)
            return None
        return cls(net, images, module_object)

    def measure(self) -> dict[str, tuple[float, float]]:
        """{unit name: (zero fraction, never-active fraction)} with the module's weights now."""
        if self.module_object is not None:
            copy_values(self.module_object.variables, self.net.backbone.variables)
        rows = self._measure(self.images).numpy()
        return {name: (float(z), float(d)) for name, (z, d) in zip(self.names, rows)}


def write_activity(activity: dict[str, tuple[float, float]]) -> None:
    """Scalars sparsity/UNIT and dead_units/UNIT, under the writer and step in effect."""
    for name, (zero, dead) in activity.items():
        tf.summary.scalar(f"sparsity/{name}", zero)
        tf.summary.scalar(f"dead_units/{name}", dead)


def summary(activity: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The mean zero fraction and never-active fraction over the units, for the history."""
    values = np.array(list(activity.values()))
    return {"sparsity": float(values[:, 0].mean()), "dead_units": float(values[:, 1].mean())}
