"""retrain: retrain an image classifier on a folder of class subfolders.

    import retrain

    result = retrain.run(retrain.RetrainConfig(image_dir="flower_photos"))
    print(result.test.accuracy, result.labels)

Data flows one way, a package per stage (docs/design.md draws the layers):

    data (files, labels, split) -> bottlenecks (module features, cached; distorted copies) ->
    heads and training (the new layer; fine-tuning) -> evaluation -> export -> reporting

`config` holds every setting (`RetrainConfig`); `pipeline` runs the stages in order and returns
a `RunResult` (`results`). The command lines in `cli` are thin layers over this library.
Importing `retrain` does not import TensorFlow; `run` does.
"""

from __future__ import annotations

from retrain.config import (
    AuditConfig,
    CacheConfig,
    DataConfig,
    DistortionConfig,
    DistributionConfig,
    EvaluationConfig,
    ExportConfig,
    FineTuningConfig,
    HeadTrainingConfig,
    ModuleConfig,
    OutputsConfig,
    RetrainConfig,
)
from retrain.config.presets import PRESETS, Preset
from retrain.errors import ConfigError, RetrainError, UsageError
from retrain.results import RunResult, Timings

__version__ = "0.1.0"

__all__ = [
    "AuditConfig",
    "CacheConfig",
    "ConfigError",
    "DataConfig",
    "DistortionConfig",
    "DistributionConfig",
    "EvaluationConfig",
    "ExportConfig",
    "FineTuningConfig",
    "HeadTrainingConfig",
    "ModuleConfig",
    "OutputsConfig",
    "PRESETS",
    "Preset",
    "RetrainConfig",
    "RetrainError",
    "RunResult",
    "Timings",
    "UsageError",
    "audit_photos",
    "find_learning_rate",
    "run",
]


def audit_photos(config: RetrainConfig):
    """Audit `config`'s photos: suspect labels, duplicates, outliers (an `audit.AuditReport`);
    see `retrain.pipeline.audit_photos` (imports TensorFlow on first call)."""
    from retrain.pipeline import audit_photos as audit_pipeline

    return audit_pipeline(config)


def find_learning_rate(config: RetrainConfig):
    """The learning-rate finder on `config`'s photos (an `lr_find.RateSearch`); see
    `retrain.pipeline.find_learning_rate` (imports TensorFlow on first call)."""
    from retrain.pipeline import find_learning_rate as find_rate

    return find_rate(config)


def run(config: RetrainConfig) -> RunResult:
    """Retrain as `config` says; see `retrain.pipeline.run` (imports TensorFlow on first call)."""
    from retrain.pipeline import run as run_pipeline

    return run_pipeline(config)
