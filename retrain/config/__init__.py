"""What one run does, as frozen dataclasses: the library's one input.

`RetrainConfig` names the image folder and groups every other setting by the stage that reads
it. Hyper-parameters default to retrain.py's values. Output paths default to None, which writes
nothing: the `retrain` command line passes retrain.py's /tmp defaults explicitly.

`RetrainConfig.validate()` checks every value before any heavy work and raises `ConfigError`
naming config fields (`training.learning_rate`), which a command line renders as its flags.
This package imports nothing of retrain but errors and utils: it owns every choice list;
`checks.py` holds the checks `validate()` runs.

    config = RetrainConfig(
        image_dir="flower_photos",
        training=HeadTrainingConfig(how_many_training_steps=500),
        export=ExportConfig(output_graph="out.pb", output_labels="labels.txt"),
    )
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from retrain.config.checks import check_config
from retrain.config.checks import leaf_fields as leaf_fields
from retrain.config.choices import (
    AUTO as AUTO,
)
from retrain.config.choices import (
    CHOICES as CHOICES,
)
from retrain.config.choices import (
    CLASS_WEIGHTS as CLASS_WEIGHTS,
)
from retrain.config.choices import (
    CUT_PATTERN as CUT_PATTERN,
)
from retrain.config.choices import (
    DEFAULT_MAX_IMAGE_PIXELS as DEFAULT_MAX_IMAGE_PIXELS,
)
from retrain.config.choices import (  # re-exported: the choice lists are part of this API
    DEFAULT_MODULE as DEFAULT_MODULE,
)
from retrain.config.choices import (
    EXTRACTION_BACKENDS as EXTRACTION_BACKENDS,
)
from retrain.config.choices import (
    INT8 as INT8,
)
from retrain.config.choices import (
    LOG_LEVELS as LOG_LEVELS,
)
from retrain.config.choices import (
    OPTIMIZERS as OPTIMIZERS,
)
from retrain.config.choices import (
    QUANTIZATIONS as QUANTIZATIONS,
)
from retrain.config.choices import (
    RETRAIN_PY_PATHS as RETRAIN_PY_PATHS,
)
from retrain.config.choices import (
    SAMPLINGS as SAMPLINGS,
)
from retrain.config.choices import (
    SCHEDULES as SCHEDULES,
)
from retrain.config.choices import (
    SPLIT_FROM as SPLIT_FROM,
)
from retrain.config.choices import (
    SPLIT_HASHES as SPLIT_HASHES,
)
from retrain.config.choices import (
    STRATEGIES as STRATEGIES,
)
from retrain.config.presets import DEFAULT_PRESET as DEFAULT_PRESET
from retrain.config.presets import PRESETS as PRESETS
from retrain.config.presets import Preset as Preset
from retrain.config.presets import apply_preset, blame_preset
from retrain.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """Which images are used and how they are split (by the split folders or column people
    made, else by a hash of each file's name)."""

    testing_percentage: int = 10
    validation_percentage: int = 10
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are skipped (bombs)
    split_hash: str = "basename"  # one of SPLIT_HASHES: what a file's split is a hash of
    split_from: str = "auto"  # one of SPLIT_FROM: split folders (or a CSV column), or the hash
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
    # The preset these settings started from (`from_preset`, `--preset`), for the log and the
    # metrics: a record, which sets nothing itself.
    preset: str = DEFAULT_PRESET

    @classmethod
    def from_settings(cls, values: Mapping[str, Any]) -> RetrainConfig:
        """An unchecked config of settings by dotted path (`{"image_dir": "photos",
        "fine_tuning.steps": 100}`), defaults filling the rest. TypeError for a path that is
        no setting."""
        unknown = set(values) - {path for path, _ in leaf_fields(cls(image_dir=""))}
        if unknown:
            raise TypeError(f"{cls.__name__} has no setting {', '.join(sorted(unknown))}")
        return _build(cls, values)

    @classmethod
    def from_preset(
        cls, name: str, image_dir: str, **overrides: Mapping[str, Any]
    ) -> RetrainConfig:
        """An unchecked config of preset `name` (see `PRESETS`) for the photos in `image_dir`.
        Each keyword names a group and the settings of it to give explicitly; they win over
        the preset's:

            RetrainConfig.from_preset("fine_tune", "photos", fine_tuning={"steps": 100})

        Raises ConfigError for an unknown preset, TypeError for an unknown group or setting.
        """
        values: dict[str, Any] = {"image_dir": image_dir}
        for group, settings in overrides.items():
            if not isinstance(settings, Mapping):
                raise TypeError(
                    f"{group}= takes a dict of the settings to give, e.g. {{'steps': 100}}; "
                    f"got {type(settings).__name__}"
                )
            values.update({f"{group}.{key}": value for key, value in settings.items()})
        return cls.from_settings(apply_preset(name, values, given=values))

    def validate(self) -> RetrainConfig:
        """Raise ConfigError for the first invalid setting; return self when all are valid.

        Also checks the file system: the image folder exists, the module handle resolves to
        something, and every output path can be written (missing folders are created). An
        error about a setting that holds the preset's value says so.
        """
        try:
            check_config(self)
        except ConfigError as err:
            raise self.noting_preset(err) from None
        return self

    def noting_preset(self, err: ConfigError) -> ConfigError:
        """`err` with a note naming this config's preset when a setting it names holds the
        preset's value (the user may never have typed it); `err` itself otherwise."""
        return blame_preset(err, self.preset, dict(leaf_fields(self)))


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of config dataclass `cls` from dotted paths -> values; a group (a field
    whose default is a config dataclass) is built the same way, defaults filling the rest."""
    kwargs = {}
    for spec in fields(cls):
        path = prefix + spec.name
        group = spec.default_factory
        if isinstance(group, type) and is_dataclass(group):
            kwargs[spec.name] = _build(group, values, path + ".")
        elif path in values:
            kwargs[spec.name] = values[path]
    return cls(**kwargs)


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
