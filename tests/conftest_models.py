"""Model fixtures shared by the test suite (imported from tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# A ViT small enough to build in ~0.1 s on CPU: 64 px, 16 px patches (4x4 grid), d = 32.
TINY_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 64,
        "patch_size": 16,
        "width": 64,
        "layers": 2,
        "head_width": 32,
    },
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
    },
}

# The file stem becomes the open_clip model name; unique so it never shadows a built-in.
TINY_MODEL_NAME = "piaa-tiny-vit"


def write_model_config(directory: Path, name: str, cfg: dict[str, Any]) -> Path:
    """Write an open_clip model-config JSON named `name`.json and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return path


# An explicit name keeps the fixture's name even when a module imports it under an alias.
@pytest.fixture(scope="session", name="tiny_model_config")
def tiny_model_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to the tiny open_clip model-config JSON (use with pretrained='none')."""
    return write_model_config(tmp_path_factory.mktemp("models"), TINY_MODEL_NAME, TINY_MODEL_CONFIG)
