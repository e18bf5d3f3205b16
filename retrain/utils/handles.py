"""Telling URLs from local paths: one rule for module handles (`tfhub_module`) and for folders
that must be mounted rather than named by URL (Beam's `--image_dir`, `--bottleneck_dir`); TF1
Hub format modules told by their URL (`tf1_hub_module`), before anything is fetched."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import threading
from dataclasses import dataclass

# A scheme (RFC 3986: a letter, then letters, digits, '+', '-', '.') followed by '://'.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def looks_like_url(handle: str) -> bool:
    """Whether `handle` starts with a URL scheme (https://, gs://, hdfs://...)."""
    return _URL.match(handle) is not None


# TF Hub's hosts: the site, its China mirror, and the bucket of its compressed modules.
HUB_HOSTS = ("tfhub.dev", "www.tfhub.dev", "hub.tensorflow.google.cn", "storage.googleapis.com")
# The paths of TF1 Hub format image modules: google/imagenet/<net>/feature_vector|classification
# up to version 3 (version 4 on is TF2), every `quantops` module, every google/efficientnet one.
_IMAGENET = re.compile(
    r"^(?:tfhub-modules/)?google/imagenet/(?P<net>[\w.]+)/(?P<quantops>quantops/)?"
    r"(?:feature_vector|classification)/(?P<version>\d+)(?:\.tar\.gz)?/?$"
)
_EFFICIENTNET = re.compile(
    r"^(?:tfhub-modules/)?google/efficientnet/(?P<net>b\d)/(?:feature-vector|classification)"
    r"/\d+(?:\.tar\.gz)?/?$"
)
_LAST_TF1_VERSION = 3
_SPLIT_URL = re.compile(r"^https?://(?P<host>[^/:?#]+)(?::\d+)?/(?P<path>[^?#]*)")


@dataclass(frozen=True)
class TF1HubModule:
    """A TF Hub handle of a TF1 Hub format image module, recognised by its URL alone."""

    handle: str
    host: str
    tf2_handle: str  # the same network's TF2 feature-vector module


def tf1_hub_module(handle: str) -> TF1HubModule | None:
    """The TF1 Hub format module `handle` names (tfhub.dev/google/imagenet/<net>/feature_vector/1
    to /3, .../classification/1 to /3, any .../quantops/..., google/efficientnet/...), or None
    for any other handle (a TF2 one, a folder, a bundled name). Reads no network."""
    url = _SPLIT_URL.match(handle.strip())
    if url is None or url["host"].lower() not in HUB_HOSTS:
        return None
    host, path = url["host"].lower(), url["path"]
    imagenet = _IMAGENET.match(path)
    if imagenet and (imagenet["quantops"] or int(imagenet["version"]) <= _LAST_TF1_VERSION):
        tf2 = f"https://tfhub.dev/google/imagenet/{imagenet['net']}/feature_vector/4"
        return TF1HubModule(handle, host, tf2)
    efficientnet = _EFFICIENTNET.match(path)
    if efficientnet:
        tf2 = f"https://tfhub.dev/tensorflow/efficientnet/{efficientnet['net']}/feature-vector/1"
        return TF1HubModule(handle, host, tf2)
    return None


def url_host(handle: str) -> str | None:
    """The host of an http(s) URL, else None."""
    url = _SPLIT_URL.match(handle.strip())
    return url["host"].lower() if url else None


def hub_cached(handle: str) -> bool:
    """Whether tensorflow_hub's cache ($TFHUB_CACHE_DIR, else <temp>/tfhub_modules) already
    holds the module `handle` names (a folder named by the SHA-1 of the handle), so that
    resolving it needs no network."""
    root = os.environ.get("TFHUB_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "tfhub_modules")
    folder = os.path.join(root, hashlib.sha1(handle.encode("utf-8")).hexdigest())
    return os.path.isfile(os.path.join(folder, "saved_model.pb"))


# A proxy may reach what a direct connection cannot: then only fetching tells.
_PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def host_reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `host`'s HTTPS port opens within `timeout` seconds, name
    lookup included (False offline: no name resolution or no route fails at once; a lookup
    that hangs counts as offline); True whenever a proxy is set."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            opened.append(True)
        except OSError:
            opened.append(False)

    # getaddrinfo has no timeout of its own: a thread bounds the whole attempt.
    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(timeout)
    return bool(opened and opened[0])
