"""The cluster of a multi-worker run, from ``$TF_CONFIG`` (TensorFlow's convention), checked
before any heavy work so that a bad one is one line naming the strategy setting."""

from __future__ import annotations

import json
import os
from typing import Any

from retrain.errors import ConfigError

_FIELD = "distribution.strategy"


def read_tf_config() -> dict[str, Any]:
    """``$TF_CONFIG`` parsed and checked for what MultiWorkerMirroredStrategy needs: a
    ``cluster`` with a ``worker`` (or ``chief``) list and a ``task`` naming one of its members.
    Raises ConfigError naming the ``distribution.strategy`` setting."""
    prefix = "{0} multi_worker_mirrored needs TF_CONFIG"
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        raise _tf_config_error(
            f"{prefix}: set it to JSON such as "
            '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}'
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _tf_config_error(f"{prefix} to be JSON: {exc}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise _tf_config_error(f"{prefix} to be a JSON object with 'cluster' and 'task'")
    jobs = {job: cluster[job] for job in ("chief", "worker") if isinstance(cluster.get(job), list)}
    if not any(jobs.values()):
        raise _tf_config_error(f"{prefix}: 'cluster' has no 'worker' (or 'chief') list")
    kind, index = task.get("type"), task.get("index")
    if (
        kind not in jobs
        or not isinstance(index, int)
        or isinstance(index, bool)
        or not 0 <= index < len(jobs[kind])
    ):
        task_text = json.dumps(task)
        raise _tf_config_error(f"{prefix}: 'task' {task_text} names no member of the cluster")
    return config


def _tf_config_error(message: str) -> ConfigError:
    return ConfigError(message, _FIELD)
