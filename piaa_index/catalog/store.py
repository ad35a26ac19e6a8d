"""SQL metadata through SQLAlchemy: the source of truth for which images are committed.

The schema is owned by Alembic (`migrations/`); opening a store upgrades it, and a database
stamped by a newer piaa-index is refused rather than silently misread.

`Store` holds the engine, sessions, locks, opening and upgrading, and the settings; each other
concern is one module of this package, composed here as a base class of `Store` that shares its
`session()`: images.py (images, change detection, locations), labels.py (the user's labels),
vocabularies.py (vocabularies, classifiers, tags), sidecars.py (XMP sidecars we wrote),
feed.py (the change feed and paging), keys.py (API keys).
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from sqlalchemy import Table, create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from piaa_index.catalog.common import StoreError, utcnow
from piaa_index.catalog.feed import ChangeFeedMixin
from piaa_index.catalog.images import ImagesMixin, KnownImage
from piaa_index.catalog.keys import ApiKeysMixin
from piaa_index.catalog.labels import UserLabelsMixin
from piaa_index.catalog.readonly import head_revision, migrations_dir, sqlite_file_kind
from piaa_index.catalog.schema import Setting
from piaa_index.catalog.sidecars import SidecarRecord, SidecarsMixin
from piaa_index.catalog.vocabularies import LabelInfo, VocabulariesMixin, VocabularyInfo
from piaa_index.durable import file_lock
from piaa_index.errors import DAMAGED_DATABASE_WAY_OUT, UsageError, is_damaged_database
from piaa_index.layout import open_lock

# What callers import from here, wherever it is defined.
__all__ = [
    "KnownImage",
    "LabelInfo",
    "SidecarRecord",
    "Store",
    "StoreError",
    "VocabularyInfo",
    "utcnow",
]

_SETTING_TABLE = cast(Table, Setting.__table__)
# pg_advisory_xact_lock key of schema checks and upgrades ("piaa" in ASCII).
_MIGRATION_LOCK = 0x70696161


def _alembic_config(connection):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["connection"] = connection
    return cfg


class Store(
    ChangeFeedMixin,
    ImagesMixin,
    UserLabelsMixin,
    VocabulariesMixin,
    SidecarsMixin,
    ApiKeysMixin,
):
    """One SQL database (SQLite file or any SQLAlchemy URL, Postgres included)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, upgrade: bool = True) -> Store:
        """Connect, upgrade the schema to this code's head, refuse a newer database."""
        if url.startswith("sqlite:///"):
            # An empty file is judged under the first-open lock: another process may be
            # creating this very library right now.
            _check_sqlite_file(Path(url.removeprefix("sqlite:///")).expanduser(), allow_empty=True)

        def malformed(message: str) -> StoreError:
            # Still a StoreError (what Store.open raises), but the user's input: exit code 2,
            # HTTP 400, as a malformed argument is.
            error = StoreError(message)
            error.exit_code = UsageError.exit_code
            return error

        url = _with_available_driver(url)
        try:
            engine = create_engine(url, future=True)
        except (ArgumentError, ValueError) as exc:  # unparsable, or no such dialect (http:)
            raise malformed(f"invalid database URL {url!r}: {exc}") from None
        except ModuleNotFoundError as exc:
            raise StoreError(
                f"the driver for {url.split(':', 1)[0]} is not installed ({exc.name}); "
                "for Postgres: pip install 'piaa-index[postgres]'"
            ) from None
        url_names_database = bool(engine.url.database) or "dbname" in engine.url.query
        if engine.dialect.name == "postgresql" and not url_names_database:
            # Without one, the driver connects to the database named as the user (usually the
            # server's maintenance database) and would create the library's tables there.
            shown = engine.url.render_as_string(hide_password=True)
            engine.dispose()
            raise malformed(
                f"the database URL {shown} names no database: add one after the last '/', "
                "e.g. postgresql+psycopg://user@host:5432/piaa"
            )
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        store = cls(engine)
        try:
            if not store._is_current():
                store._check_and_upgrade(upgrade)
        except DatabaseError as exc:  # not a database, damaged, unreachable, no permission
            engine.dispose()
            shown = engine.url.render_as_string(hide_password=True)
            if engine.dialect.name == "sqlite" and is_damaged_database(exc.orig):
                raise StoreError(
                    f"the database file is damaged: {exc.orig} ({shown}); `piaa db check` "
                    "reports the damage; " + DAMAGED_DATABASE_WAY_OUT
                ) from None
            raise StoreError(f"cannot open database {shown}: {exc.orig}") from None
        except UnicodeDecodeError as exc:  # SQLite's own message quoted a garbled schema
            engine.dispose()
            shown = engine.url.render_as_string(hide_password=True)
            raise StoreError(
                f"the database file is damaged: its schema holds bytes that are not UTF-8 "
                f"({exc.reason}) ({shown}); `piaa db check` reports the damage; "
                + DAMAGED_DATABASE_WAY_OUT
            ) from None
        return store

    def _is_current(self) -> bool:
        """The common case, checked without alembic or the first-open lock: the schema is at
        this code's head and the library has its id. Anything else takes the full path."""

        database = self.engine.url.database
        if self.engine.dialect.name == "sqlite" and database and database != ":memory:":
            path = Path(database)
            # Connecting would create it outside the lock; an empty one is judged under it.
            if not path.exists() or path.stat().st_size == 0:
                return False
        try:
            with self.engine.connect() as conn:
                current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
                if current != head_revision():
                    return False
                return (
                    conn.execute(select(Setting.key).where(Setting.key == "store_id")).first()
                    is not None
                )
        except DatabaseError:  # no tables yet, or unreachable: the full path says which
            return False

    def _check_and_upgrade(self, upgrade: bool) -> None:
        """Check and upgrade the schema and give a new database its id, one process at a time:
        several processes opening a brand-new library together must not all create the tables,
        nor each record their own store id (it names the library's vector folder)."""
        with self._first_open_lock():
            database = self.engine.url.database
            if self.engine.dialect.name == "sqlite" and database and database != ":memory:":
                _check_sqlite_file(Path(database))
            self._check_and_upgrade_locked(upgrade)

    def _check_and_upgrade_locked(self, upgrade: bool) -> None:
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Held to the end of this transaction; others wait, then see the tables.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            cfg = _alembic_config(conn)
            script = ScriptDirectory.from_config(cfg)
            current = MigrationContext.configure(conn).get_current_revision()
            known = {rev.revision for rev in script.walk_revisions()}
            if current is not None and current not in known:
                raise StoreError(
                    f"database {self.engine.url!r} has schema revision {current}, newer than "
                    "this piaa-index understands; upgrade piaa-index"
                )
            if upgrade and current != script.get_current_head():
                from alembic import command

                command.upgrade(cfg, "head")
            has_id = conn.execute(select(Setting.key).where(Setting.key == "store_id")).first()
            if has_id is None:
                conn.execute(
                    _SETTING_TABLE.insert(),
                    {"key": "store_id", "value": {"uuid": uuid.uuid4().hex}},
                )

    @contextmanager
    def _first_open_lock(self) -> Iterator[None]:
        """SQLite: an advisory file lock beside the database for the duration of the check
        (Postgres uses an advisory lock inside the transaction instead)."""
        database = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not database or database == ":memory:":
            yield
            return
        # Windows has no flocks: first opens are then the user's to serialise.
        with file_lock(open_lock(database)):
            yield

    def integrity_problems(self) -> list[str]:
        """What the database's own check reports (SQLite: PRAGMA integrity_check); [] when
        sound. Postgres keeps its own consistency; there only reachability is checked."""

        with self.engine.connect() as conn:
            if self.engine.dialect.name != "sqlite":
                conn.execute(text("SELECT 1"))
                return []
            rows = [str(r[0]) for r in conn.execute(text("PRAGMA integrity_check"))]
        return [] if rows == ["ok"] else rows

    def schema_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @property
    def store_id(self) -> str:
        value = self.get_setting("store_id")
        assert value is not None
        return str(value["uuid"])

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self._sessions.begin() as session:
            yield session

    # -- settings ------------------------------------------------------------------------------

    def get_setting(self, key: str) -> dict | None:
        with self.session() as s:
            row = s.get(Setting, key)
            return None if row is None else dict(row.value)

    def set_setting(self, key: str, value: dict) -> None:
        with self.session() as s:
            s.merge(Setting(key=key, value=value))


def _check_sqlite_file(path: Path, allow_empty: bool = False) -> None:
    """Refuse what would otherwise silently become a new, empty library: a file that is not
    SQLite, or one truncated to 0 bytes (its vocabulary, tags and vector links would be lost).
    The file is only ever opened through SQLite (see `sqlite_file_kind`)."""
    try:
        kind = sqlite_file_kind(path)
        if kind == "missing":
            path.parent.mkdir(parents=True, exist_ok=True)
            return
    except OSError as exc:
        raise StoreError(f"cannot use database file {path}: {exc.strerror or exc}") from None
    if kind == "folder":
        raise StoreError(f"{path} is a folder, not a database file")
    if kind == "empty" and allow_empty:
        return
    if kind == "empty":
        raise StoreError(
            f"database file {path} is empty (0 bytes): it was truncated or damaged. Restore it "
            "from a backup, or move it away to start a new library"
        )
    if kind != "sqlite":
        raise StoreError(f"{path} is not a SQLite database (wrong --db or PIAA_DB?)")


def _with_available_driver(url: str) -> str:
    """`postgresql://` means psycopg2 to SQLAlchemy 2.0; use psycopg 3 when only it is there."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url

    if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # WAL keeps readers working while an index run writes; foreign keys make CASCADE real.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
