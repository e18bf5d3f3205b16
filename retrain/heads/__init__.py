"""The output layer on top of the features: its Head (softmax or sigmoid), evaluation and
thresholds.

`Head`, `SoftmaxHead`, `SigmoidHead` and `make_head` (from retrain.heads.head) are offered here
and imported on first use, so that importing this package, or its NumPy-only modules
(evaluation, thresholds: label-image reads those), does not import TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrain.heads.head import Head, SigmoidHead, SoftmaxHead, make_head

__all__ = ["Head", "SigmoidHead", "SoftmaxHead", "make_head"]


def __getattr__(name: str) -> Any:
    """The names of __all__, from retrain.heads.head (which imports TensorFlow) when first
    asked for."""
    if name in __all__:
        from retrain.heads import head

        return getattr(head, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
