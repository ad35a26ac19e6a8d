"""Text that holds file names, out of piaa-index (JSON that stays valid whatever the names)
and into its database (`to_db_text`).

POSIX file names are bytes; Python decodes the bytes that are not UTF-8 to lone surrogates
(os.fsdecode). Written as UTF-8 they would crash the writer; as raw bytes, the JSON would be
invalid. JSON gets `\\udcXX` escapes instead, which JSON readers turn back into the same string.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float as the string "inf", "-inf" or "nan": Postgres's JSON
    refuses `Infinity` and `NaN`, and `float()` reads the strings back."""
    if isinstance(value, float):  # numpy's float64 too
        return float(value) if math.isfinite(value) else str(float(value))
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def json_text(value: Any, indent: int | None = 2) -> str:
    text = json.dumps(value, indent=indent, ensure_ascii=False, default=str, allow_nan=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# POSIX file names are bytes. Python decodes the bytes that are not UTF-8 to lone surrogates
# (U+DC80-U+DCFF, "surrogateescape"), which neither SQLite's driver nor Postgres accepts.
# Stored, each becomes the code point 0x100000 higher (U+10DC80-U+10DCFF, private use
# plane 16), so every name round-trips and a folder's paths still share its prefix.
_SURROGATE_SHIFT = 0x100000
_TO_DB = {c: c + _SURROGATE_SHIFT for c in range(0xDC80, 0xDD00)}
_FROM_DB = {c + _SURROGATE_SHIFT: c for c in range(0xDC80, 0xDD00)}


def to_db_text(value: str) -> str:
    return value if value.isascii() else value.translate(_TO_DB)


def from_db_text(value: str) -> str:
    return value if value.isascii() else value.translate(_FROM_DB)
