"""Text out of piaa-index that holds file names: JSON that stays valid whatever the names.

POSIX file names are bytes; Python decodes the bytes that are not UTF-8 to lone surrogates
(os.fsdecode). Written as UTF-8 they would crash the writer; as raw bytes, the JSON would be
invalid. JSON gets `\\udcXX` escapes instead, which JSON readers turn back into the same string.
"""

from __future__ import annotations

import json
from typing import Any


def json_text(value: Any, indent: int | None = 2) -> str:
    text = json.dumps(value, indent=indent, ensure_ascii=False, default=str, allow_nan=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
