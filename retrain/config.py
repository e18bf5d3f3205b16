"""What one run does, as frozen dataclasses: the library's one input.

`RetrainConfig` names the image folder and groups every other setting by the stage that reads
it. Hyper-parameters default to retrain.py's values. Output paths default to None, which writes
nothing: the `retrain` command line passes retrain.py's /tmp defaults explicitly.

`RetrainConfig.validate()` checks every value before any heavy work and raises `ConfigError`
naming config fields (`training.learning_rate`), which a command line renders as its flags.
This module imports nothing of retrain but errors and utils: it owns every choice list.

    config = RetrainConfig(
        image_dir="flower_photos",
        training=HeadTrainingConfig(how_many_training_steps=500),
        export=ExportConfig(output_graph="out.pb", output_labels="labels.txt"),
    )
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from retrain.errors import ConfigError
from retrain.utils.atomic import check_writable_dir, check_writable_file
from retrain.utils.handles import looks_like_url
from retrain.utils.tf_config import read_tf_config

DEFAULT_MODULE = "efficientnet_lite0"
OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop")
AUTO = "auto"  # training.learning_rate: the learning-rate finder's suggestion
SCHEDULES = ("constant", "cosine", "plateau")
# "basename": the file's name, stable when the folder moves (ours); "path": the path as
# retrain.py globbed it from --image_dir, to reproduce retrain.py's split exactly.
SPLIT_HASHES = ("basename", "path")
# "auto": class_balanced for class folders (retrain.py's, and what measured best on an
# imbalanced folder), uniform for multi-label data (an image has several classes).
SAMPLINGS = ("auto", "class_balanced", "uniform")
CLASS_WEIGHTS = ("none", "balanced")
# The TFLite export's weights and arithmetic: float32; dynamic-range (int8 weights); float16
# weights; full integer (int8 weights and activations, calibrated on training images).
QUANTIZATIONS = ("none", "dynamic", "float16", "int8")
# fine_tuning.from_block: "block<N>", "<N>" (N, the block's number, is group 1) or "head".
CUT_PATTERN = r"(?:block)?(\d+)|head"
# What runs the module to compute bottlenecks. The int8 backend is asked for by name only, and
# only where training images can calibrate it.
INT8 = "tflite_int8"
EXTRACTION_BACKENDS = ("auto", "tensorflow", "tflite", INT8)
STRATEGIES = ("none", "mirrored", "multi_worker_mirrored")
# 100 megapixels, e.g. 10000x10000: far above any camera, far below what exhausts memory.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR", "FATAL")
# Every setting that takes one of a list, with its list.
CHOICES = {
    "module.extraction_backend": EXTRACTION_BACKENDS,
    "distribution.strategy": STRATEGIES,
    "training.optimizer": OPTIMIZERS,
    "training.lr_schedule": SCHEDULES,
    "fine_tuning.lr_schedule": SCHEDULES,
    "data.split_hash": SPLIT_HASHES,
    "training.sampling": SAMPLINGS,
    "training.class_weights": CLASS_WEIGHTS,
    "export.quantize": QUANTIZATIONS,
    "command.logging_verbosity": LOG_LEVELS,
}
# retrain.py wrote these by default; the library writes nothing unless asked, so the command
# line passes these paths explicitly.
RETRAIN_PY_PATHS = {
    "export.output_graph": "/tmp/output_graph.pb",
    "export.output_labels": "/tmp/output_labels.txt",
    "export.intermediate_output_graphs_dir": "/tmp/intermediate_graph/",
    "outputs.summaries_dir": "/tmp/retrain_logs",
    "cache.bottleneck_dir": "/tmp/bottleneck",
    "audit.output_dir": "/tmp/retrain_audit",
}


@dataclass(frozen=True)
class DataConfig:
    """Which images are used and how they are split (by a hash of each file's name)."""

    testing_percentage: int = 10
    validation_percentage: int = 10
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are skipped (bombs)
    split_hash: str = "basename"  # one of SPLIT_HASHES: what a file's split is a hash of
    labels_csv: str | None = None  # multi-label: path,label1,... rows instead of class folders


@dataclass(frozen=True)
class ModuleConfig:
    """The pretrained image module and what runs it to compute bottlenecks."""

    handle: str = DEFAULT_MODULE  # bundled name, TF Hub URL or SavedModel folder
    cache_dir: str | None = None  # conversions; None: $RETRAIN_CACHE_DIR or ~/.cache/retrain
    extraction_backend: str = "auto"  # one of EXTRACTION_BACKENDS
    extraction_batch_size: int = 32


@dataclass(frozen=True)
class CacheConfig:
    """The bottleneck cache. None keeps the vectors in a temporary folder removed at the end."""

    bottleneck_dir: str | None = None


@dataclass(frozen=True)
class HeadTrainingConfig:
    """Training the new layer on cached bottlenecks (retrain.py's defaults)."""

    how_many_training_steps: int = 4000
    learning_rate: float | str = 0.01  # or AUTO: the learning-rate finder's suggestion
    train_batch_size: int = 100
    eval_step_interval: int = 10
    validation_batch_size: int = 100  # -1: the whole validation split
    random_seed: int = 0
    checkpoint_path: str | None = None  # a folder for checkpoints; None: none
    resume: bool = False  # continue from the last checkpoint in checkpoint_path
    checkpoint_every: int = 500
    optimizer: str = "sgd"  # one of OPTIMIZERS; retrain.py's plain gradient descent
    lr_schedule: str = "constant"  # one of SCHEDULES
    plateau_factor: float = 0.1  # "plateau": the rate is multiplied by this ...
    plateau_patience: int = 10  # ... after this many evaluations without improvement
    label_smoothing: float = 0.0
    dropout_rate: float = 0.0  # of the bottleneck's values, while training
    weight_decay: float = 0.0  # decoupled: each step, weights -= rate * decay * weights
    sampling: str = "auto"  # one of SAMPLINGS: how batches draw examples
    class_weights: str = "none"  # one of CLASS_WEIGHTS: each class's weight in the loss


@dataclass(frozen=True)
class DistortionConfig:
    """retrain.py's distortions of training images (validation and test images never are).

    A crop box of 1 / scale of the photo's height and width is taken at a random place, where
    scale = (1 + random_crop/100) * uniform(1, 1 + random_scale/100); it is flipped left-right
    half of the time (flip_left_right), and its pixels are multiplied by
    uniform(1 - random_brightness/100, 1 + random_brightness/100). With `copies` > 0 each
    training image gets that many distorted copies, computed once and cached with the
    bottlenecks; with 0 (and a distortion) fresh ones are made at every training step.
    """

    flip_left_right: bool = False
    random_crop: int = 0  # percent
    random_scale: int = 0  # percent
    random_brightness: int = 0  # percent
    copies: int = 0

    @property
    def active(self) -> bool:
        """Whether any distortion is asked for."""
        return bool(
            self.flip_left_right or self.random_crop or self.random_scale or self.random_brightness
        )


@dataclass(frozen=True)
class EvaluationConfig:
    """Measuring the trained classifier on the test split."""

    test_batch_size: int = -1  # -1: the whole test split, else a seeded random subset
    print_misclassified_test_images: bool = False


@dataclass(frozen=True)
class FineTuningConfig:
    """Fine-tuning the whole network after the new layer (0 steps: off)."""

    steps: int = 0
    learning_rate: float | str = 1e-3  # or AUTO: the learning-rate finder's suggestion
    batch_size: int = 32  # the global batch, split over the replicas
    # One of SCHEDULES; "plateau" watches the validation loss (the training loss if there are no
    # validation images).
    lr_schedule: str = "plateau"
    patience: int = 6  # stop after this many validation evaluations without a better one; 0: never
    # "" fine-tunes the whole network; "block<N>" (or "<N>") or "head" freezes what is below and
    # trains from cached activations at that cut (retrain.training.cut; bundled EfficientNet-Lite
    # only).
    from_block: str = ""


@dataclass(frozen=True)
class ExportConfig:
    """The trained classifier's files; None writes nothing."""

    output_graph: str | None = None  # frozen GraphDef (.pb)
    output_labels: str | None = None  # one label per line
    output_tflite: str | None = None
    saved_model_dir: str | None = None
    final_tensor_name: str = "final_result"
    intermediate_output_graphs_dir: str | None = None
    intermediate_store_frequency: int = 0  # every this many steps; 0: none
    quantize: str = "none"  # one of QUANTIZATIONS, for output_tflite
    tflite_int8_io: bool = False  # quantize="int8": int8 input and output tensors too


@dataclass(frozen=True)
class DistributionConfig:
    """Several devices or machines for extraction and fine-tuning."""

    strategy: str = "none"  # one of STRATEGIES


@dataclass(frozen=True)
class AuditConfig:
    """The audit of the photos (`retrain.reporting.audit`): suspect labels, duplicates, outliers."""

    output_dir: str | None = None  # one CSV per finding kind; None: none
    folds: int = 5  # out-of-sample predictions: a layer per fold, trained on the others
    duplicate_similarity: float = 0.95  # cosine similarity of vectors from which photos pair


@dataclass(frozen=True)
class OutputsConfig:
    """What a run reports besides the model; None writes nothing."""

    summaries_dir: str | None = None  # TensorBoard logs
    metrics_json: str | None = None
    split_manifest: str | None = None  # CSV path,label,split
    report_html: str | None = None  # one self-contained HTML page: curves, tables, pictures


@dataclass(frozen=True)
class RetrainConfig:
    """Everything one run needs: the image folder and each stage's settings."""

    image_dir: str
    data: DataConfig = field(default_factory=DataConfig)
    module: ModuleConfig = field(default_factory=ModuleConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    training: HeadTrainingConfig = field(default_factory=HeadTrainingConfig)
    distortions: DistortionConfig = field(default_factory=DistortionConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    fine_tuning: FineTuningConfig = field(default_factory=FineTuningConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    distribution: DistributionConfig = field(default_factory=DistributionConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def validate(self) -> RetrainConfig:
        """Raise ConfigError for the first invalid setting; return self when all are valid.

        Also checks the file system: the image folder exists, the module handle resolves to
        something, and every output path can be written (missing folders are created).
        """
        for check in _CHECKS:
            check(self)
        return self


@dataclass(frozen=True)
class CommandOptions:
    """What the `retrain` command does around a run: which job, how much it logs, and the
    accuracy below which it exits with status 3. Not a run's setting: the library has a
    function per job (`run`, `audit_photos`, `find_learning_rate`)."""

    lr_find: bool = False
    audit: bool = False
    assert_accuracy_at_least: float | None = None
    logging_verbosity: str = "INFO"  # one of LOG_LEVELS


def _setting(config_class: type, path: str) -> Any:
    """The dataclass field of setting `path` (`training.learning_rate`) of a config class."""
    group, _, rest = path.partition(".")
    spec = {f.name: f for f in fields(config_class)}[group]
    return _setting(spec.default_factory, rest) if rest else spec


def setting_default(config_class: type, path: str) -> Any:
    """The default of setting `path` of a config dataclass; None where it has none."""
    default = _setting(config_class, path).default
    return None if default is MISSING else default


def setting_type(config_class: type, path: str) -> str:
    """The kind of value setting `path` holds: bool, int, float, rate (a float or AUTO) or str."""
    kinds = {part.strip() for part in str(_setting(config_class, path).type).split("|")}
    kinds -= {"None"}
    return "rate" if kinds == {"float", "str"} else kinds.pop()


def leaf_fields(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every setting of a config, depth first in declaration order."""
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            yield from leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


# ----------------------------------------------------------------------------- checks


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
    if c.distribution.strategy == "mirrored" and backend in ("tflite", INT8):
        raise ConfigError(
            "{0}=" + backend + " runs on the CPU; it cannot be combined with {1}=mirrored",
            "module.extraction_backend",
            "distribution.strategy",
        )
    if backend == INT8 and c.fine_tuning.steps:
        raise ConfigError(
            "{0}=" + INT8 + " trains the layer on int8 features, but fine-tuning runs and "
            "judges the float network: use another backend with {1}",
            "module.extraction_backend",
            "fine_tuning.steps",
        )
    if backend == INT8 and c.distortions.active and not c.distortions.copies:
        raise ConfigError(
            "{0}=" + INT8 + " caches int8 vectors; distort with cached copies ({1}), "
            "not afresh at every step in float",
            "module.extraction_backend",
            "distortions.copies",
        )
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
            get_bundled_model(handle).weights_path()
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


_CHECKS = (
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
