"""The read-only `piaa status` of a fresh process (piaa_index/catalog/readonly.py, issue 23): the
same dict as `Library.status()` in every state a user meets, without SQLAlchemy, and None (the
caller opens the Library) whenever opening it would write or answer otherwise. Real libraries:
a ShapesWorld collection run through the CLI as a user runs it, and synthetic ones written
through the index path (tools/scale.py)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from piaa_index.catalog import readonly as store_readonly
from piaa_index.cli import cli
from piaa_index.config import Settings
from piaa_index.library.core import Library
from tools import scale


def run(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def same_status(home: Path, db: str | None = None) -> dict[str, Any]:
    """The read-only answer, asserted to be one and to equal `Library.status()` (read before
    and after the Library opened: opening it wrote nothing that changes the answer)."""
    settings = Settings.resolve(home=home, db=db)
    got = store_readonly.status(settings)
    assert got is not None, "the read-only status fell back"
    with Library.open(home=home, db=db) as library:
        want = library.status()
    assert got == want
    assert store_readonly.status(settings) == want
    return got


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Street and garden scenes only: of the vocabulary below, mug and beach ball are absent.
    250 in one folder (indexed first), 30 in another (indexed after the fit)."""
    from piaa_index.shapes.dataset import generate_dataset
    from piaa_index.shapes.world import CLASSES, GROUPS

    base = tmp_path_factory.mktemp("status-scenes")
    held = sorted({CLASSES.index(n) for g in ("street", "garden") for n in GROUPS[g]})
    generate_dataset(base / "scenes", 280, seed=4713, size=96, progress=False, classes_allowed=held)
    images = sorted((base / "scenes" / "images").iterdir())
    for folder, part in (("first", images[:250]), ("later", images[250:])):
        (base / folder).mkdir()
        for f in part:
            shutil.copy(f, base / folder / f.name)
    return base


def test_equals_the_library_status_in_every_state_of_a_cli_library(
    scenes: Path, tmp_path: Path
) -> None:
    """Fresh, indexed, vocabulary set, fitted, images added, the user's labels changed, the
    vocabulary changed again: each time the read-only dict equals `Library.status()`, and the
    fields that say which state it is hold the values the user should see."""
    home = tmp_path / "home"
    opts = ["--home", str(home), "-q"]

    # A brand-new home: the first `status` creates the database (the Library's path).
    assert store_readonly.status(Settings.resolve(home=home)) is None
    run(["status", "--json", *opts])
    st = same_status(home)
    assert st["images"] == {"indexed": 0, "failed": 0, "pending": 0}
    assert (st["model"], st["vectors_bytes"], st["classifier"]) == (None, 0, None)
    assert st["vocabulary"] == {"version": None, "labels": [], "templates": []}
    assert (st["stale"], st["labels_changed"]) == (False, False)

    run(["index", str(scenes / "first"), "--model", "shapesworld", *opts])
    st = same_status(home)
    assert st["images"]["indexed"] == 250
    assert st["model"]["model"] == "shapesworld"
    assert st["vectors_bytes"] > 0
    assert (st["classifier"], st["stale"]) == (None, False)

    labels = ["car", "snail", "mug", "beach ball"]
    run(["vocab", "set", *labels, *opts])
    st = same_status(home)
    assert st["vocabulary"]["labels"] == labels
    assert (st["classifier"], st["stale"]) == (None, True)

    fit = json.loads(run(["fit", "--json", *opts]))
    st = same_status(home)
    clf = st["classifier"]
    assert clf["version"] == fit["classifier_id"]
    assert clf["vocabulary_version"] == st["vocabulary"]["version"]
    assert (clf["n_images"], clf["images_added_since"]) == (250, 0)
    assert clf["absent_labels"] == fit["absent_labels"]
    lacking = {"mug", "beach ball"}  # absent, or weak on too little evidence
    assert "beach ball" in clf["absent_labels"] and set(clf["absent_labels"]) <= lacking
    assert clf["tagged"] == {k: v for k, v in fit["tagged_present"].items() if v}
    assert {"car", "snail"} <= set(clf["tagged"])
    assert not set(clf["tagged"]) & set(clf["absent_labels"])  # never tagged
    assert (st["stale"], st["labels_changed"]) == (False, False)

    run(["index", str(scenes / "later"), *opts])  # not scored until the next query
    st = same_status(home)
    assert st["images"]["indexed"] == 280
    assert (st["classifier"]["n_images"], st["classifier"]["images_added_since"]) == (250, 30)
    assert st["classifier"]["tagged"] == clf["tagged"]  # the fitted images' tags, as yet
    run(["search", "car", "--json", *opts])  # scores the 30 as a new segment
    st = same_status(home)
    assert sum(st["classifier"]["tagged"].values()) > sum(clf["tagged"].values())

    some = str(sorted((scenes / "later").iterdir())[0])
    run(["labels", "set", some, "mug", "yes", *opts])
    st = same_status(home)
    assert (st["labels_changed"], st["stale"]) == (True, False)

    run(["vocab", "add", "tree", *opts])  # stale: the tags counted are the last fit's
    st = same_status(home)
    assert st["stale"] is True
    assert st["vocabulary"]["labels"] == [*labels, "tree"]
    assert st["classifier"]["vocabulary_version"] == st["vocabulary"]["version"] - 1
    assert set(st["classifier"]["tagged"]) == set(clf["tagged"])


WORLD = scale.World.make(6, seed=3)


@pytest.fixture
def lib(tmp_path: Path) -> Iterator[Library]:
    world = WORLD
    library = scale.open_library(tmp_path / "home", world)
    scale.add_images(library, world, 400)
    library.set_vocabulary(scale.label_names(6))
    library.fit()
    yield library
    library.close()


def _settings(lib: Library) -> Settings:
    return Settings.resolve(home=lib.settings.home, db=lib.settings.db_url)


def test_falls_back_whenever_the_library_would_write(lib: Library) -> None:
    """None where opening the Library writes before it answers: vectors or score files to
    reconcile with SQL, images removed since the scores were written, a schema to upgrade, a
    vector manifest to record; equal again once the Library has written."""
    settings = _settings(lib)
    assert store_readonly.status(settings) == lib.status()

    leftover = lib.vectors_dir / "000999.cls.faiss.tmp"  # a write cut short
    leftover.write_bytes(b"partial")
    assert store_readonly.status(settings) is None
    with Library.open(home=lib.settings.home, db=lib.settings.db_url) as fresh:
        want = fresh.status()  # reconciles: deletes it
    assert not leftover.exists()
    assert store_readonly.status(settings) == want

    stray = lib.tagger.scores_dir / "0123456789abcdef"  # a fit cut short before its commit
    stray.mkdir()
    assert store_readonly.status(settings) is None
    with Library.open(home=lib.settings.home, db=lib.settings.db_url) as fresh:
        want = fresh.status()
    assert not stray.exists()
    assert store_readonly.status(settings) == want

    row = lib.store.latest_classifier()
    assert row is not None
    shutil.rmtree(lib.tagger.scores_dir / str(row.scores_key))  # lost: the sparse tags count
    got = store_readonly.status(settings)
    with Library.open(home=lib.settings.home, db=lib.settings.db_url) as fresh:
        assert got == fresh.status()
    assert got is not None and got["classifier"]["tagged"] == lib.store.tag_counts()
    with Library.open(home=lib.settings.home, db=lib.settings.db_url) as fresh:
        fresh.search("l000")  # scores every image again, in a new score folder
        assert store_readonly.status(settings) == fresh.status() == got

    gone = [loc[0] for loc in lib.store.live_locations()[:10]]
    lib.store.remove_images(gone)  # as `index --prune` does: tombstones are due
    assert store_readonly.status(settings) is None
    lib.search("l000")  # writes the tombstones
    got = store_readonly.status(settings)
    assert got is not None and got == lib.status()
    assert got["images"]["indexed"] == 390

    db = Path(lib.settings.db_url.removeprefix("sqlite:///"))
    with sqlite3.connect(db) as conn:  # a schema to upgrade
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        older = f"{int(revision) - 1:04d}"
        conn.execute("UPDATE alembic_version SET version_num = ?", (older,))
    assert store_readonly.status(settings) is None
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    assert store_readonly.status(settings) == lib.status()

    with sqlite3.connect(db) as conn:  # from before the database kept a copy of the manifest
        conn.execute("DELETE FROM settings WHERE key = 'vectors_manifest'")
    assert store_readonly.status(settings) is None
    with Library.open(home=lib.settings.home, db=lib.settings.db_url) as fresh:
        want = fresh.status()  # records it
    assert store_readonly.status(settings) == want

    asked = Settings.resolve(home=lib.settings.home, db=lib.settings.db_url, model="ViT-B-16")
    assert store_readonly.status(asked) is None  # the Library refuses it, and says why


def test_the_cli_status_reads_without_sqlalchemy_and_prints_alike(
    lib: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh `piaa status --json` imports neither SQLAlchemy nor alembic (`-X importtime`)
    and prints `Library.status()`; the text form is the same read-only or through the Library."""
    scale.add_images(lib, WORLD, 20, start=400, seed=4)  # added since the fit
    want = lib.status()
    assert want["classifier"]["images_added_since"] == 20
    home = str(lib.settings.home)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "piaa_index", "--home", home, "status"]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == want
    imported = [line for line in done.stderr.splitlines() if "import time:" in line]
    assert any("piaa_index.catalog.readonly" in line for line in imported)
    assert not [line for line in imported if "sqlalchemy" in line or "alembic" in line]

    text = subprocess.run(
        [sys.executable, "-m", "piaa_index", "--home", home, "status"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert text.returncode == 0, text.stderr
    assert "20 images added since the fit" in text.stdout
    monkeypatch.setattr(store_readonly, "status", lambda settings: None)
    assert run(["--home", home, "status"]) == text.stdout
    assert json.loads(run(["--home", home, "status", "--json"])) == want


def test_the_database_is_shown_as_sqlalchemy_renders_it() -> None:
    from sqlalchemy.engine import make_url

    for path in ["/tmp/home/piaa.sqlite3", "relative/piaa.sqlite3", "/tmp/a b/Straße/ü@:#+.db"]:
        url = f"sqlite:///{path}"
        assert store_readonly._shown_url(url) == make_url(url).render_as_string(hide_password=True)
