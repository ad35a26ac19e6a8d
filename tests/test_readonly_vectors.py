"""A fresh `piaa similar` and `piaa search --text` answer read-only (catalog/readonly_vectors.py:
sqlite3, the saved indexes, the mapped shards and the cached numpy text tower; no SQLAlchemy, no
torch) with the rows the Library gives, and hand over to the Library whenever an index is not
current with the catalog."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from piaa_index.catalog import readonly_vectors
from piaa_index.config import ModelSpec, Settings
from piaa_index.library.core import Library
from piaa_index.model import text_tower
from piaa_index.model.encoder import Encoder
from piaa_index.vectors import text_search as ts
from tools import scale

N_LABELS = 16
N_IMAGES = 3000  # above text search's EXACT_BELOW: the ANN path
SOME = "/synthetic/0000/00000010.jpg"
PHRASES = ["a red circle", "l003", "two blue squares next to a house", "star"]


def _cache_tower(home: Path) -> None:
    """The synthetic library's model has no text tower of its own: cache the shipped
    shapesworld model's (same width) under the synthetic model's key, so that both the
    Library and the read-only path embed phrases with it."""
    with Library.open(home=home) as lib:
        record = lib.store.get_setting("model")
    path = text_tower.cache_path(home, ModelSpec(scale.MODEL, scale.PRETRAINED, "clip"), record)
    assert path is not None
    encoder = Encoder(ModelSpec("shapesworld", "default", "clip"), device="cpu")
    assert text_tower.save_text_tower(encoder, path) is not None


def _library(home: Path, n: int, seed: int) -> Path:
    world = scale.World.make(N_LABELS, seed=seed)
    library = scale.open_library(home, world)
    scale.add_images(library, world, n, group=500)
    library.update_indexes()  # as `index` does at its end
    library.close()
    _cache_tower(home)
    return home


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _library(tmp_path_factory.mktemp("rov") / "home", N_IMAGES, seed=4)


def _settings(home: Path) -> Settings:
    return Settings.resolve(home=home)


def test_text_search_answers_as_the_library_does(big: Path) -> None:
    with Library.open(home=big) as lib:
        for phrase in PHRASES:
            for limit in (20, 3, None):
                expected = lib.text_search(phrase, limit=limit)
                got = readonly_vectors.text_search(_settings(big), phrase, limit)
                assert got == expected, (phrase, limit)
        assert lib._encoder is None  # the cached tower answered, no model was loaded


def test_similar_answers_as_the_library_does(big: Path) -> None:
    with Library.open(home=big) as lib:
        stored = lib.store.indexed_paths()
        for path in stored[:: len(stored) // 7]:
            for limit in (20, 1, None):
                got = readonly_vectors.similar(_settings(big), path, limit)
                assert got == lib.similar(path, limit=limit), (path, limit)
        assert readonly_vectors.similar(_settings(big), str(big / "no-such.jpg"), 5) is None


def test_images_added_since_the_indexes_were_saved_are_scored_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = _library(tmp_path / "home", 2100, seed=5)
    world = scale.World.make(N_LABELS, seed=5)
    settings = _settings(home)
    assert readonly_vectors.similar(settings, SOME, 5) is not None
    # Images added since the indexes were saved (an index run still going, or a catalog
    # change such as a re-scoring that moved the version): scored exactly beside the
    # indexes' candidates, as the Library does, and said.
    library = scale.open_library(home, world)
    scale.add_images(library, world, 50, start=2100, group=50)
    library.close()
    with Library.open(home=home) as lib:
        for phrase in ("l001", "l007"):
            expected = lib.text_search(phrase, limit=10)
            assert readonly_vectors.text_search(settings, phrase, 10, progress=True) == expected
        added = "/synthetic/0000/00002120.jpg"
        for path in (SOME, added):
            assert readonly_vectors.similar(settings, path, 5, progress=True) == lib.similar(
                path, limit=5
            )
    err = capsys.readouterr().err
    assert "50 images it does not hold yet are scored exactly" in err
    assert "50 images it does not hold yet are compared exactly" in err
    # No cached tower: the Library loads the model (and caches its tower).
    for f in (home / "cache" / "text-tower").glob("*.safetensors"):
        f.unlink()
    assert readonly_vectors.text_search(settings, "l001", 10) is None


def test_a_small_library_is_scanned_exactly(tmp_path: Path) -> None:
    home = _library(tmp_path / "small", 300, seed=6)
    assert 300 < ts.EXACT_BELOW
    with Library.open(home=home) as lib:
        expected = lib.text_search("a green triangle", limit=7)
    assert readonly_vectors.text_search(_settings(home), "a green triangle", 7) == expected


def test_postgres_is_left_to_the_library(big: Path) -> None:
    settings = Settings.resolve(home=big, db="postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert readonly_vectors.text_search(settings, "l001", 5) is None
    assert readonly_vectors.similar(settings, SOME, 5) is None


def test_the_cli_answers_without_sqlalchemy_or_torch(big: Path) -> None:
    code = (
        "import sys\nfrom piaa_index.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'sqlalchemy') if m in sys.modules), "
        "file=sys.stderr)\n"
    )
    with Library.open(home=big) as lib:
        path = lib.store.indexed_paths()[42]
        expected_text = lib.text_search("a red circle", limit=5)
        expected_similar = lib.similar(path, limit=5)
    for argv, expected in (
        (["search", "--text", "a red circle"], expected_text),
        (["similar", path], expected_similar),
    ):
        out = subprocess.run(
            [sys.executable, "-c", code, "--home", str(big), *argv, "--limit", "5", "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(out.stdout) == expected
        assert "LOADED []" in out.stderr, out.stderr
    assert np.isfinite([r["score"] for r in expected_text]).all()
