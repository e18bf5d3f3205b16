"""The checks `RetrainConfig.validate()` runs: each raises ConfigError naming config fields, before
any heavy work. They also look at the file system: the image folder, the module handle, and
whether every output path can be written."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING, Any

from retrain.config.choices import AUTO, CHOICES, CUT_PATTERN, INT8
from retrain.errors import ConfigError
from retrain.utils.atomic import check_writable_dir, check_writable_file
from retrain.utils.handles import looks_like_url
from retrain.utils.tf_config import read_tf_config

if TYPE_CHECKING:
    from retrain.config import ExportConfig, RetrainConfig


def leaf_fields(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every setting of a config, depth first in declaration order."""
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            yield from leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _check_image_dir(c: RetrainConfig) -> None:
    if not c.image_dir:
        raise ConfigError(
            "{0} is required: a folder with one subfolder of images per class", "image_dir"
        )
    if not os.path.isdir(os.path.expanduser(c.image_dir)):
        raise ConfigError("{0}: folder not found: " + str(c.image_dir), "image_dir")


def _check_counts(c: RetrainConfig) -> None:
    positive = (
        ("training.how_many_training_steps", c.training.how_many_training_steps),
        ("training.eval_step_interval", c.training.eval_step_interval),
        ("training.train_batch_size", c.training.train_batch_size),
        ("module.extraction_batch_size", c.module.extraction_batch_size),
        ("data.max_image_pixels", c.data.max_image_pixels),
        ("fine_tuning.batch_size", c.fine_tuning.batch_size),
        ("training.checkpoint_every", c.training.checkpoint_every),
    )
    for name, value in positive:
        if value <= 0:
            raise ConfigError("{0} must be positive, got " + str(value), name)
    for name, value in (
        ("evaluation.test_batch_size", c.evaluation.test_batch_size),
        ("training.validation_batch_size", c.training.validation_batch_size),
    ):
        if value == 0 or value < -1:
            raise ConfigError("{0} must be positive or -1 (all), got " + str(value), name)
    for name, value in (
        ("export.intermediate_store_frequency", c.export.intermediate_store_frequency),
        ("fine_tuning.steps", c.fine_tuning.steps),
        ("fine_tuning.patience", c.fine_tuning.patience),
    ):
        if value < 0:
            raise ConfigError("{0} must be 0 (off) or positive, got " + str(value), name)
    rates = [
        ("training.learning_rate", c.training.learning_rate),
        ("fine_tuning.learning_rate", c.fine_tuning.learning_rate),
    ]
    for name, value in rates:
        if value == AUTO and c.distribution.strategy == "multi_worker_mirrored":
            raise ConfigError(
                "{0} 'auto' is for one machine: set the rate the finder suggested there "
                "(retrain {1}) for a multi-worker run",
                name,
                "command.lr_find",
            )
        if value == AUTO:
            continue
        if isinstance(value, str) or not value > 0 or math.isinf(value):
            raise ConfigError("{0} must be positive, got " + str(value), name)


def _check_training_options(c: RetrainConfig) -> None:
    t = c.training
    for name, value in (("label_smoothing", t.label_smoothing), ("dropout_rate", t.dropout_rate)):
        if not 0 <= value < 1:
            raise ConfigError("{0} must be in [0, 1), got " + str(value), f"training.{name}")
    if not t.weight_decay >= 0 or math.isinf(t.weight_decay):
        raise ConfigError(
            "{0} must be 0 or positive, got " + str(t.weight_decay), "training.weight_decay"
        )
    if not 0 < t.plateau_factor < 1:
        raise ConfigError(
            "{0} must be between 0 and 1, got " + str(t.plateau_factor), "training.plateau_factor"
        )
    if t.plateau_patience < 1:
        raise ConfigError(
            "{0} must be positive, got " + str(t.plateau_patience), "training.plateau_patience"
        )


def _check_audit(c: RetrainConfig) -> None:
    if c.audit.folds < 2:
        raise ConfigError("{0} must be at least 2, got " + str(c.audit.folds), "audit.folds")
    if not 0 < c.audit.duplicate_similarity <= 1:
        raise ConfigError(
            "{0} is a cosine similarity in (0, 1], got " + str(c.audit.duplicate_similarity),
            "audit.duplicate_similarity",
        )


def _check_labels_csv(c: RetrainConfig) -> None:
    path = c.data.labels_csv
    if path is None:
        return
    if not os.path.isfile(os.path.expanduser(path)):
        raise ConfigError("{0}: file not found: " + str(path), "data.labels_csv")
    if c.training.sampling == "class_balanced":
        raise ConfigError(
            "{0}=class_balanced draws one class per image; with {1} an image has several "
            "labels: use {2}=balanced instead",
            "training.sampling",
            "data.labels_csv",
            "training.class_weights",
        )


def _check_split(c: RetrainConfig) -> None:
    for name in ("testing_percentage", "validation_percentage"):
        value = getattr(c.data, name)
        if not 0 <= value < 100:
            raise ConfigError("{0} must be between 0 and 100, got " + str(value), f"data.{name}")
    total = c.data.testing_percentage + c.data.validation_percentage
    if total >= 100:
        raise ConfigError(
            "{0} + {1} must be below 100 (no images would be left for training), got " + str(total),
            "data.testing_percentage",
            "data.validation_percentage",
        )


def _check_distortions(c: RetrainConfig) -> None:
    d = c.distortions
    for name in ("random_crop", "random_scale", "random_brightness"):
        value = getattr(d, name)
        if value < 0:
            raise ConfigError(
                "{0} must be a non-negative percentage, got " + str(value), f"distortions.{name}"
            )
    if d.random_crop > 100:
        raise ConfigError(
            "{0} is a margin of at most 100 percent, got " + str(d.random_crop),
            "distortions.random_crop",
        )
    if d.random_brightness > 100:
        raise ConfigError(
            "{0} must be at most 100 percent (a multiplier down to 0), got "
            + str(d.random_brightness),
            "distortions.random_brightness",
        )
    if d.copies < 0:
        raise ConfigError(
            "{0} must be 0 (distort on the fly) or positive, got " + str(d.copies),
            "distortions.copies",
        )
    if d.copies and not d.active:
        raise ConfigError(
            "{0} needs a distortion: {1}, {2}, {3} or {4}",
            "distortions.copies",
            "distortions.flip_left_right",
            "distortions.random_crop",
            "distortions.random_scale",
            "distortions.random_brightness",
        )


def int8_conflict(c: RetrainConfig) -> ConfigError | None:
    """Why the int8 backend cannot serve `c` (the error its check raises when asked for by
    name; `auto` then keeps float vectors), or None when it can."""
    if c.distribution.strategy == "mirrored":
        return ConfigError(
            "{0}=" + INT8 + " runs on the CPU; it cannot be combined with {1}=mirrored",
            "module.extraction_backend",
            "distribution.strategy",
        )
    if c.fine_tuning.steps:
        return ConfigError(
            "{0}=" + INT8 + " trains the layer on int8 features, but fine-tuning runs and "
            "judges the float network: use another backend with {1}",
            "module.extraction_backend",
            "fine_tuning.steps",
        )
    if c.distortions.active and not c.distortions.copies:
        return ConfigError(
            "{0}=" + INT8 + " caches int8 vectors; distort with cached copies ({1}), "
            "not afresh at every step in float",
            "module.extraction_backend",
            "distortions.copies",
        )
    return None


def _check_choices(c: RetrainConfig) -> None:
    values = dict(leaf_fields(c))
    for name, choices in CHOICES.items():
        value = values.get(name, choices[0])
        if value not in choices:
            raise ConfigError(
                "{0}: unknown value " + repr(value) + "; choose one of " + ", ".join(choices), name
            )
    name = c.export.final_tensor_name
    if not re.fullmatch(r"[A-Za-z0-9_.\-/]+", name):
        raise ConfigError("{0} is not a valid node name: " + repr(name), "export.final_tensor_name")
    backend = c.module.extraction_backend
    if c.distribution.strategy == "mirrored" and backend == "tflite":
        raise ConfigError(
            "{0}=tflite runs on the CPU; it cannot be combined with {1}=mirrored",
            "module.extraction_backend",
            "distribution.strategy",
        )
    conflict = int8_conflict(c) if backend == INT8 else None
    if conflict is not None:
        raise conflict
    if c.distribution.strategy == "multi_worker_mirrored":
        read_tf_config()  # a missing or invalid TF_CONFIG is an error naming the strategy
    if c.training.resume and not c.training.checkpoint_path:
        raise ConfigError("{0} needs {1}", "training.resume", "training.checkpoint_path")
    _check_quantization(c.export)
    _check_fine_tune_from(c)


def _check_fine_tune_from(c: RetrainConfig) -> None:
    f = c.fine_tuning
    if not f.from_block:
        return
    if not re.fullmatch(CUT_PATTERN, f.from_block):
        raise ConfigError(
            "{0}: " + repr(f.from_block) + " is not a block: give block<N>, <N> or head",
            "fine_tuning.from_block",
        )
    if not f.steps:
        raise ConfigError("{0} needs {1} > 0", "fine_tuning.from_block", "fine_tuning.steps")
    if c.distribution.strategy == "multi_worker_mirrored":
        raise ConfigError(
            "{0} cannot be combined with {1}=multi_worker_mirrored",
            "fine_tuning.from_block",
            "distribution.strategy",
        )
    if c.distortions.active and not c.distortions.copies:
        raise ConfigError(
            "{0} trains on cached activations, so distortions must be cached too: give {1}",
            "fine_tuning.from_block",
            "distortions.copies",
        )


def _check_quantization(e: ExportConfig) -> None:
    if e.quantize != "none" and not e.output_tflite:
        raise ConfigError(
            "{0} quantizes the TFLite model: give {1}", "export.quantize", "export.output_tflite"
        )
    if e.tflite_int8_io and e.quantize != "int8":
        raise ConfigError("{0} needs {1}=int8", "export.tflite_int8_io", "export.quantize")


def _check_module_handle(c: RetrainConfig) -> None:
    from retrain.models.registry import get_bundled_model, list_bundled_models

    handle = c.module.handle
    if not handle:
        raise ConfigError("{0} must not be empty", "module.handle")
    if looks_like_url(handle) or os.path.isdir(os.path.expanduser(handle)):
        return
    if handle in list_bundled_models():
        try:
            get_bundled_model(handle).weights_paths()
        except FileNotFoundError as err:
            raise ConfigError("{0}: " + str(err), "module.handle") from None
        return
    if os.path.sep in handle or handle.startswith("."):
        raise ConfigError("{0}: folder not found: " + handle, "module.handle")
    raise ConfigError(
        "{0}: unknown module "
        + repr(handle)
        + "; bundled modules: "
        + ", ".join(list_bundled_models())
        + "; or give a TF Hub URL or a SavedModel folder",
        "module.handle",
    )


# Output files and folders, in the order they are checked.
OUTPUT_FILES = (
    "export.output_graph",
    "export.output_labels",
    "export.output_tflite",
    "outputs.split_manifest",
    "outputs.metrics_json",
    "outputs.report_html",
)
OUTPUT_DIRS = (
    "cache.bottleneck_dir",
    "outputs.summaries_dir",
    "export.saved_model_dir",
    "training.checkpoint_path",
    "module.cache_dir",
    "audit.output_dir",
)
# Caches that may be read-only (shared on a read-only mount): used for reading all the same.
READABLE_CACHES = ("cache.bottleneck_dir", "module.cache_dir")


def _check_output_paths(c: RetrainConfig) -> None:
    values = dict(leaf_fields(c))
    dirs = list(OUTPUT_DIRS)
    if c.export.intermediate_store_frequency > 0:
        if not c.export.intermediate_output_graphs_dir:
            raise ConfigError(
                "{0} needs {1}",
                "export.intermediate_store_frequency",
                "export.intermediate_output_graphs_dir",
            )
        dirs.append("export.intermediate_output_graphs_dir")
    for names, check in ((OUTPUT_FILES, check_writable_file), (dirs, check_writable_dir)):
        for name in names:
            if values[name] and (problem := check(values[name])):
                if name in READABLE_CACHES and _readable_dir(values[name]):
                    continue  # used for reading; what cannot be kept stays in memory
                raise ConfigError("{0}: cannot write there: " + problem, name)


def _readable_dir(path: str) -> bool:
    return os.path.isdir(full := os.path.expanduser(path)) and os.access(full, os.R_OK | os.X_OK)


CHECKS = (
    _check_image_dir,
    _check_counts,
    _check_training_options,
    _check_audit,
    _check_split,
    _check_labels_csv,
    _check_distortions,
    _check_choices,
    _check_module_handle,
    _check_output_paths,
)


def check_config(config: RetrainConfig) -> None:
    """Raise ConfigError for the first invalid setting of `config`, in CHECKS' order."""
    for check in CHECKS:
        check(config)
