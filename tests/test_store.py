"""The SQL store: Alembic migrations on open, refusal of newer databases, vocabulary versions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from piaa_index.catalog.store import Store, StoreError

TABLES = {
    "settings",
    "user_labels",
    "images",
    "vocabularies",
    "labels",
    "classifiers",
    "tags",
    "data_versions",
    "image_counts",
    "xmp_sidecars",
    "api_keys",
    "image_changes",
    "alembic_version",
}


def _sqlite(tmp_path: Path, name: str = "piaa.sqlite3") -> str:
    return f"sqlite:///{tmp_path / name}"


def _head() -> str:
    from alembic.script import ScriptDirectory

    from piaa_index.catalog.store import _alembic_config

    return str(ScriptDirectory.from_config(_alembic_config(None)).get_current_head())


def test_fast_open_path_knows_the_same_head_as_alembic() -> None:
    """Opening an up-to-date library skips alembic by reading the head from the migration file
    names; a migration named off that pattern would make every open take the slow path."""
    from piaa_index.catalog.readonly import head_revision

    assert head_revision() == _head()


def test_an_up_to_date_library_opens_without_importing_alembic(tmp_path: Path) -> None:
    """A query's start-up does not pay for alembic once the schema is at head."""
    import subprocess
    import sys

    Store.open(_sqlite(tmp_path)).close()
    code = (
        "import sys\n"
        "from piaa_index.catalog.store import Store\n"
        f"Store.open({_sqlite(tmp_path)!r}).close()\n"
        "print('alembic' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_open_creates_every_table_at_head(tmp_path: Path) -> None:
    """A new database gets the whole schema, stamped with this version's revision."""
    url = f"sqlite:///{tmp_path / 'deep' / 'er' / 'piaa.sqlite3'}"
    store = Store.open(url)
    try:
        assert set(inspect(store.engine).get_table_names()) == TABLES
        assert store.schema_revision() == _head()
        assert len(store.store_id) == 32
    finally:
        store.close()
    assert (tmp_path / "deep" / "er" / "piaa.sqlite3").is_file()


def test_migrated_schema_matches_the_models(tmp_path: Path) -> None:
    """schema.py (what queries use) and the newest migration describe the same tables."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from piaa_index.catalog.schema import Base

    store = Store.open(_sqlite(tmp_path))
    try:
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        store.close()


def test_reopening_is_a_no_op(tmp_path: Path) -> None:
    """Opening an up-to-date database again keeps its data, id and revision."""
    url = _sqlite(tmp_path)
    first = Store.open(url)
    first.set_setting("marker", {"value": 42})
    vocab = first.new_vocabulary(["dog", "cat"], ["a photo of a {}."])
    store_id, revision = first.store_id, first.schema_revision()
    first.close()

    again = Store.open(url)
    try:
        assert again.store_id == store_id
        assert again.schema_revision() == revision
        assert again.get_setting("marker") == {"value": 42}
        assert again.vocabulary() == vocab
        with again.engine.connect() as conn:
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        assert [r[0] for r in rows] == [revision]
    finally:
        again.close()


def test_newer_database_is_refused(tmp_path: Path) -> None:
    """A database written by a newer piaa-index is refused, not misread or downgraded."""
    url = _sqlite(tmp_path)
    Store.open(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()

    with pytest.raises(StoreError, match="9999.*upgrade piaa-index"):
        Store.open(url)
    # Refusing did not touch the stamp.
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "9999"
    engine.dispose()


def test_invalid_url_is_a_store_error() -> None:
    """A typo in --db gives a one-line error, not a SQLAlchemy traceback."""
    with pytest.raises(StoreError, match="invalid database URL"):
        Store.open("not a url")


def test_unreachable_server_is_a_store_error() -> None:
    """A Postgres server that is not there gives StoreError (exit 1 in the CLI)."""
    pytest.importorskip("psycopg")
    with pytest.raises(StoreError, match="cannot open database"):
        Store.open("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")


def test_vocabulary_versions(tmp_path: Path) -> None:
    """Each vocabulary change is a new version; older versions keep their labels."""
    store = Store.open(_sqlite(tmp_path))
    try:
        assert store.vocabulary() is None
        v1 = store.new_vocabulary(["red circle", "blue circle"], ["a photo of a {}."])
        v2 = store.new_vocabulary(
            ["red circle", "green circle", "blue circle"],
            ["a photo of a {}.", "a {}."],
            label_templates={"green circle": ["a drawing of a {}."]},
        )
        assert v2.id > v1.id
        current = store.vocabulary()
        assert current == v2
        assert current.names == ["red circle", "green circle", "blue circle"]
        assert [lb.position for lb in current.labels] == [0, 1, 2]
        by_name = {lb.name: lb for lb in current.labels}
        assert by_name["green circle"].templates == ["a drawing of a {}."]
        assert by_name["red circle"].templates == ["a photo of a {}.", "a {}."]
        # v1's labels are distinct rows that still exist (classifiers fitted on v1 point at them).
        assert {lb.id for lb in v1.labels}.isdisjoint({lb.id for lb in v2.labels})
        with store.engine.connect() as conn:
            n = conn.execute(
                text("SELECT count(*) FROM labels WHERE vocabulary_id = :v"), {"v": v1.id}
            ).scalar()
        assert n == 2
    finally:
        store.close()


def test_settings_round_trip_json(tmp_path: Path) -> None:
    """Settings (model identity, store id) survive as JSON, and can be overwritten."""
    store = Store.open(_sqlite(tmp_path))
    try:
        assert store.get_setting("model") is None
        value = {"model": "ViT-B-16", "grid": [14, 14], "pretrained": "openai"}
        store.set_setting("model", value)
        assert store.get_setting("model") == value
        store.set_setting("model", {"model": "other"})
        assert store.get_setting("model") == {"model": "other"}
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_url_without_driver_suffix(postgres_url: str) -> None:
    """`--db postgresql://host/db` (no +driver) works with the psycopg the extra installs."""
    url = make_url(postgres_url).set(drivername="postgresql")
    plain = url.render_as_string(hide_password=False)
    assert plain.startswith("postgresql://")
    store = Store.open(plain)
    try:
        assert TABLES <= set(inspect(store.engine).get_table_names())
        assert store.schema_revision() == _head()
        store.new_vocabulary(["dog"], ["a photo of a {}."])
        assert store.vocabulary().names == ["dog"]
    finally:
        # The database is shared by the session's Postgres tests: leave it empty again.
        from piaa_index.catalog.schema import Base

        Base.metadata.drop_all(store.engine)
        with store.engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
            # Migration 0003's trigger function outlives the tables: a later first open would
            # run 0003 again and meet it.
            conn.execute(text("DROP FUNCTION IF EXISTS piaa_bump_catalog() CASCADE"))
        store.close()


def test_images_under_matches_folders_exactly(tmp_path):
    """An index run on one folder sees exactly that folder's images: not a sibling sharing the
    prefix, not another case (SQLite's LIKE ignores case), and `%`/`_` in names are literal."""
    from piaa_index.catalog.schema import Image
    from piaa_index.catalog.store import utcnow

    store = Store.open(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    paths = ["/a/b/1.jpg", "/a/b_c/2.jpg", "/a/B/3.jpg", "/a/b%/4.jpg", "/a/bc/5.jpg", "/a/b"]
    with store.session() as s:
        for p in paths:
            s.add(Image(path=p, size=1, mtime=0.0, status="indexed", indexed_at=utcnow()))
    assert sorted(store.images_under(["/a/b"])) == ["/a/b", "/a/b/1.jpg"]
    assert sorted(store.images_under(["/a/b%/"])) == ["/a/b%/4.jpg"]
    assert sorted(store.images_under(["/"])) == sorted(paths)


OPEN_WHEN_TOLD = """
import sys, time
from collections.abc import Callable
from pathlib import Path
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
from piaa_index.catalog.store import Store
print(Store.open(sys.argv[1]).store_id)
"""


def _open_together(url: str, tmp_path: Path, n: int = 6) -> list[str]:
    """Open a brand-new database from n processes released at the same instant."""
    import subprocess
    import sys
    import time

    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_WHEN_TOLD, url, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    time.sleep(3)  # every process imported and is waiting
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [err for _, err in outs]
    return [out.strip() for out, _ in outs]


def test_first_opens_at_once_agree_on_sqlite(tmp_path: Path) -> None:
    """Several processes opening a new library together: one creates the schema and the
    store id (which names the vector folder), the others wait and see the same."""
    ids = _open_together(f"sqlite:///{tmp_path / 'new.sqlite3'}", tmp_path)
    assert len(set(ids)) == 1


@pytest.mark.postgres
def test_first_opens_at_once_agree_on_postgres(
    tmp_path: Path, postgres_database: Callable[[], str]
) -> None:
    ids = _open_together(postgres_database(), tmp_path)
    assert len(set(ids)) == 1
