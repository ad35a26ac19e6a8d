"""A small ShapesWorld library built with the shipped model, as `piaa demo` builds one:
generated scenes, indexed, the 24 classes as vocabulary, fitted. Shared by the evidence,
media-route and browser tests."""

from __future__ import annotations

from pathlib import Path

import pytest

import piaa_index

# As piaa_index.model.encoder.SHAPESWORLD_DIR, without importing torch when conftest loads.
SHAPESWORLD_DIR = Path(piaa_index.__file__).resolve().parent / "model" / "assets" / "shapesworld"


def build_shapes_library(root: Path, n_images: int = 60, seed: int = 7) -> Path:
    """Generate, index, set the vocabulary and fit; return the library's home (its SQLite
    database is home/piaa.sqlite3, as `piaa demo` makes it)."""
    from piaa_index.eval.datasets import load_dataset
    from piaa_index.shapes.dataset import generate_dataset

    data = generate_dataset(root / "library", n_images, seed=seed, progress=False)
    home = root / "index"
    with open_shapes_library(home) as library:
        library.index([data / "images"])
        library.set_vocabulary(load_dataset(data).classes)
        library.fit()
    return home


def open_shapes_library(home: Path):  # type: ignore[no-untyped-def]
    from piaa_index.library.core import Library

    return Library.open(
        home=home,
        db=f"sqlite:///{home / 'piaa.sqlite3'}",
        model="shapesworld",
        pretrained="default",
    )


@pytest.fixture(scope="session")
def shapes_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fitted 48-image ShapesWorld library shared by the session's tests: read it, do not
    change it (copy what you need to change)."""
    if not (SHAPESWORLD_DIR / "shapesworld.safetensors").is_file():
        pytest.skip("the shipped shapesworld checkpoint is not in this checkout")
    return build_shapes_library(tmp_path_factory.mktemp("shapes"), n_images=48)
