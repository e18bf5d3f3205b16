"""Every flag of `retrain`, by concern: its name, the setting it sets, its help.

The table holds no type, default or choice: those come from the setting in `retrain.config`
(see `retrain.cli.flags`, which defines the flags, renders `--help` and docs/flags.md from it).
Within a group the common flags are marked and listed first.
"""

from __future__ import annotations

import dataclasses

from retrain.config.presets import PRESETS


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag: its name, the setting it sets (`command.*`: a setting of the command itself,
    `CommandOptions`), its help; `common` ones are listed first."""

    name: str
    field: str
    help: str
    common: bool = False


@dataclasses.dataclass(frozen=True)
class Group:
    """Flags of one concern, as `--help` and docs/flags.md list them."""

    title: str
    flags: tuple[Flag, ...]


GROUPS = (
    Group(
        "Preset",
        (
            Flag(
                "preset",
                "preset",
                "A measured set of settings for a goal: "
                + ", ".join(f"{name} ({preset.description})" for name, preset in PRESETS.items())
                + ". Each flag given on the command line wins over the preset's value; the log"
                " says what the preset set.",
                common=True,
            ),
        ),
    ),
    Group(
        "Data and split",
        (
            Flag(
                "image_dir",
                "image_dir",
                "Path to folders of labeled images (one per class).",
                common=True,
            ),
            Flag(
                "testing_percentage",
                "data.testing_percentage",
                "What percentage of images to use as a test set.",
            ),
            Flag(
                "validation_percentage",
                "data.validation_percentage",
                "What percentage of images to use as a validation set.",
            ),
            Flag(
                "labels_csv",
                "data.labels_csv",
                "Multi-label data: a CSV with the header path,label1,label2,... and per image"
                " its path relative to --image_dir and 0 or 1 per label, used instead of "
                "class folders; trains a sigmoid output per label (empty: class folders).",
                common=True,
            ),
            Flag(
                "split_hash",
                "data.split_hash",
                "What a file's split is a hash of: basename (its name: the split survives "
                "moving the folder) or path (the path as retrain.py globbed it from "
                "--image_dir: retrain.py's split exactly, for the same --image_dir string).",
            ),
            Flag(
                "split_from",
                "data.split_from",
                "Where the split comes from: folders (train/, val/ and test/ folders under "
                "--image_dir, each holding the class folders, or a split column in "
                "--labels_csv; a split without a folder is taken from train by the hash), "
                "hash (the hash of each file's name, as retrain.py: top folders are classes), "
                "auto (folders when they are there, else hash).",
            ),
            Flag(
                "max_image_pixels",
                "data.max_image_pixels",
                "Images with more pixels are skipped (a guard against decompression bombs).",
            ),
        ),
    ),
    Group(
        "Module and bottleneck cache",
        (
            Flag(
                "tfhub_module",
                "module.handle",
                "Image feature-vector module: a bundled name (efficientnet_lite0), a TF Hub "
                "URL, or a local TF2 SavedModel directory.",
                common=True,
            ),
            Flag(
                "bottleneck_dir",
                "cache.bottleneck_dir",
                "Path to cache bottleneck layer values.",
                common=True,
            ),
            Flag(
                "extraction_backend",
                "module.extraction_backend",
                "What runs the module to compute bottlenecks: tflite (float, XNNPACK, fastest "
                "on a CPU without int8 dot products), tensorflow, tflite_int8 (the module "
                "quantized to int8, calibrated on 300 of the training images; its vectors are "
                "cached apart from float ones), or auto: tflite_int8 on a CPU with AVX512_VNNI "
                "or AVX_VNNI (about 2.3x float) for 10,000 images or more (where the int8 "
                "conversion pays back) unless fine-tuning, distorting afresh or "
                "mirrored needs float; else tflite if it reproduces TensorFlow's features to "
                "1e-4, else tensorflow; tensorflow on GPU.",
            ),
            Flag(
                "extraction_batch_size",
                "module.extraction_batch_size",
                "Images per batch when computing bottlenecks.",
            ),
            Flag(
                "module_cache_dir",
                "module.cache_dir",
                "Where bundled modules are converted and kept (default: $RETRAIN_CACHE_DIR or"
                " ~/.cache/retrain).",
            ),
        ),
    ),
    Group(
        "Training the new layer",
        (
            Flag(
                "how_many_training_steps",
                "training.how_many_training_steps",
                "How many training steps to run before ending.",
                common=True,
            ),
            Flag(
                "learning_rate",
                "training.learning_rate",
                "How large a learning rate to use when training; 'auto': the learning-rate "
                "finder's suggestion (see --lr_find).",
                common=True,
            ),
            Flag(
                "lr_find",
                "command.lr_find",
                "Find a learning rate instead of training: train the new layer briefly over a"
                " range of rates on the cached bottlenecks, print loss against rate and a "
                "suggested rate, exit.",
                common=True,
            ),
            Flag(
                "train_batch_size",
                "training.train_batch_size",
                "How many images to train on at a time.",
            ),
            Flag(
                "eval_step_interval",
                "training.eval_step_interval",
                "How often to evaluate the training results.",
            ),
            Flag(
                "validation_batch_size",
                "training.validation_batch_size",
                "How many images to use in an evaluation batch; -1 uses the entire validation set.",
            ),
            Flag(
                "random_seed",
                "training.random_seed",
                "Seed for batch sampling and initialisation.",
            ),
            Flag(
                "optimizer",
                "training.optimizer",
                "Optimizer of the new layer: sgd (retrain.py's), momentum (0.9), adam or rmsprop.",
            ),
            Flag(
                "lr_schedule",
                "training.lr_schedule",
                "Learning rate over the run: constant; cosine (decays to 0 at the last step);"
                " or plateau (multiplied by --lr_plateau_factor after --lr_plateau_patience "
                "evaluations without a lower validation cross-entropy, as Keras' "
                "ReduceLROnPlateau).",
            ),
            Flag(
                "lr_plateau_factor",
                "training.plateau_factor",
                "With --lr_schedule=plateau: the factor.",
            ),
            Flag(
                "lr_plateau_patience",
                "training.plateau_patience",
                "With --lr_schedule=plateau: evaluations without improvement before lowering.",
            ),
            Flag(
                "label_smoothing",
                "training.label_smoothing",
                "Train towards (1 - s) * one-hot + s / classes instead of one-hot.",
            ),
            Flag(
                "dropout_rate",
                "training.dropout_rate",
                "Fraction of the bottleneck's values dropped at random in each training step.",
            ),
            Flag(
                "weight_decay",
                "training.weight_decay",
                "Decoupled weight decay of the new layer's weights (each step, w -= rate * "
                "decay * w).",
            ),
            Flag(
                "sampling",
                "training.sampling",
                "How training batches draw images: class_balanced (retrain.py's: a class "
                "uniformly, then one of its images, so every class is seen equally often; not"
                " with --labels_csv), uniform (every image equally often: a small class is "
                "seen rarely), or auto (class_balanced for class folders, uniform with "
                "--labels_csv).",
            ),
            Flag(
                "class_weights",
                "training.class_weights",
                "Weight of each class in the loss: none, or balanced (n / (classes * "
                "n_class); with --labels_csv, each label's positives weigh n_negative / "
                "n_positive).",
            ),
            Flag(
                "checkpoint_path",
                "training.checkpoint_path",
                "Folder for training checkpoints (empty: none); with --resume, an interrupted"
                " run continues from the last one.",
            ),
            Flag(
                "resume",
                "training.resume",
                "Resume training from --checkpoint_path.",
            ),
        ),
    ),
    Group(
        "Distortions",
        (
            Flag(
                "flip_left_right",
                "distortions.flip_left_right",
                "Whether to randomly flip half of the training images horizontally.",
                common=True,
            ),
            Flag(
                "distorted_copies",
                "distortions.copies",
                "With a distortion flag: how many distorted copies of each training image to "
                "compute once and cache with the bottlenecks (training then runs at cached "
                "speed); 0 distorts afresh at every step, as retrain.py did.",
                common=True,
            ),
            Flag(
                "random_crop",
                "distortions.random_crop",
                "A percentage determining how much of a margin to randomly crop off the "
                "training images.",
            ),
            Flag(
                "random_scale",
                "distortions.random_scale",
                "A percentage determining how much to randomly scale up the size of the "
                "training images by.",
            ),
            Flag(
                "random_brightness",
                "distortions.random_brightness",
                "A percentage determining how much to randomly multiply the training image "
                "input pixels up or down by.",
            ),
        ),
    ),
    Group(
        "Fine-tuning",
        (
            Flag(
                "fine_tune_steps",
                "fine_tuning.steps",
                "After training the new layer, fine-tune the whole network (module and layer)"
                " for this many steps on decoded training images (logged every "
                "--eval_step_interval steps); 0 (default) is off.",
                common=True,
            ),
            Flag(
                "fine_tune_from",
                "fine_tuning.from_block",
                "Fine-tune only from this block of the bundled EfficientNet-Lite up "
                "(block<N>, <N>, or head): the activations below are computed once per image "
                "and cached under --bottleneck_dir, so steps need no decoding and no pass "
                "through the frozen blocks. Empty: the whole network.",
                common=True,
            ),
            Flag(
                "fine_tune_learning_rate",
                "fine_tuning.learning_rate",
                "Learning rate of fine-tuning (SGD with momentum 0.9). Keep it small, about a"
                " tenth of --learning_rate: a large one overwrites the pretrained weights "
                "instead of adjusting them, and the features the new layer was trained on are"
                " lost. 'auto': the suggestion of a learning-rate finder run on a few hundred"
                " training images first.",
            ),
            Flag(
                "fine_tune_lr_schedule",
                "fine_tuning.lr_schedule",
                "Learning rate over fine-tuning: constant, cosine, or plateau (default: a "
                "tenth after 3 evaluations of the validation images without a better loss; "
                "without validation images, after 10 intervals of --eval_step_interval steps "
                "without a lower training loss).",
            ),
            Flag(
                "fine_tune_batch_size",
                "fine_tuning.batch_size",
                "Images per fine-tuning step (the global batch, split over the replicas).",
            ),
            Flag(
                "fine_tune_patience",
                "fine_tuning.patience",
                "Fine-tuning evaluates the validation images (from a cut all of them, the "
                "whole network up to 512) every --eval_step_interval steps, keeps the best "
                "network that beats the new layer alone beyond noise (else the layer alone) and"
                " stops after this many evaluations without a better one, counted from a third of "
                "the steps on (at most step 100: validation first dips while the pretrained "
                "blocks move); 0: runs every step (still keeping the best).",
            ),
        ),
    ),
    Group(
        "Evaluation and reports",
        (
            Flag(
                "test_batch_size",
                "evaluation.test_batch_size",
                "How many images to test on; -1 uses the entire test set.",
            ),
            Flag(
                "print_misclassified_test_images",
                "evaluation.print_misclassified_test_images",
                "Whether to print out a list of all misclassified test images.",
            ),
            Flag(
                "assert_accuracy_at_least",
                "command.assert_accuracy_at_least",
                "Exit with status 3 if the final test accuracy (0..1) is below this, or the "
                "accuracy of an exported model that does not reproduce the trained one's "
                "scores (a quantized .tflite) on the images the export check ran.",
            ),
            Flag(
                "report_html",
                "outputs.report_html",
                "Write a self-contained HTML report here: curves, per-class table, confusion "
                "matrix, misclassified thumbnails, health findings (with --audit: the audit's"
                " findings).",
                common=True,
            ),
            Flag(
                "metrics_json",
                "outputs.metrics_json",
                "Write the run's results as JSON here.",
                common=True,
            ),
            Flag(
                "summaries_dir",
                "outputs.summaries_dir",
                "Where to save summary logs for TensorBoard.",
                common=True,
            ),
            Flag(
                "split_manifest",
                "outputs.split_manifest",
                "Write a CSV path,label,split of every image used.",
            ),
        ),
    ),
    Group(
        "Export",
        (
            Flag(
                "output_graph",
                "export.output_graph",
                "Where to save the trained frozen graph.",
                common=True,
            ),
            Flag(
                "output_labels",
                "export.output_labels",
                "Where to save the trained graph's labels.",
                common=True,
            ),
            Flag(
                "output_tflite",
                "export.output_tflite",
                "Also write the classifier as a TFLite model here (empty: none); label-image "
                "runs it without importing TensorFlow.",
                common=True,
            ),
            Flag(
                "quantize",
                "export.quantize",
                "Quantization of --output_tflite: none (float32), dynamic (int8 weights), "
                "float16 (float16 weights), int8 (int8 weights and activations, calibrated on"
                " a fixed few hundred training images). The run checks every exported model "
                "on the test split.",
                common=True,
            ),
            Flag(
                "tflite_int8_io",
                "export.tflite_int8_io",
                "With --quantize=int8: int8 input and output tensors (for integer-only "
                "accelerators); otherwise they stay float32.",
            ),
            Flag(
                "saved_model_dir",
                "export.saved_model_dir",
                "Where to save the exported SavedModel (empty: none).",
            ),
            Flag(
                "final_tensor_name",
                "export.final_tensor_name",
                "The name of the output classification layer in the retrained graph.",
            ),
            Flag(
                "intermediate_output_graphs_dir",
                "export.intermediate_output_graphs_dir",
                "Where to save the intermediate graphs.",
            ),
            Flag(
                "intermediate_store_frequency",
                "export.intermediate_store_frequency",
                "How many steps to store intermediate graph; 0 stores none.",
            ),
        ),
    ),
    Group(
        "Outputs",
        (
            Flag(
                "logging_verbosity",
                "command.logging_verbosity",
                "How much to log.",
            ),
        ),
    ),
    Group(
        "Distribution",
        (
            Flag(
                "distribution_strategy",
                "distribution.strategy",
                "How to spread bottleneck extraction and fine-tuning over devices: none; "
                "mirrored (every GPU of this machine, one replica per GPU; TensorFlow "
                "backend); or multi_worker_mirrored (several machines: run the same command "
                "on each, with TF_CONFIG naming the cluster and this worker, and --image_dir "
                "and --bottleneck_dir on a file system all of them share; each worker "
                "computes its share of the bottlenecks, all fine-tune together, and only the "
                "chief writes the outputs).",
            ),
        ),
    ),
    Group(
        "Audit",
        (
            Flag(
                "audit",
                "command.audit",
                "Audit the photos instead of training: suspect labels, duplicates and "
                "outliers, found with the cached bottlenecks; writes CSVs to --audit_dir "
                "(needs retrain[audit]).",
                common=True,
            ),
            Flag(
                "audit_dir",
                "audit.output_dir",
                "Where --audit writes its CSVs.",
            ),
            Flag(
                "audit_folds",
                "audit.folds",
                "--audit: folds of the out-of-sample predictions.",
            ),
            Flag(
                "audit_duplicate_similarity",
                "audit.duplicate_similarity",
                "--audit: cosine similarity of two photos' vectors from which they are "
                "reported as near duplicates.",
            ),
        ),
    ),
)
