"""Every choice list and fixed default of the settings: the leaf that config and its checks
both read."""

from retrain.config.presets import PRESETS

DEFAULT_MODULE = "efficientnet_lite0"
OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop")
AUTO = "auto"  # training.learning_rate: the learning-rate finder's suggestion
SCHEDULES = ("constant", "cosine", "plateau")
# "basename": the file's name, stable when the folder moves (ours); "path": the path as
# retrain.py globbed it from --image_dir, to reproduce retrain.py's split exactly.
SPLIT_HASHES = ("basename", "path")
# Where the split comes from: "folders", the splits people made (train/ val/ test/ folders
# under the image folder, or the split column of a labels CSV); "hash", retrain.py's hash of
# each file's name; "auto", the folders or column when they are there, else the hash.
SPLIT_FROM = ("auto", "folders", "hash")
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
    "data.split_from": SPLIT_FROM,
    "training.sampling": SAMPLINGS,
    "training.class_weights": CLASS_WEIGHTS,
    "export.quantize": QUANTIZATIONS,
    "command.logging_verbosity": LOG_LEVELS,
    "preset": tuple(PRESETS),
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
