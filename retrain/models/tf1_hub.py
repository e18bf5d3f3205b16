"""TF1 Hub format modules (retrain.py's `hub.Module`s) made TF2 image modules.

A TF1 Hub format module is a TF1 SavedModel with a `tfhub_module.pb` beside it; TF 2 loads it
as tensorflow_hub's `hub.KerasLayer(handle, signature="image_feature_vector",
output_key="default")` does (`tf.compat.v1.saved_model.load_v2` with no tags), but it has no
`__call__`. `convert_tf1_hub` writes a TF2 SavedModel whose `__call__` is that signature's
`default` output, so the rest of retrain (bottlenecks, TFLite, fine-tuning of the head) takes it
as any TF2 module; `retrain.models.loading` keeps the conversion in the module cache.
"""

from __future__ import annotations

import os
import pathlib

from retrain.errors import RetrainError

TF1_HUB_FILE = "tfhub_module.pb"  # what marks a TF1 Hub format module
# The signatures of an image module, in the order they are used; classification modules have
# both, a feature-vector module has image_feature_vector (and default, the same).
SIGNATURES = ("image_feature_vector", "default")
OUTPUT_KEY = "default"
DEFAULT_SIZE = 224


class TF1HubError(RetrainError, ValueError):
    """A TF1 Hub module that is no image module (one-line message)."""


def is_tf1_hub_module(path: pathlib.Path) -> bool:
    """Whether the folder `path` holds a TF1 Hub format module."""
    return (path / TF1_HUB_FILE).is_file()


def convert_tf1_hub(handle: str, source: pathlib.Path, target: pathlib.Path) -> tuple[int, int]:
    """Write to `target` a TF2 SavedModel whose `__call__(images)` ([N, H, W, 3] in [0, 1]) is
    the `image_feature_vector` signature (else `default`) of the TF1 Hub module at `source`;
    returns (height, width) of its input. Raises TF1HubError when `source` has no such
    signature or its output is no [batch, features] tensor."""
    import tensorflow as tf

    loaded = tf.compat.v1.saved_model.load_v2(os.fspath(source), tags=[])
    name = next((s for s in SIGNATURES if s in loaded.signatures), None)
    if name is None:
        raise TF1HubError(
            f"module {handle!r}: a TF1 Hub module without an image_feature_vector or default "
            f"signature (it has {', '.join(sorted(loaded.signatures)) or 'none'})"
        )
    signature = loaded.signatures[name]
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1 or OUTPUT_KEY not in signature.structured_outputs:
        raise TF1HubError(f"module {handle!r}: its {name} signature is not one image input")
    ((key, spec),) = inputs.items()
    size = (spec.shape[1] or DEFAULT_SIZE, spec.shape[2] or DEFAULT_SIZE)
    if signature.structured_outputs[OUTPUT_KEY].shape.rank != 2:
        raise TF1HubError(f"module {handle!r}: its {name} output is not [batch, features]")
    tf.saved_model.save(_wrapped(loaded, signature, key, size), os.fspath(target))
    return int(size[0]), int(size[1])


def _wrapped(loaded, signature, key: str, size: tuple[int, int]):
    """A tf.Module whose `__call__` runs `signature` on its input `key` (the TF1 module's
    variables tracked through `loaded`)."""
    import tensorflow as tf

    class TF1HubImageModule(tf.Module):
        def __init__(self):
            super().__init__()
            self.module = loaded
            self.signature = signature

        @tf.function(input_signature=[tf.TensorSpec([None, *size, 3], tf.float32)])
        def __call__(self, images):
            return self.signature(**{key: images})[OUTPUT_KEY]

    return TF1HubImageModule()


__all__ = ["TF1_HUB_FILE", "TF1HubError", "convert_tf1_hub", "is_tf1_hub_module"]
