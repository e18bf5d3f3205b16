"""The command lines, thin over the library: `retrain` (`retrain.py`), its flags (one table,
`flag_table`, defined by `flags`) and `retrain-beam-extract` (`beam_extract`).

`main` and `run` are `retrain.cli.retrain`'s, offered here too because retrain.py's successor
was once `retrain.cli:run`: a console script installed then still starts.
"""

from __future__ import annotations

from typing import Any

__all__ = ["main", "run"]


def __getattr__(name: str) -> Any:
    """`main` and `run` of retrain.cli.retrain, imported when first asked for."""
    if name in __all__:
        from retrain.cli import retrain

        return getattr(retrain, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
