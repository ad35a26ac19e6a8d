"""The CLI reference in docs/ is generated from the code and must be current."""

from __future__ import annotations

import runpy
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_cli_reference_is_current() -> None:
    generator = runpy.run_path(str(DOCS / "generate_cli_reference.py"))
    expected = generator["reference"]()
    assert (DOCS / "cli.md").read_text(encoding="utf-8") == expected, (
        "docs/cli.md is stale: run `python docs/generate_cli_reference.py`"
    )
