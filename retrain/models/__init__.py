"""Image modules: bundled pretrained models, conversion to TF2 SavedModels, and resolution.

Importing this package does not import TensorFlow; ``resolve_module`` imports it only when a
module has to be converted or inspected.
"""

from retrain.models.loading import (
    ImageModule,
    ModuleError,
    fingerprint_saved_model,
    resolve_module,
)
from retrain.models.module_cache import default_cache_dir
from retrain.models.registry import BundledModelSpec, get_bundled_model, list_bundled_models
from retrain.models.torch_weights import (
    CorruptWeightsError,
    UnsafeWeightsError,
    WeightsError,
    load_legacy_state_dict,
)

__all__ = [
    "BundledModelSpec",
    "CorruptWeightsError",
    "ImageModule",
    "ModuleError",
    "UnsafeWeightsError",
    "WeightsError",
    "default_cache_dir",
    "fingerprint_saved_model",
    "get_bundled_model",
    "list_bundled_models",
    "load_legacy_state_dict",
    "resolve_module",
]
