"""The retrain command's flags: retrain.py's names and defaults, plus our additions.

`config_from_flags` turns parsed flags into a `RetrainConfig` (the one place where flags meet
the library) and checks it before any heavy work; each problem is one line naming the flag
(exit status 2). `FLAG_FIELDS` maps every flag to its config setting and back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags

from retrain.bottlenecks.distribute import STRATEGIES
from retrain.config import (
    AUTO,
    CLASS_WEIGHTS,
    DEFAULT_MODULE,
    OPTIMIZERS,
    QUANTIZATIONS,
    SAMPLINGS,
    SCHEDULES,
    SPLIT_HASHES,
    RetrainConfig,
)
from retrain.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from retrain.errors import ConfigError, UsageError


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define all of retrain's flags on `flag_values`."""
    f = flag_values
    # --- retrain.py's flags, same names and defaults ---
    flags.DEFINE_string(
        "image_dir", "", "Path to folders of labeled images (one per class).", flag_values=f
    )
    flags.DEFINE_string(
        "output_graph",
        "/tmp/output_graph.pb",
        "Where to save the trained frozen graph.",
        flag_values=f,
    )
    flags.DEFINE_string(
        "intermediate_output_graphs_dir",
        "/tmp/intermediate_graph/",
        "Where to save the intermediate graphs.",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "intermediate_store_frequency",
        0,
        "How many steps to store intermediate graph; 0 stores none.",
        flag_values=f,
    )
    flags.DEFINE_string(
        "output_labels",
        "/tmp/output_labels.txt",
        "Where to save the trained graph's labels.",
        flag_values=f,
    )
    flags.DEFINE_string(
        "summaries_dir",
        "/tmp/retrain_logs",
        "Where to save summary logs for TensorBoard.",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "how_many_training_steps",
        4000,
        "How many training steps to run before ending.",
        flag_values=f,
    )
    flags.DEFINE(
        _RateParser(),
        "learning_rate",
        0.01,
        "How large a learning rate to use when training; 'auto': the learning-rate finder's "
        "suggestion (see --lr_find).",
        flag_values=f,
    )
    flags.DEFINE_boolean(
        "lr_find",
        False,
        "Find a learning rate instead of training: train the new layer briefly over a range of "
        "rates on the cached bottlenecks, print loss against rate and a suggested rate, exit.",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "testing_percentage", 10, "What percentage of images to use as a test set.", flag_values=f
    )
    flags.DEFINE_integer(
        "validation_percentage",
        10,
        "What percentage of images to use as a validation set.",
        flag_values=f,
    )
    flags.DEFINE_enum(
        "split_hash",
        "basename",
        list(SPLIT_HASHES),
        "What a file's split is a hash of: basename (its name: the split survives moving the "
        "folder) or path (the path as retrain.py globbed it from --image_dir: retrain.py's "
        "split exactly, for the same --image_dir string).",
        flag_values=f,
    )
    flags.DEFINE_string(
        "labels_csv",
        "",
        "Multi-label data: a CSV with the header path,label1,label2,... and per image its path "
        "relative to --image_dir and 0 or 1 per label, used instead of class folders; trains "
        "a sigmoid output per label (empty: class folders).",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "eval_step_interval", 10, "How often to evaluate the training results.", flag_values=f
    )
    flags.DEFINE_integer(
        "train_batch_size", 100, "How many images to train on at a time.", flag_values=f
    )
    flags.DEFINE_integer(
        "test_batch_size",
        -1,
        "How many images to test on; -1 uses the entire test set.",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "validation_batch_size",
        100,
        "How many images to use in an evaluation batch; -1 uses the entire validation set.",
        flag_values=f,
    )
    flags.DEFINE_boolean(
        "print_misclassified_test_images",
        False,
        "Whether to print out a list of all misclassified test images.",
        flag_values=f,
    )
    flags.DEFINE_string(
        "bottleneck_dir", "/tmp/bottleneck", "Path to cache bottleneck layer values.", flag_values=f
    )
    flags.DEFINE_string(
        "final_tensor_name",
        "final_result",
        "The name of the output classification layer in the retrained graph.",
        flag_values=f,
    )
    flags.DEFINE_boolean(
        "flip_left_right",
        False,
        "Whether to randomly flip half of the training images horizontally.",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "random_crop",
        0,
        "A percentage determining how much of a margin to randomly crop off the training images.",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "random_scale",
        0,
        "A percentage determining how much to randomly "
        "scale up the size of the training images by.",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "random_brightness",
        0,
        "A percentage determining how much to randomly "
        "multiply the training image input pixels up or down by.",
        flag_values=f,
    )
    flags.DEFINE_enum(
        "optimizer",
        "sgd",
        list(OPTIMIZERS),
        "Optimizer of the new layer: sgd (retrain.py's), momentum (0.9), adam or rmsprop.",
        flag_values=f,
    )
    flags.DEFINE_enum(
        "lr_schedule",
        "constant",
        list(SCHEDULES),
        "Learning rate over the run: constant; cosine (decays to 0 at the last step); or "
        "plateau (multiplied by --lr_plateau_factor after --lr_plateau_patience evaluations "
        "without a lower validation cross-entropy, as Keras' ReduceLROnPlateau).",
        flag_values=f,
    )
    flags.DEFINE_float(
        "lr_plateau_factor", 0.1, "With --lr_schedule=plateau: the factor.", flag_values=f
    )
    flags.DEFINE_integer(
        "lr_plateau_patience",
        10,
        "With --lr_schedule=plateau: evaluations without improvement before lowering.",
        flag_values=f,
    )
    flags.DEFINE_float(
        "label_smoothing",
        0.0,
        "Train towards (1 - s) * one-hot + s / classes instead of one-hot.",
        flag_values=f,
    )
    flags.DEFINE_float(
        "dropout_rate",
        0.0,
        "Fraction of the bottleneck's values dropped at random in each training step.",
        flag_values=f,
    )
    flags.DEFINE_float(
        "weight_decay",
        0.0,
        "Decoupled weight decay of the new layer's weights (each step, w -= rate * decay * w).",
        flag_values=f,
    )
    flags.DEFINE_enum(
        "sampling",
        "auto",
        list(SAMPLINGS),
        "How training batches draw images: class_balanced (retrain.py's: a class uniformly, "
        "then one of its images, so every class is seen equally often; not with "
        "--labels_csv), uniform (every image equally often: a small class is seen rarely), "
        "or auto (class_balanced for class folders, uniform with --labels_csv).",
        flag_values=f,
    )
    flags.DEFINE_enum(
        "class_weights",
        "none",
        list(CLASS_WEIGHTS),
        "Weight of each class in the loss: none, or balanced (n / (classes * n_class); with "
        "--labels_csv, each label's positives weigh n_negative / n_positive).",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "distorted_copies",
        0,
        "With a distortion flag: how many distorted copies of each training image to compute "
        "once and cache with the bottlenecks (training then runs at cached speed); 0 distorts "
        "afresh at every step, as retrain.py did.",
        flag_values=f,
    )
    flags.DEFINE_string(
        "tfhub_module",
        DEFAULT_MODULE,
        "Image feature-vector module: a bundled name (efficientnet_lite0), a "
        "TF Hub URL, or a local TF2 SavedModel directory.",
        flag_values=f,
    )
    flags.DEFINE_string(
        "saved_model_dir", "", "Where to save the exported SavedModel (empty: none).", flag_values=f
    )
    flags.DEFINE_enum(
        "logging_verbosity",
        "INFO",
        ["DEBUG", "INFO", "WARN", "ERROR", "FATAL"],
        "How much to log.",
        flag_values=f,
    )
    # --- additions ---
    flags.DEFINE_string(
        "output_tflite",
        "",
        "Also write the classifier as a TFLite model here (empty: none); label-image runs it "
        "without importing TensorFlow.",
        flag_values=f,
    )
    flags.DEFINE_string(
        "checkpoint_path",
        "",
        "Folder for training checkpoints (empty: none); "
        "with --resume, an interrupted run continues from the last one.",
        flag_values=f,
    )
    flags.DEFINE_boolean("resume", False, "Resume training from --checkpoint_path.", flag_values=f)
    flags.DEFINE_string(
        "split_manifest", "", "Write a CSV path,label,split of every image used.", flag_values=f
    )
    flags.DEFINE_string("metrics_json", "", "Write the run's results as JSON here.", flag_values=f)
    flags.DEFINE_string(
        "report_html",
        "",
        "Write a self-contained HTML report here: curves, per-class table, confusion matrix, "
        "misclassified thumbnails, health findings (with --audit: the audit's findings).",
        flag_values=f,
    )
    flags.DEFINE_boolean(
        "audit",
        False,
        "Audit the photos instead of training: suspect labels, duplicates and outliers, found "
        "with the cached bottlenecks; writes CSVs to --audit_dir (needs retrain[audit]).",
        flag_values=f,
    )
    flags.DEFINE_string(
        "audit_dir", "/tmp/retrain_audit", "Where --audit writes its CSVs.", flag_values=f
    )
    flags.DEFINE_integer(
        "audit_folds", 5, "--audit: folds of the out-of-sample predictions.", flag_values=f
    )
    flags.DEFINE_float(
        "audit_duplicate_similarity",
        0.95,
        "--audit: cosine similarity of two photos' vectors from which they are reported as "
        "near duplicates.",
        flag_values=f,
    )
    flags.DEFINE_float(
        "assert_accuracy_at_least",
        None,
        "Exit with status 3 if the final test accuracy (0..1) is below this.",
        flag_values=f,
    )
    flags.DEFINE_string(
        "module_cache_dir",
        "",
        "Where bundled modules are converted and kept "
        "(default: $RETRAIN_CACHE_DIR or ~/.cache/retrain).",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "max_image_pixels",
        DEFAULT_MAX_IMAGE_PIXELS,
        "Images with more pixels are skipped (a guard against decompression bombs).",
        flag_values=f,
    )
    flags.DEFINE_enum(
        "distribution_strategy",
        "none",
        list(STRATEGIES),
        "How to spread bottleneck extraction and fine-tuning over devices: none; mirrored "
        "(every GPU of this machine, one replica per GPU; TensorFlow backend); or "
        "multi_worker_mirrored (several machines: run the same command on each, with TF_CONFIG "
        "naming the cluster and this worker, and --image_dir and --bottleneck_dir on a file "
        "system all of them share; each worker computes its share of the bottlenecks, all "
        "fine-tune together, and only the chief writes the outputs).",
        flag_values=f,
    )
    flags.DEFINE_enum(
        "extraction_backend",
        "auto",
        ["auto", "tensorflow", "tflite", "tflite_int8"],
        "What runs the module to compute bottlenecks: tflite (XNNPACK, fastest on CPU), "
        "tensorflow, or auto (tflite on CPU if it reproduces TensorFlow's features to 1e-4, "
        "else tensorflow; tensorflow on GPU). tflite_int8 (never chosen by auto) runs the "
        "module quantized to int8, calibrated on 300 of the training images; its vectors are "
        "cached apart from float ones.",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "extraction_batch_size", 32, "Images per batch when computing bottlenecks.", flag_values=f
    )
    flags.DEFINE_integer(
        "random_seed", 0, "Seed for batch sampling and initialisation.", flag_values=f
    )
    flags.DEFINE_integer(
        "fine_tune_steps",
        0,
        "After training the new layer, fine-tune the whole network (module and layer) for this "
        "many steps on decoded training images (logged every --eval_step_interval steps); "
        "0 (default) is off.",
        flag_values=f,
    )
    flags.DEFINE(
        _RateParser(),
        "fine_tune_learning_rate",
        1e-3,
        "Learning rate of fine-tuning (SGD with momentum 0.9). Keep it small, about a tenth of "
        "--learning_rate: a large one overwrites the pretrained weights instead of adjusting "
        "them, and the features the new layer was trained on are lost. 'auto': the suggestion "
        "of a learning-rate finder run on a few hundred training images first.",
        flag_values=f,
    )
    flags.DEFINE_enum(
        "fine_tune_lr_schedule",
        "plateau",
        list(SCHEDULES),
        "Learning rate over fine-tuning: constant, cosine, or plateau (default: a tenth after 3 "
        "evaluations of the validation images without a better loss; without validation "
        "images, after 10 intervals of --eval_step_interval steps without a lower training "
        "loss).",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "fine_tune_batch_size",
        32,
        "Images per fine-tuning step (the global batch, split over the replicas).",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "fine_tune_patience",
        6,
        "Fine-tuning evaluates up to 256 validation images every --eval_step_interval steps, "
        "keeps the best network seen (the new layer alone included) and stops after this many "
        "evaluations without a better one, counted from a third of the steps on (at most step "
        "100: validation first dips while the pretrained blocks move); 0: runs every step "
        "(still keeping the best).",
        flag_values=f,
    )
    flags.DEFINE_string(
        "fine_tune_from",
        "",
        "Fine-tune only from this block of the bundled EfficientNet-Lite up (block<N>, <N>, or "
        "head): the activations below are computed once per image and cached under "
        "--bottleneck_dir, so steps need no decoding and no pass through the frozen blocks. "
        "Empty: the whole network.",
        flag_values=f,
    )
    flags.DEFINE_enum(
        "quantize",
        "none",
        list(QUANTIZATIONS),
        "Quantization of --output_tflite: none (float32), dynamic (int8 weights), float16 "
        "(float16 weights), int8 (int8 weights and activations, calibrated on a fixed "
        "few hundred training images). The run checks every exported model on the test split.",
        flag_values=f,
    )
    flags.DEFINE_boolean(
        "tflite_int8_io",
        False,
        "With --quantize=int8: int8 input and output tensors (for integer-only accelerators); "
        "otherwise they stay float32.",
        flag_values=f,
    )


# Every flag that is a config setting: flag name -> dotted config path.
FLAG_FIELDS = {
    "image_dir": "image_dir",
    "testing_percentage": "data.testing_percentage",
    "validation_percentage": "data.validation_percentage",
    "max_image_pixels": "data.max_image_pixels",
    "split_hash": "data.split_hash",
    "labels_csv": "data.labels_csv",
    "tfhub_module": "module.handle",
    "module_cache_dir": "module.cache_dir",
    "extraction_backend": "module.extraction_backend",
    "extraction_batch_size": "module.extraction_batch_size",
    "bottleneck_dir": "cache.bottleneck_dir",
    "how_many_training_steps": "training.how_many_training_steps",
    "learning_rate": "training.learning_rate",
    "train_batch_size": "training.train_batch_size",
    "eval_step_interval": "training.eval_step_interval",
    "validation_batch_size": "training.validation_batch_size",
    "random_seed": "training.random_seed",
    "checkpoint_path": "training.checkpoint_path",
    "optimizer": "training.optimizer",
    "lr_schedule": "training.lr_schedule",
    "lr_plateau_factor": "training.plateau_factor",
    "lr_plateau_patience": "training.plateau_patience",
    "label_smoothing": "training.label_smoothing",
    "dropout_rate": "training.dropout_rate",
    "weight_decay": "training.weight_decay",
    "sampling": "training.sampling",
    "class_weights": "training.class_weights",
    "resume": "training.resume",
    "flip_left_right": "distortions.flip_left_right",
    "random_crop": "distortions.random_crop",
    "random_scale": "distortions.random_scale",
    "random_brightness": "distortions.random_brightness",
    "distorted_copies": "distortions.copies",
    "test_batch_size": "evaluation.test_batch_size",
    "print_misclassified_test_images": "evaluation.print_misclassified_test_images",
    "fine_tune_steps": "fine_tuning.steps",
    "fine_tune_learning_rate": "fine_tuning.learning_rate",
    "fine_tune_batch_size": "fine_tuning.batch_size",
    "fine_tune_lr_schedule": "fine_tuning.lr_schedule",
    "fine_tune_patience": "fine_tuning.patience",
    "fine_tune_from": "fine_tuning.from_block",
    "output_graph": "export.output_graph",
    "output_labels": "export.output_labels",
    "output_tflite": "export.output_tflite",
    "saved_model_dir": "export.saved_model_dir",
    "final_tensor_name": "export.final_tensor_name",
    "intermediate_output_graphs_dir": "export.intermediate_output_graphs_dir",
    "intermediate_store_frequency": "export.intermediate_store_frequency",
    "quantize": "export.quantize",
    "tflite_int8_io": "export.tflite_int8_io",
    "distribution_strategy": "distribution.strategy",
    "summaries_dir": "outputs.summaries_dir",
    "metrics_json": "outputs.metrics_json",
    "split_manifest": "outputs.split_manifest",
    "report_html": "outputs.report_html",
    "audit_dir": "audit.output_dir",
    "audit_folds": "audit.folds",
    "audit_duplicate_similarity": "audit.duplicate_similarity",
}
# Flags of the command itself, not of a run: logging and the exit status.
COMMAND_FLAGS = ("logging_verbosity", "assert_accuracy_at_least", "audit", "lr_find")
_FLAG_OF_FIELD = {field: flag for flag, field in FLAG_FIELDS.items()}


class _RateParser(flags.FloatParser):
    """A learning rate: a float, or 'auto' (see retrain.training.lr_find)."""

    def parse(self, argument: Any) -> float | str:
        if isinstance(argument, str) and argument.strip().lower() == AUTO:
            return AUTO
        return super().parse(argument)

    def flag_type(self) -> str:
        return "float or 'auto'"


def flag_for_field(field: str) -> str:
    """The flag (`--learning_rate`) of a config setting (`training.learning_rate`)."""
    return "--" + _FLAG_OF_FIELD.get(field, field)


def config_from_flags(f: flags.FlagValues) -> RetrainConfig:
    """The checked RetrainConfig of parsed flags `f`; raises UsageError naming the flag.

    An empty string flag (no output) becomes None.
    """
    values: dict[str, Any] = {}
    for flag, field in FLAG_FIELDS.items():
        value = f[flag].value
        values[field] = None if value == "" and field != "image_dir" else value
    if not f.audit:
        values["audit.output_dir"] = None  # a training run writes no audit
    config = _build(RetrainConfig, values)
    try:
        config.validate()
    except ConfigError as err:
        raise UsageError(err.render(flag_for_field)) from None
    threshold = f.assert_accuracy_at_least
    if threshold is not None and not 0 <= threshold <= 1:
        raise UsageError(
            f"--assert_accuracy_at_least is a fraction between 0 and 1, got {threshold}"
        )
    return config


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """An instance of config dataclass `cls` from dotted paths -> values; a group (a field
    whose default is a config dataclass) is built the same way, defaults filling the rest."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        path = prefix + field.name
        group = field.default_factory
        if isinstance(group, type) and dataclasses.is_dataclass(group):
            kwargs[field.name] = _build(group, values, path + ".")
        elif path in values:
            kwargs[field.name] = values[path]
    return cls(**kwargs)


__all__ = [
    "COMMAND_FLAGS",
    "FLAG_FIELDS",
    "config_from_flags",
    "define_flags",
    "flag_for_field",
]
