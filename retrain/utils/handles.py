"""Telling URLs from local paths: one rule for module handles (`tfhub_module`) and for folders
that must be mounted rather than named by URL (Beam's `--image_dir`, `--bottleneck_dir`)."""

from __future__ import annotations

import re

# A scheme (RFC 3986: a letter, then letters, digits, '+', '-', '.') followed by '://'.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def looks_like_url(handle: str) -> bool:
    """Whether `handle` starts with a URL scheme (https://, gs://, hdfs://...)."""
    return _URL.match(handle) is not None
