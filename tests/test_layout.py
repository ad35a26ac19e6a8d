"""piaa_index/layout.py names every path under a library's home: the names are those existing
libraries have on disk (an earlier release's library, used as it is used today), and the module
stays importable by the read-only store without numpy or SQLAlchemy."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from piaa_index.config import Settings
from piaa_index.layout import Layout, VectorsLayout, open_lock
from tests.cli_main import run_main

FIXTURE = Path(__file__).parent / "fixtures" / "library-0.1.0"


def test_the_names_are_the_ones_on_disk_since_the_first_release(tmp_path: Path) -> None:
    """Spelled out: renaming any of these orphans every existing library's files."""
    home = tmp_path / "home"
    layout = Layout(home)
    assert layout.sqlite_file == home / "piaa.sqlite3"
    assert Settings.resolve(home=home).db_url == f"sqlite:///{home / 'piaa.sqlite3'}"
    assert open_lock(home / "piaa.sqlite3") == f"{home / 'piaa.sqlite3'}.open.lock"
    assert layout.vectors_root == home / "vectors"
    assert layout.text_tower_cache == home / "cache" / "text-tower"
    assert layout.thumbnails == home / "thumbnails"
    assert layout.weight_hashes == home / "weights-sha256.json"
    vectors = layout.vectors("0123abcd")
    root = home / "vectors" / "0123abcd"
    assert vectors == VectorsLayout(root)
    assert (vectors.manifest, vectors.database_marker) == (
        root / "manifest.json",
        root / "sqlite-database.json",
    )
    assert (vectors.writer_lock, vectors.readers_lock) == (
        root / "writer.lock",
        root / "readers.lock",
    )
    assert (vectors.scores, vectors.scores_writer_lock) == (
        root / "scores",
        root / "scores" / "writer.lock",
    )
    assert (vectors.similar, vectors.text) == (root / "similar", root / "text")


def test_an_earlier_release_library_keeps_its_files_where_the_layout_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    with tarfile.open(FIXTURE / "library.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    home = tmp_path / "home"
    layout = Layout(home)
    with sqlite3.connect(layout.sqlite_file) as conn:
        (value,) = conn.execute("SELECT value FROM settings WHERE key = 'store_id'").fetchone()
    vectors = layout.vectors(json.loads(value)["uuid"])
    # As the release wrote them (the tarball holds no lock and no cache).
    for path in (vectors.manifest, vectors.database_marker, vectors.scores, vectors.similar):
        assert path.exists(), path
    assert sorted(p for p in layout.vectors_root.iterdir()) == [vectors.root]
    assert (vectors.similar / "meta.json").is_file()

    # Used as today's piaa uses it: a text search (the text tower's cache, the checkpoint
    # hashes, the readers' lock) and a vacuum (the writers' locks).
    for args in (["search", "--text", "red circle", "--json"], ["db", "vacuum"]):
        code, _, err = run_main(
            ["--home", str(home), "--model", "shapesworld", *args], monkeypatch, capsys
        )
        assert code == 0, err
    for path in (vectors.readers_lock, vectors.writer_lock, vectors.scores_writer_lock):
        assert path.is_file(), path
    assert list(layout.text_tower_cache.glob("*.safetensors"))
    assert layout.weight_hashes.is_file()
    # Nothing else in the home (SQLite's own -wal and -shm files aside); the schema upgrade
    # on open (0006 -> head) took the first-open lock beside the database.
    assert Path(open_lock(layout.sqlite_file)).is_file()
    names = {p.name for p in home.iterdir()} - {"piaa.sqlite3-wal", "piaa.sqlite3-shm"}
    assert names == {
        "cache",
        "piaa.sqlite3",
        Path(open_lock(layout.sqlite_file)).name,
        "vectors",
        "weights-sha256.json",
    }


def test_layout_imports_nothing_heavy() -> None:
    """The read-only store (a fresh `piaa search`) imports it: no numpy, no SQLAlchemy."""
    code = (
        "import sys, piaa_index.layout, piaa_index.config; "
        "heavy = {'numpy', 'sqlalchemy'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
