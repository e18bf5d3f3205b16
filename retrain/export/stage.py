"""The export stage: the trained classifier written as the config asks (frozen graph, labels,
SavedModel, TFLite), from the fine-tuned network if fine-tuning kept one, else from the
pretrained module with the new layer; and the intermediate graphs written while training."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrain.bottlenecks.stage import LazyModule
from retrain.config import RetrainConfig
from retrain.data import scan
from retrain.export import writer
from retrain.heads.head import Head
from retrain.models import module_cache, quantize
from retrain.models.loading import ImageModule
from retrain.training.fine_tune_loop import FineTuneResult
from retrain.training.head import TrainResult
from retrain.utils.atomic import check_writable_dir, exclusive

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger("retrain")


def export_run(
    config: RetrainConfig,
    labels: list[str],
    module: ImageModule,
    module_object: LazyModule,
    trained: TrainResult,
    tuned: FineTuneResult | None,
    training_paths: scan.PathList,
) -> dict[str, str]:
    """The export stage: the fine-tuned network if `tuned` kept one, else the pretrained module
    with the trained layer; int8 quantization is calibrated on a seeded pick of `training_paths`.
    Returns {setting: path} of the files written."""
    input_size = tuned.input_size if tuned is not None else module.input_size
    representative = quantize.representative_dataset(
        quantize.calibration_paths(training_paths, seed=config.training.random_seed),
        input_size,
        config.data.max_image_pixels,
    )
    if tuned is not None and not tuned.head_alone:
        return writer.export_classifier(
            config.export,
            labels,
            writer.Network(
                lambda: writer.frozen_module_graph_def(tuned.module_object, tuned.input_size),
                lambda: tuned.module_object,
                tuned.input_size,
                f"{module.handle} (fine-tuned)",
            ),
            writer.TrainedLayer(trained.head, tuned.weights, tuned.biases),
            representative,
        )
    return writer.export_classifier(
        config.export,
        labels,
        writer.Network(
            lambda: frozen_module(config, module, module_object),
            module_object.get,
            module.input_size,
            str(module.handle),
        ),
        writer.TrainedLayer(trained.head, trained.weights, trained.biases),
        representative,
    )


def frozen_module(
    config: RetrainConfig, module: ImageModule, module_object: LazyModule
) -> tf.compat.v1.GraphDef:
    """The pretrained module's frozen graph, made once per module and kept in its cache (made
    for this run only, with a warning, when the cache cannot be written)."""
    path = module_cache.frozen_module_path(config.module.cache_dir, module.fingerprint)
    if not path.exists() and (problem := check_writable_dir(path.parent)):
        log.warning("Module cache: cannot keep the frozen module in %s (%s)", path.parent, problem)
        return writer.frozen_module_graph_def(module_object.get(), module.input_size)
    with exclusive(path):  # one process at a time freezes it; the others read its file
        return writer.cached_frozen_module(path, module_object.get, module.input_size)


def intermediate_graph_writer(
    config: RetrainConfig, head: Head, module: ImageModule, module_object: LazyModule
) -> Callable[[int, np.ndarray, np.ndarray], None]:
    """The training callback that writes retrain.py's intermediate graphs: every
    `export.intermediate_store_frequency` steps, the classifier so far as a frozen graph."""
    folder = Path(config.export.intermediate_output_graphs_dir).expanduser()
    frequency = config.export.intermediate_store_frequency
    name = config.export.final_tensor_name

    def on_step(step: int, weights: np.ndarray, biases: np.ndarray) -> None:
        if step % frequency:
            return
        path = folder / f"intermediate_{step}.pb"
        module_graph = frozen_module(config, module, module_object)
        writer.write_frozen_graph(
            writer.classifier_graph_def(module_graph, head, weights, biases, name), path
        )
        log.info("Saved intermediate graph %s", path)

    return on_step
