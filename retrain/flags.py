"""The retrain command's flags: retrain.py's names and defaults, plus our additions.

Every value is checked by `check_flags` before any heavy work, and each problem is reported as
one line naming the flag (exit status 2).
"""

from __future__ import annotations

import os
import re

from absl import flags

from retrain.atomic import check_writable_dir, check_writable_file
from retrain.decode import DEFAULT_MAX_IMAGE_PIXELS
from retrain.distribute import STRATEGIES, read_tf_config
from retrain.errors import UsageError

DEFAULT_MODULE = "efficientnet_lite0"


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
    flags.DEFINE_float(
        "learning_rate", 0.01, "How large a learning rate to use when training.", flag_values=f
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
        ["auto", "tensorflow", "tflite"],
        "What runs the module to compute bottlenecks: tflite (XNNPACK, fastest on CPU), "
        "tensorflow, or auto (tflite on CPU if it reproduces TensorFlow's features to 1e-4, "
        "else tensorflow; tensorflow on GPU).",
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
    flags.DEFINE_float(
        "fine_tune_learning_rate",
        1e-3,
        "Learning rate of fine-tuning (SGD with momentum 0.9). Keep it small, about a tenth of "
        "--learning_rate: a large one overwrites the pretrained weights instead of adjusting "
        "them, and the features the new layer was trained on are lost.",
        flag_values=f,
    )
    flags.DEFINE_integer(
        "fine_tune_batch_size",
        32,
        "Images per fine-tuning step (the global batch, split over the replicas).",
        flag_values=f,
    )


def _looks_like_url(handle: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*://", handle) is not None


def check_flags(f: flags.FlagValues) -> None:
    """Raise UsageError for the first invalid flag value, naming the flag."""
    if not f.image_dir:
        raise UsageError("--image_dir is required: a folder with one subfolder of images per class")
    if not os.path.isdir(os.path.expanduser(f.image_dir)):
        raise UsageError(f"--image_dir: folder not found: {f.image_dir}")
    positive = (
        "how_many_training_steps",
        "eval_step_interval",
        "train_batch_size",
        "extraction_batch_size",
        "max_image_pixels",
        "fine_tune_batch_size",
    )
    for name in positive:
        if f[name].value <= 0:
            raise UsageError(f"--{name} must be positive, got {f[name].value}")
    for name in ("test_batch_size", "validation_batch_size"):
        value = f[name].value
        if value == 0 or value < -1:
            raise UsageError(f"--{name} must be positive or -1 (all), got {value}")
    if f.intermediate_store_frequency < 0:
        raise UsageError(
            "--intermediate_store_frequency must be 0 (off) or positive, got "
            f"{f.intermediate_store_frequency}"
        )
    if f.fine_tune_steps < 0:
        raise UsageError(f"--fine_tune_steps must be 0 (off) or positive, got {f.fine_tune_steps}")
    for name in ("learning_rate", "fine_tune_learning_rate"):
        if not f[name].value > 0:
            raise UsageError(f"--{name} must be positive, got {f[name].value}")
    for name in ("testing_percentage", "validation_percentage"):
        if not 0 <= f[name].value < 100:
            raise UsageError(f"--{name} must be between 0 and 100, got {f[name].value}")
    if f.testing_percentage + f.validation_percentage >= 100:
        raise UsageError(
            "--testing_percentage + --validation_percentage must be below 100 (no images "
            f"would be left for training), got {f.testing_percentage + f.validation_percentage}"
        )
    if f.assert_accuracy_at_least is not None and not 0 <= f.assert_accuracy_at_least <= 1:
        raise UsageError(
            "--assert_accuracy_at_least is a fraction between 0 and 1, got "
            f"{f.assert_accuracy_at_least}"
        )
    for name in ("random_crop", "random_scale", "random_brightness"):
        if f[name].value < 0:
            raise UsageError(f"--{name} must be a non-negative percentage, got {f[name].value}")
    if f.flip_left_right or f.random_crop or f.random_scale or f.random_brightness:
        raise UsageError(
            "--flip_left_right/--random_crop/--random_scale/--random_brightness: "
            "distortions are not supported yet; run without them"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.\-/]+", f.final_tensor_name):
        raise UsageError(f"--final_tensor_name is not a valid node name: {f.final_tensor_name!r}")
    if f.distribution_strategy == "mirrored" and f.extraction_backend == "tflite":
        raise UsageError(
            "--extraction_backend=tflite runs on the CPU; it cannot be combined with "
            "--distribution_strategy=mirrored"
        )
    if f.distribution_strategy == "multi_worker_mirrored":
        read_tf_config()  # a missing or invalid TF_CONFIG is a UsageError naming the flag
    if f.resume and not f.checkpoint_path:
        raise UsageError("--resume needs --checkpoint_path")
    _check_module_handle(f.tfhub_module)
    _check_output_paths(f)


def _check_module_handle(handle: str) -> None:
    from retrain.models.registry import list_bundled_models

    if not handle:
        raise UsageError("--tfhub_module must not be empty")
    if _looks_like_url(handle) or os.path.isdir(os.path.expanduser(handle)):
        return
    if handle in list_bundled_models():
        return
    if os.path.sep in handle or handle.startswith("."):
        raise UsageError(f"--tfhub_module: folder not found: {handle}")
    raise UsageError(
        f"--tfhub_module: unknown module {handle!r}; bundled modules: "
        f"{', '.join(list_bundled_models())}; or give a TF Hub URL or a SavedModel "
        "folder"
    )


def _check_output_paths(f: flags.FlagValues) -> None:
    files = ["output_graph", "output_labels", "output_tflite", "split_manifest", "metrics_json"]
    dirs = [
        "bottleneck_dir",
        "summaries_dir",
        "saved_model_dir",
        "checkpoint_path",
        "module_cache_dir",
    ]
    if f.intermediate_store_frequency > 0:
        dirs.append("intermediate_output_graphs_dir")
    for name in files:
        if f[name].value and (problem := check_writable_file(f[name].value)):
            raise UsageError(f"--{name}: cannot write there: {problem}")
    for name in dirs:
        if f[name].value and (problem := check_writable_dir(f[name].value)):
            raise UsageError(f"--{name}: cannot write there: {problem}")
