"""Class-name presets of the paper's benchmarks (VOC, COCO, NUS-WIDE), in label-id order."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

PRESETS: tuple[str, ...] = ("voc", "coco", "nus")


@lru_cache(maxsize=1)
def _load() -> dict[str, list[str]]:
    """Read the shipped `presets/classes.json` once."""
    # The JSON lives in the data folder `piaa_index/library/presets/`, a sibling of this module,
    # so it is addressed from the enclosing package rather than as a subpackage of its own.
    text = (
        resources.files("piaa_index.library")
        .joinpath("presets")
        .joinpath("classes.json")
        .read_text("utf-8")
    )
    return json.loads(text)


def preset_classes(name: str) -> list[str]:
    """Return the class names of preset `name` ("voc", "coco" or "nus"), in label-id order."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in PRESETS:
        raise ValueError(f"unknown class preset {name!r}; expected one of {', '.join(PRESETS)}")
    return list(_load()[key])
