"""Write docs/flags.md, the flag reference, from the flag table (retrain/cli/flag_table.py).

    python scripts/flag_reference.py

tests/test_flags.py fails when the page and the table disagree.
"""

from __future__ import annotations

from pathlib import Path

from retrain.cli.flags import render_reference

PAGE = Path(__file__).resolve().parent.parent / "docs" / "flags.md"

if __name__ == "__main__":
    PAGE.write_text(render_reference())
    print(PAGE)
