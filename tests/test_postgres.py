"""The must-show flow against PostgreSQL: index, vocabulary, fit, search, tags, CLI errors.

Runs when PIAA_TEST_PG points at a server, e.g.
`PIAA_TEST_PG=postgresql+psycopg://postgres@127.0.0.1:5432/postgres`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from piaa_index.catalog.schema import FAILED, Image
from piaa_index.library.core import Library
from tests.image_files import PhotoFolder, make_photo_folder
from tests.test_indexer import assert_tag_rule

pytestmark = pytest.mark.postgres

LABELS = ["red circle", "blue circle", "green circle"]


@pytest.fixture(scope="module")
def pg_library(
    postgres_url: str, tiny_model_config: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Library, PhotoFolder, dict]]:
    """A library whose metadata lives in Postgres: indexed, vocabulary set, searched once."""
    base = tmp_path_factory.mktemp("pg")
    photos = make_photo_folder(base / "photos", n=40)
    lib = Library.open(
        home=base / "home", db=postgres_url, model=str(tiny_model_config), pretrained="none",
        device="cpu",
    )  # fmt: skip
    first = lib.index([photos.root]).as_dict()
    try:
        yield lib, photos, first
    finally:
        lib.close()


def test_index_on_postgres(pg_library: tuple[Library, PhotoFolder, dict]) -> None:
    """Indexing records good and broken files in Postgres; a rerun re-encodes nothing."""
    lib, photos, first = pg_library
    assert lib.store.engine.dialect.name == "postgresql"
    assert first["indexed"] == 40
    assert {f["path"] for f in first["failed"]} == {str(p) for p in photos.broken}
    again = lib.index([photos.root])
    assert (again.indexed, again.unchanged, again.still_failing) == (0, 40, 2)
    assert lib.status()["images"] == {"indexed": 40, "failed": 2, "pending": 0}


def test_vocab_fit_search_tags_on_postgres(pg_library: tuple[Library, PhotoFolder, dict]) -> None:
    """vocab set → fit → search "red circle AND blue circle" → tags, all through Postgres."""
    lib, photos, _ = pg_library
    lib.set_vocabulary(LABELS)
    assert lib.is_stale()
    report = lib.fit()
    assert report.n_images == 40 and not lib.is_stale()

    rows = lib.search("red circle AND blue circle", limit=None, include_absent=True)
    assert len(rows) == 40
    matches = lib.search("red circle AND blue circle", limit=None)
    assert [r["path"] for r in matches] == [r["path"] for r in rows if r["match"]]
    for row in rows:
        assert Path(row["path"]).is_file()
        assert set(row["labels"]) == {"red circle", "blue circle"}

    tags = lib.tags(photos.unicode)
    assert sorted(t["label"] for t in tags) == sorted(LABELS)
    for t in tags:
        assert_tag_rule(t)
    status = lib.status()
    assert status["database"].startswith("postgresql")
    assert set(status["classifier"]["tagged"]) <= set(LABELS)


def test_cli_on_postgres(
    pg_library: tuple[Library, PhotoFolder, dict], postgres_url: str, monkeypatch, capsys
) -> None:
    """`piaa --db URL search` works, and an unknown label exits 2 naming it."""
    import json

    from piaa_index.cli import main

    lib, photos, _ = pg_library
    lib.set_vocabulary(LABELS)  # no-op when the flow test already set it
    # Scores live in a matrix beside the vector shards (piaa_index/vectors/scores.py), so the CLI needs
    # the library's home as well as its database.
    monkeypatch.setenv("PIAA_HOME", str(lib.settings.home))

    def piaa(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["piaa", "--db", postgres_url, "-q", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capsys.readouterr()
        return int(exit_info.value.code or 0), out, err

    code, out, err = piaa("search", "red circle AND zebra")
    assert code == 2
    assert "zebra" in err and "Traceback" not in err

    code, out, err = piaa("search", "red circle AND blue circle", "--all-images", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert rows and all({"path", "score"} <= set(r) for r in rows)

    code, out, err = piaa("tags", str(photos.heic), "--json")
    assert code == 0, err
    assert sorted(r["label"] for r in json.loads(out)) == sorted(LABELS)


def test_large_file_sizes_fit_in_postgres(pg_library: tuple[Library, PhotoFolder, dict]) -> None:
    """A file over 2 GiB (a big TIFF scan) can be recorded: `images.size` must be 64-bit."""
    lib, _, _ = pg_library
    size = 3 * 1024**3
    try:
        with lib.store.session() as s:
            s.add(
                Image(
                    path="/big/scan.tif", size=size, mtime=1.0, status=FAILED,
                    error="test", indexed_at=datetime(2026, 1, 1),
                )
            )  # fmt: skip
        row = lib.store.image_by_path("/big/scan.tif")
        assert row is not None and row.size == size
    finally:
        with lib.store.engine.begin() as conn:
            conn.execute(text("DELETE FROM images WHERE path = '/big/scan.tif'"))
