"""A fresh `piaa` process on a Postgres library reads through libpq (catalog/libpq.py), as one
on SQLite reads through sqlite3 (catalog/readonly.py): the same rows and status as the Library,
without importing SQLAlchemy or psycopg; and the Library answers whenever the read-only path
cannot."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from piaa_index.catalog import readonly, readonly_vectors
from piaa_index.config import Settings
from piaa_index.library.core import Library
from tools import scale

N_LABELS = 6
WORLD = scale.World.make(N_LABELS, seed=5)


@pytest.fixture(scope="module")
def pg_library(
    tmp_path_factory: pytest.TempPathFactory, postgres_database: Callable[[], str]
) -> Iterator[Library]:
    url = postgres_database()  # its own: the shared one holds other models' libraries
    library = scale.open_library(tmp_path_factory.mktemp("pg") / "home", WORLD, db=url)
    scale.add_images(library, WORLD, 2500, group=500)
    library.update_indexes()  # as `index` does at its end
    library.set_vocabulary(scale.label_names(N_LABELS))
    library.fit()
    yield library
    library.close()


def _settings(lib: Library) -> Settings:
    return Settings.resolve(home=lib.settings.home, db=lib.settings.db_url)


def test_status_search_tags_and_similar_answer_as_the_library(pg_library: Library) -> None:
    lib, settings = pg_library, _settings(pg_library)
    assert readonly.ReadOnlyStore.open(settings.db_url) is not None
    assert readonly.status(settings) == lib.status()
    assert readonly.vocabulary_listing(settings) == {
        "version": lib.status()["vocabulary"]["version"],
        "labels": scale.label_names(N_LABELS),
        "templates": lib.status()["vocabulary"]["templates"],
    }
    for expression in ("l000", "l000 AND l001", "l002 OR NOT l003"):
        for limit in (20, None):
            got = readonly.search(settings, expression, limit)
            assert got is not None and got == lib.search(expression, limit=limit)
    paths = lib.store.indexed_paths()
    for path in paths[::400]:
        assert readonly.tags(settings, path) == lib.tags(path)
        assert readonly_vectors.similar(settings, path, 10) == lib.similar(path, limit=10)


def test_images_added_since_the_scores_leave_search_to_the_library(
    tmp_path: Path, postgres_database: Callable[[], str]
) -> None:
    url = postgres_database()
    library = scale.open_library(tmp_path / "home", WORLD, db=url)
    try:
        scale.add_images(library, WORLD, 300)
        library.set_vocabulary(scale.label_names(N_LABELS))
        library.fit()
        library.update_indexes()
        settings = _settings(library)
        assert readonly.search(settings, "l000", 5) is not None
        scale.add_images(library, WORLD, 40, start=300)
        assert readonly.search(settings, "l000", 5) is None  # not scored yet
        # ... while similar compares the images its index does not hold yet exactly.
        some = "/synthetic/0000/00000001.jpg"
        assert readonly_vectors.similar(settings, some, 5) == library.similar(some, limit=5)
        assert readonly.status(settings) is not None  # status reads what is there
        assert readonly.status(settings) == library.status()
    finally:
        library.close()


def test_unreachable_or_unusual_urls_are_left_to_the_library(pg_library: Library) -> None:
    home = pg_library.settings.home
    for url in (
        "postgresql+psycopg://postgres@127.0.0.1:1/nowhere",  # nothing listens
        "postgresql+psycopg://postgres:secret@127.0.0.1:5432/postgres",  # shown as ***
        pg_library.settings.db_url + "?sslmode=disable",  # a query string
        "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres",  # another driver
    ):
        assert readonly.status(Settings.resolve(home=home, db=url)) is None, url


def test_the_cli_reads_postgres_without_sqlalchemy(pg_library: Library) -> None:
    lib = pg_library
    code = (
        "import sys\nfrom piaa_index.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', 'sqlalchemy' in sys.modules or 'psycopg' in sys.modules,"
        " file=sys.stderr)\n"
    )
    path = lib.store.indexed_paths()[7]
    base = [sys.executable, "-c", code, "--home", str(lib.settings.home)]
    base += ["--db", lib.settings.db_url]
    for argv, expected in (
        (["search", "l001 AND l000", "--limit", "5"], lib.search("l001 AND l000", limit=5)),
        (["tags", path], lib.tags(path)),
        (["similar", path, "--limit", "5"], lib.similar(path, limit=5)),
        (["status"], lib.status()),
    ):
        out = subprocess.run([*base, *argv, "--json"], capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == expected, argv
        assert "LOADED False" in out.stderr, (argv, out.stderr)
