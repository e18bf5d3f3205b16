"""Several devices for one job: ``--distribution_strategy`` and a data-parallel extractor.

``make_strategy`` turns the flag's value into a ``tf.distribute.Strategy`` (or None for
TensorFlow's default strategy), for bottleneck extraction and fine-tuning.
``mirrored_backend`` runs a module with any such strategy: each batch is split in equal, ordered
pieces, one per replica, and the features are gathered back in the input's row order.
For a cluster in ``TF_CONFIG``: ``is_chief``, ``worker_share`` (this worker's part of a list of
images) and ``barrier`` (wait for every worker).

Importing this module does not import TensorFlow; its functions do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retrain.bottlenecks.backends import Extractor, empty_features, tensorflow_backend
from retrain.config import STRATEGIES
from retrain.errors import ConfigError, RetrainError, first_line
from retrain.utils.tf_config import read_tf_config

if TYPE_CHECKING:
    import tensorflow as tf

    from retrain.models.loading import ImageModule

__all__ = [
    "STRATEGIES",
    "barrier",
    "cluster_strategy",
    "cluster_position",
    "is_chief",
    "load_module",
    "make_strategy",
    "mirrored_backend",
    "read_tf_config",
    "worker_share",
]

_FIELD = "distribution.strategy"

_log = logging.getLogger(__name__)


def make_strategy(
    name: str, log: logging.Logger | logging.LoggerAdapter | None = None
) -> tf.distribute.Strategy | None:
    """The strategy for ``--distribution_strategy name`` (one of ``STRATEGIES``).

    ``none``: None, i.e. TensorFlow's default strategy. ``mirrored``: MirroredStrategy over every
    visible GPU (without one, over the logical CPUs: usually a single replica, which is logged).
    ``multi_worker_mirrored``: MultiWorkerMirroredStrategy for the cluster in ``TF_CONFIG``; it
    must be made before TensorFlow runs any op in this process. Raises ConfigError for an unknown
    name or a missing or invalid ``TF_CONFIG``, RetrainError if TensorFlow refuses the strategy.
    """
    log = log or _log
    if name not in STRATEGIES:
        raise ConfigError(
            f"{{0}}: unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}", _FIELD
        )
    if name == "none":
        return None
    if name == "mirrored":
        return _mirrored(log)
    config = read_tf_config()  # before importing TensorFlow: a flag error costs nothing
    import tensorflow as tf

    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except (RuntimeError, ValueError) as exc:
        raise RetrainError(
            f"multi_worker_mirrored: TensorFlow refused the strategy: {first_line(exc)}"
            " (it must be created before TensorFlow runs anything)"
        ) from exc
    log.info(
        "Distribution: multi-worker mirrored, %s %d of a cluster of %d, %d replica(s) in sync",
        config["task"]["type"],
        config["task"]["index"],
        cluster_position()[1],
        strategy.num_replicas_in_sync,
    )
    return strategy


def cluster_strategy(name: str, log: logging.Logger) -> tf.distribute.Strategy | None:
    """The MultiWorkerMirroredStrategy of a multi_worker_mirrored run (made before TensorFlow
    runs any op, as it must be), else None."""
    if name != "multi_worker_mirrored":
        return None
    strategy = make_strategy(name, log)
    if not is_chief():
        log.info(
            "Not the chief: this worker leaves the outputs (graph, labels, SavedModel, TFLite, "
            "metrics, summaries, checkpoints, split manifest) to the chief"
        )
    return strategy


def _mirrored(log: logging.Logger | logging.LoggerAdapter) -> tf.distribute.Strategy:
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy()
    devices = list(strategy.extended.worker_devices)
    if any("GPU" in device.upper() for device in devices):
        log.info("Distribution: mirrored over %d GPU(s): %s", len(devices), ", ".join(devices))
    else:
        log.info(
            "Distribution: mirrored, but no GPU is visible: %d CPU replica(s) (%s)",
            len(devices),
            ", ".join(devices),
        )
    return strategy


def cluster_position() -> tuple[int, int]:
    """(this worker's number, the number of workers) in ``TF_CONFIG``'s cluster, numbered as
    TensorFlow does: the chief (if the cluster has one) is 0, then the workers in order."""
    config = read_tf_config()
    cluster, task = config["cluster"], config["task"]
    chiefs = len(cluster.get("chief") or [])
    number = 0 if task["type"] == "chief" else chiefs + task["index"]
    return number, chiefs + len(cluster.get("worker") or [])


def is_chief() -> bool:
    """Whether this process is the cluster's chief: the ``chief`` task, else worker 0."""
    return cluster_position()[0] == 0


def worker_share(indices: Sequence[int]) -> list[int]:
    """This worker's part of ``indices`` (image numbers): those equal to its number modulo the
    number of workers. Each index falls to exactly one worker, whatever the others' lists."""
    number, count = cluster_position()
    return [i for i in indices if i % count == number]


def barrier(strategy: tf.distribute.Strategy, value: float = 0.0) -> float:
    """Wait until every worker of ``strategy`` has called this; returns the sum of their
    ``value``s (an all-reduce, to which each worker contributes once). Raises RetrainError if
    TensorFlow gives up on a worker (it checks that they are alive)."""
    import tensorflow as tf

    local = len(strategy.extended.worker_devices)
    values = strategy.experimental_distribute_values_from_function(
        # Replicas are numbered worker by worker: the first of each worker holds its value.
        lambda context: tf.constant(
            value if context.replica_id_in_sync_group % local == 0 else 0.0, tf.float64
        )
    )
    try:
        return float(strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None))
    except tf.errors.OpError as exc:
        raise RetrainError(
            f"multi_worker_mirrored: waiting for the other workers failed (did one of "
            f"them stop?): {first_line(exc)}"
        ) from exc


def load_module(module: ImageModule, strategy: tf.distribute.Strategy | None) -> Any:
    """``module.load()`` under ``strategy.scope()``, so each replica reads its own copy of the
    weights (MirroredVariables) instead of fetching them from the first device every batch."""
    if strategy is None:
        return module.load()
    with strategy.scope():
        return module.load()


def mirrored_backend(module_object: Any, strategy: tf.distribute.Strategy | None) -> Extractor:
    """Run a loaded feature-vector module data-parallel over ``strategy``'s replicas.

    Same contract as ``retrain.bottlenecks.backends.Extractor``. Each batch is padded with blank
    rows to a
    multiple of the replica count and split in equal, consecutive pieces; replica ``i`` runs
    piece ``i`` and the pieces are gathered back in order, so row ``k`` of the result is image
    ``k``'s features whatever the batch size. With None this is the plain TensorFlow backend.
    Under MultiWorkerMirroredStrategy every worker must call it with the same batches, in the
    same order (each computes its share; all get all features).
    """
    import tensorflow as tf

    if strategy is None:
        return tensorflow_backend(module_object)
    replicas = int(strategy.num_replicas_in_sync)
    # One worker: concatenate the local results in replica order, with no collective op (they
    # would also clash with another strategy's over the same devices). Several: all-gather.
    local = len(strategy.extended.worker_devices) == replicas

    @tf.function(reduce_retracing=True)
    def features(pieces: Any) -> tf.Tensor:
        per_replica = strategy.run(module_object, args=(pieces,))
        if local:
            return tf.concat(strategy.experimental_local_results(per_replica), axis=0)
        return strategy.gather(per_replica, axis=0)

    def extract(images: Any) -> np.ndarray:
        if not isinstance(images, np.ndarray) and hasattr(images, "numpy"):
            images = images.numpy()
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4:
            raise ValueError(f"expected images [N, H, W, C], got {list(images.shape)}")
        count = len(images)
        if count == 0:
            return empty_features(tf.function(module_object), images.shape)
        rows = -(-count // replicas)  # per replica, rounded up
        if rows * replicas != count:
            blank = np.zeros((rows * replicas - count, *images.shape[1:]), np.float32)
            images = np.concatenate([images, blank])
        pieces = np.split(images, replicas)
        distributed = strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(pieces[context.replica_id_in_sync_group])
        )
        return features(distributed).numpy()[:count]

    return extract
