"""SQL metadata through SQLAlchemy: the source of truth for which images are committed.

The schema is owned by Alembic (`migrations/`); opening a store upgrades it, and a database
stamped by a newer piaa-index is refused rather than silently misread.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    MetaData,
    Table,
    Text,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.exc import ArgumentError, DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from piaa_index.catalog import schema
from piaa_index.catalog.readonly import head_revision, migrations_dir, sqlite_file_kind
from piaa_index.catalog.schema import (
    FAILED,
    INDEXED,
    ApiKey,
    Classifier,
    DataVersion,
    FsText,
    Image,
    ImageChange,
    Label,
    Setting,
    Tag,
    UserLabel,
    Vocabulary,
    XmpSidecar,
)
from piaa_index.errors import DAMAGED_DATABASE_WAY_OUT, PiaaError, is_damaged_database


class StoreError(PiaaError):
    """A database that cannot be opened or used, with a message for the user."""


# Declarative typing gives `__table__` as a FromClause; for a mapped class it is the Table.
_TAG_TABLE = cast(Table, Tag.__table__)

_SETTING_TABLE = cast(Table, Setting.__table__)
_SIDECAR_TABLE = cast(Table, XmpSidecar.__table__)
# pg_advisory_xact_lock key of schema checks and upgrades ("piaa" in ASCII).
_MIGRATION_LOCK = 0x70696161

# The roots of one index run, joined against `images` (see `Store.images_under`). Temporary:
# private to the connection, gone with it; never part of the Alembic-owned schema.
_SCAN_SCOPE = Table(
    "piaa_scan_scope",
    MetaData(),
    Column("root", FsText),
    Column("lo", FsText),
    Column("hi", FsText),
    prefixes=["TEMPORARY"],
)


# The present tags (image, label name) before a re-tag, to mark in the change feed exactly the
# images whose present labels changed (see `Store._retag_changes`). Temporary, like the above.
_OLD_TAGS = Table(
    "piaa_old_tags",
    MetaData(),
    Column("image_id", BigInteger),
    Column("name", Text),
    prefixes=["TEMPORARY"],
)
_CHANGE_TABLE = cast(Table, ImageChange.__table__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _alembic_config(connection):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["connection"] = connection
    return cfg


class KnownImage(NamedTuple):
    """What an index run needs of an image it may skip, re-encode or prune."""

    id: int
    path: str
    size: int
    mtime: float
    status: str


@dataclass(frozen=True)
class LabelInfo:
    id: int
    name: str
    position: int
    templates: list[str]


@dataclass(frozen=True)
class VocabularyInfo:
    id: int
    templates: list[str]
    labels: list[LabelInfo]

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]


class SidecarRecord(NamedTuple):
    """What `piaa export xmp` remembers of a sidecar it wrote (its original bytes load apart)."""

    path: str
    created: bool
    has_original: bool
    written_sha256: str
    keywords_sha256: str


class Store:
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
        from piaa_index.errors import UsageError

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
        from sqlalchemy import text

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
        from sqlalchemy import text

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
        try:
            import fcntl
        except ImportError:  # Windows: first opens are the user's to serialise
            yield
            return
        with open(f"{database}.open.lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def integrity_problems(self) -> list[str]:
        """What the database's own check reports (SQLite: PRAGMA integrity_check); [] when
        sound. Postgres keeps its own consistency; there only reachability is checked."""
        from sqlalchemy import text

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

    # -- users' own labels (migration 0006) ---------------------------------------------------

    def set_user_labels(self, rows: Sequence[tuple[int, str, bool]], source: str) -> int:
        """Record (image id, label name, present) as the user's labels from `source`, replacing
        what was recorded for the same image and label; returns the rows that changed. Rows
        that say what is already recorded write nothing (and do not count as a change the
        next fit must learn from)."""
        from piaa_index.query.language import normalize_label

        latest: dict[tuple[int, str], tuple[str, bool]] = {}
        for image_id, name, present in rows:
            latest[(int(image_id), normalize_label(name))] = (name.strip(), bool(present))
        now = utcnow()
        items = list(latest.items())
        changed = 0
        with self.session() as s:
            for start in range(0, len(items), 500):
                chunk = items[start : start + 500]
                ids = sorted({image_id for (image_id, _), _ in chunk})
                held = {
                    (int(i), k): (n, bool(p))
                    for i, k, n, p in s.execute(
                        select(
                            UserLabel.image_id, UserLabel.label, UserLabel.name, UserLabel.present
                        ).where(UserLabel.image_id.in_(ids))
                    )
                }
                todo = [(pair, value) for pair, value in chunk if held.get(pair) != value]
                for (image_id, key), _ in todo:
                    if (image_id, key) in held:
                        s.execute(
                            delete(UserLabel).where(
                                UserLabel.image_id == image_id, UserLabel.label == key
                            )
                        )
                s.add_all(
                    UserLabel(
                        image_id=image_id,
                        label=key,
                        name=name,
                        present=present,
                        source=source,
                        updated_at=now,
                    )  # fmt: skip
                    for (image_id, key), (name, present) in todo
                )
                changed += len(todo)
            if changed:
                self._bump_user_labels(s)
        return changed

    def forget_user_labels(self, image_ids: Sequence[int], label: str | None = None) -> int:
        """Delete the user's labels of these images (of one label only when given)."""
        from piaa_index.query.language import normalize_label

        n = 0
        with self.session() as s:
            for start in range(0, len(image_ids), 500):
                q = delete(UserLabel).where(UserLabel.image_id.in_(image_ids[start : start + 500]))
                if label is not None:
                    q = q.where(UserLabel.label == normalize_label(label))
                n += int(cast(CursorResult, s.execute(q)).rowcount or 0)
            if n:
                self._bump_user_labels(s)
        return n

    def user_labels(self) -> list[tuple[int, str, str, bool, str]]:
        """Every user label: (image id, label key, name, present, source), by image."""
        with self.session() as s:
            rows = s.execute(
                select(
                    UserLabel.image_id,
                    UserLabel.label,
                    UserLabel.name,
                    UserLabel.present,
                    UserLabel.source,
                ).order_by(UserLabel.image_id, UserLabel.label)
            ).all()
        return [(int(i), k, n, bool(p), src) for i, k, n, p, src in rows]

    def user_labels_version(self) -> int:
        """A counter bumped by every change to the user's labels (what a fit learnt from)."""
        value = self.get_setting("user_labels")
        return int(value["version"]) if value else 0

    def user_labels_of(self, image_id: int) -> list[dict[str, Any]]:
        """The user's labels of one image (label as spelt, present, source, updated_at), by
        label key."""
        with self.session() as s:
            rows = s.execute(
                select(*_LABEL_COLUMNS)
                .where(UserLabel.image_id == image_id)
                .order_by(UserLabel.label)
            ).all()
        return [_label_row(r) for r in rows]

    def user_label_page(
        self,
        after: tuple[int, str] | None,
        limit: int,
        label_key: str | None = None,
        source: str | None = None,
    ) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
        """Up to `limit` user labels after (image id, label key), by image then label, with each
        image's id and path; and the (image id, label key) to continue after, or None at the
        end (keyset paging)."""
        q = (
            select(*_LABEL_COLUMNS, Image.path)
            .join(Image, Image.id == UserLabel.image_id)
            .order_by(UserLabel.image_id, UserLabel.label)
            .limit(limit + 1)
        )
        if after is not None:
            a, key = after
            q = q.where(
                or_(UserLabel.image_id > a, and_(UserLabel.image_id == a, UserLabel.label > key))
            )
        if label_key is not None:
            q = q.where(UserLabel.label == label_key)
        if source is not None:
            q = q.where(UserLabel.source == source)
        with self.session() as s:
            found = s.execute(q).all()
        rows = [{**_label_row(r), "image": int(r.image_id), "path": r.path} for r in found[:limit]]
        if len(found) <= limit:
            return rows, None
        last = found[limit - 1]
        return rows, (int(last.image_id), str(last.label))

    def indexed_ids(self, ids: Sequence[int]) -> set[int]:
        """Which of `ids` are indexed images (any number of them)."""
        wanted = sorted(set(int(i) for i in ids))
        out: set[int] = set()
        with self.session() as s:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                q = select(Image.id).where(Image.id.in_(chunk), Image.status == INDEXED)
                out.update(int(i) for i in s.scalars(q))
        return out

    def indexed_ids_by_path(self, paths: Sequence[str]) -> dict[str, int]:
        """path -> id of those `paths` (exactly as stored) that are indexed images."""
        wanted = list(dict.fromkeys(paths))
        out: dict[str, int] = {}
        with self.session() as s:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                rows = s.execute(
                    select(Image.path, Image.id).where(
                        Image.path.in_(chunk), Image.status == INDEXED
                    )
                ).all()
                out.update({str(p): int(i) for p, i in rows})
        return out

    def newest_images(
        self, before: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Up to `limit` indexed images, newest (highest id) first, below `before`; and the id
        to continue below, or None at the end. Rows as `image_page` gives them."""
        q = (
            select(
                Image.id,
                Image.path,
                Image.content_hash,
                Image.width,
                Image.height,
                Image.size,
                Image.indexed_at,
            )
            .where(Image.status == INDEXED)
            .order_by(Image.id.desc())
            .limit(limit + 1)
        )
        if before is not None:
            q = q.where(Image.id < before)
        with self.session() as s:
            found = s.execute(q).all()
        rows = [
            {
                "id": int(r.id),
                "path": r.path,
                "content_hash": r.content_hash,
                "width": r.width,
                "height": r.height,
                "size": int(r.size or 0),
                "indexed_at": r.indexed_at,
            }
            for r in found[:limit]
        ]
        return rows, (int(found[limit - 1].id) if len(found) > limit else None)

    @staticmethod
    def _bump_user_labels(s: Session) -> None:
        row = s.get(Setting, "user_labels")
        version = int(row.value["version"]) + 1 if row is not None else 1
        s.merge(Setting(key="user_labels", value={"version": version}))

    # -- images --------------------------------------------------------------------------------

    def image_by_path(self, path: str) -> Image | None:
        with self.session() as s:
            return s.scalars(select(Image).where(Image.path == path)).first()

    def image_by_id(self, image_id: int) -> Image | None:
        with self.session() as s:
            return s.get(Image, image_id)

    def images_under(self, roots: Sequence[str]) -> dict[str, KnownImage]:
        """Every known image that is one of `roots` or lies under one of them, by path.

        Any number of roots costs a fixed number of statements: the roots go into a temporary
        table (one executemany) and one join reads each root's index range of `images.path`
        (paths under "r" sort in ["r", "r" + chr(ord(sep) + 1)) byte-wise). The range also holds
        siblings such as "r.jpg"; the exact test per row, against the root it came with, drops
        them in O(1). So a run over 10,000 files is O(files), never O(files x roots).
        """
        sep = os.sep
        bounds: dict[str, tuple[str, str]] = {}
        for root in _outermost(roots, sep):
            base = root.rstrip(sep) if root.strip(sep) else ""  # "/" -> "": every absolute path
            bounds[root] = (base, base + chr(ord(sep) + 1))
        if not bounds:
            return {}
        out: dict[str, KnownImage] = {}
        with self.session() as s:
            conn = s.connection()
            _SCAN_SCOPE.create(conn, checkfirst=True)  # temporary: this connection only
            conn.execute(_SCAN_SCOPE.delete())
            conn.execute(
                _SCAN_SCOPE.insert(),
                [{"root": lo, "lo": lo, "hi": hi} for lo, hi in bounds.values()],
            )
            path = Image.path
            if conn.dialect.name == "postgresql":
                # Byte order, whatever the database's locale; migration 0002 indexes it.
                path = path.collate("C")  # type: ignore[assignment]
            rows = s.execute(
                select(
                    Image.id, Image.path, Image.size, Image.mtime, Image.status, _SCAN_SCOPE.c.root
                ).join(_SCAN_SCOPE, and_(path >= _SCAN_SCOPE.c.lo, path < _SCAN_SCOPE.c.hi))
            ).all()
            _SCAN_SCOPE.drop(conn)
        for image_id, p, size, mtime, status, root in rows:
            if p == root or p.startswith(root + sep) or (not root and p.startswith(sep)):
                out[p] = KnownImage(image_id, p, size, mtime, status)
        return out

    def indexed_by_hash(self, hashes: Iterable[str]) -> dict[str, Image]:
        """An indexed image for each content hash that has one."""
        wanted = list(set(hashes))
        found: dict[str, Image] = {}
        with self.session() as s:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                rows = s.scalars(
                    select(Image).where(Image.content_hash.in_(chunk), Image.status == INDEXED)
                )
                for row in rows:
                    found.setdefault(row.content_hash or "", row)
        return found

    def image_ids_by_path(self, paths: Sequence[str]) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(select(Image.path, Image.id).where(Image.path.in_(paths))).all()
        return {p: i for p, i in rows}

    def reserve_images(self, paths: Sequence[str]) -> list[int]:
        """Placeholder rows for new paths, made before their shard is written; their ids.

        A placeholder has status `pending` until its shard commits, so a crash in between
        leaves a row that the next run retries (its size and mtime are 0, never a file's).
        """
        now = utcnow()
        rows = [
            {
                "path": p,
                "size": 0,
                "mtime": 0.0,
                "status": "pending",
                "error": "indexing did not finish",
                "indexed_at": now,
            }
            for p in paths
        ]
        with self.session() as s:
            s.execute(insert(Image), rows)
        ids = self.image_ids_by_path(list(paths))
        return [ids[p] for p in paths]

    def commit_images(self, updates: Sequence[dict], new_rows: Sequence[dict] = ()) -> None:
        """One index commit group, in one transaction and a fixed number of bulk statements:
        `updates` (each with the image `id`) point images at their durable shard rows or
        record them failed; `new_rows` are failed files seen for the first time.

        The tags of every updated image go in the same transaction: they are stale, and a
        crash must not leave new vectors with old tags (untagged images get re-tagged).
        """
        stale = [row["id"] for row in updates]
        with self.session() as s:
            if updates:
                s.execute(update(Image), list(updates))
            if new_rows:
                s.execute(insert(Image), list(new_rows))
            for start in range(0, len(stale), 500):
                s.execute(delete(Tag).where(Tag.image_id.in_(stale[start : start + 500])))
            self._mark_changed(s, stale)

    def commit_indexed(self, ids: Sequence[int], shard: int, sizes: Sequence[int]) -> None:
        """Mark images indexed at rows 0..n-1 of a durable shard (synthetic libraries: no file
        behind them, so the commit time stands in for the mtime)."""
        now = utcnow()
        self.commit_images(
            [
                {
                    "id": int(i),
                    "size": int(size),
                    "mtime": float(now.timestamp()),
                    "status": INDEXED,
                    "error": None,
                    "shard": shard,
                    "shard_row": row_no,
                    "indexed_at": now,
                }
                for row_no, (i, size) in enumerate(zip(ids, sizes, strict=True))
            ]
        )

    def changes_since(
        self,
        ids: np.ndarray,
        shards: np.ndarray,
        max_shard: int,
        valid: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """What changed for something built from the vectors (the score matrix, the [CLS] and
        patch indexes) whose rows hold images `ids` from `shards`, up to shard `max_shard`:
        (rows SQL no longer vouches for, as a mask; indexed images it lacks, as locations).

        Cheap path: images in shards newer than `max_shard` (each index commit writes a new
        shard) supersede their old rows, and if the counts then agree with SQL nothing was
        removed. Otherwise (prune, lost shard, failed re-encode) compare (id, shard) pairs with
        every indexed image once. `valid` marks the rows still counted (default: all).
        """
        valid = np.ones(len(ids), bool) if valid is None else np.asarray(valid, bool)
        stale = np.zeros(len(ids), bool)
        new = self.locations_after(max_shard)
        if new:
            new_ids = np.fromiter((loc[0] for loc in new), np.int64, len(new))
            stale |= valid & np.isin(ids, new_ids)
        if int((valid & ~stale).sum()) + len(new) == self.indexed_count():
            return stale, new
        live = self.live_locations()
        arr = np.asarray(live, dtype=np.int64).reshape(-1, 3)
        base = int(max(max_shard, int(arr[:, 1].max(initial=0)))) + 1
        live_keys = arr[:, 0] * base + arr[:, 1]
        keys = np.asarray(ids, np.int64) * base + np.asarray(shards, np.int64)
        stale |= valid & ~np.isin(keys, live_keys)
        held = np.isin(live_keys, keys[valid & ~stale])
        return stale, [live[i] for i in np.nonzero(~held)[0]]

    def move_images(self, ids: Sequence[int], shard: int) -> None:
        """Point images at rows 0..n-1 of a rewritten shard (vacuum), in one bulk statement."""
        rows = [{"id": int(i), "shard": shard, "shard_row": k} for k, i in enumerate(ids)]
        with self.session() as s:
            s.execute(update(Image), rows)

    def live_locations(self) -> list[tuple[int, int, int]]:
        """(image id, shard, row) for every indexed image, ordered for streaming shard by shard."""
        with self.session() as s:
            rows = s.execute(
                select(Image.id, Image.shard, Image.shard_row)
                .where(Image.status == INDEXED)
                .order_by(Image.shard, Image.shard_row)
            ).all()
            if s.connection().dialect.name == "sqlite":
                # The status index's count, in the same snapshot: a damaged table page can read
                # as no rows without an error, and every image would silently drop out.
                counted = s.scalar(
                    select(func.count()).select_from(Image).where(Image.status == INDEXED)
                )
                if int(counted or 0) != len(rows):
                    raise StoreError(
                        f"the database file is damaged: its images table holds {len(rows)} "
                        f"indexed images, its index {counted}; `piaa db check` reports the "
                        "damage; " + DAMAGED_DATABASE_WAY_OUT
                    )
        out: list[tuple[int, int, int]] = []
        for i, sh, r in rows:
            if i is None:  # a garbled schema no longer makes `id` the row id
                raise StoreError(
                    "the database file is damaged: an image row has no id; `piaa db check` "
                    "reports the damage; " + DAMAGED_DATABASE_WAY_OUT
                )
            if sh is None or r is None:  # an indexed image always has its vectors' location
                raise StoreError(f"indexed image {i} has no vector location")
            out.append((int(i), int(sh), int(r)))
        return out

    def referenced_shards(self) -> set[int]:
        with self.session() as s:
            rows = s.scalars(select(Image.shard).where(Image.shard.is_not(None)).distinct())
            return {int(r) for r in rows if r is not None}

    def mark_shards_missing(self, shards: Iterable[int]) -> int:
        """Images whose vectors were lost go back to the to-do list of the next index run."""
        lost = list(shards)
        if not lost:
            return 0
        with self.session() as s:
            hit = s.scalars(select(Image.id).where(Image.shard.in_(lost))).all()
            result = cast(
                CursorResult[Any],  # an UPDATE's result is a CursorResult, which has rowcount
                s.execute(
                    update(Image)
                    .where(Image.shard.in_(lost))
                    .values(status=schema.MISSING_VECTORS, shard=None, shard_row=None)
                ),
            )
            self._mark_changed(s, hit)
            return int(result.rowcount or 0)

    def paths(self, ids: Sequence[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        with self.session() as s:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start : start + 500])
                out.update(s.execute(select(Image.id, Image.path).where(Image.id.in_(chunk))).all())
        return out

    def content_hashes(self) -> dict[int, str]:
        """Every indexed image's content hash, by id (one SELECT)."""
        with self.session() as s:
            rows = s.execute(
                select(Image.id, Image.content_hash).where(Image.status == INDEXED)
            ).all()
        return {int(i): h for i, h in rows if h}

    def remove_images(self, ids: Sequence[int]) -> None:
        with self.session() as s:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start : start + 500])
                s.execute(delete(Tag).where(Tag.image_id.in_(chunk)))
                s.execute(delete(UserLabel).where(UserLabel.image_id.in_(chunk)))
                s.execute(delete(Image).where(Image.id.in_(chunk)))
            self._mark_changed(s, ids)

    def image_counts(self) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(select(Image.status, func.count()).group_by(Image.status)).all()
        return {status: int(n) for status, n in rows}

    def failed_images(self) -> list[tuple[str, str]]:
        with self.session() as s:
            rows = s.execute(
                select(Image.path, Image.error).where(Image.status == FAILED).order_by(Image.path)
            ).all()
        return [(p, e or "") for p, e in rows]

    # -- vocabulary ----------------------------------------------------------------------------

    def vocabulary(self) -> VocabularyInfo | None:
        """The current (newest) vocabulary, or None when none was ever set."""
        with self.session() as s:
            vocab = s.scalars(select(Vocabulary).order_by(Vocabulary.id.desc())).first()
            if vocab is None:
                return None
            labels = s.scalars(
                select(Label).where(Label.vocabulary_id == vocab.id).order_by(Label.position)
            ).all()
            return VocabularyInfo(
                id=vocab.id,
                templates=list(vocab.templates),
                labels=[
                    LabelInfo(lb.id, lb.name, lb.position, list(lb.templates or vocab.templates))
                    for lb in labels
                ],
            )

    def vocabulary_names(self, vocabulary_id: int) -> list[str]:
        """The label names of one vocabulary version, in order."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(Label.name)
                    .where(Label.vocabulary_id == vocabulary_id)
                    .order_by(Label.position)
                )
            )

    def new_vocabulary(
        self,
        names: Sequence[str],
        templates: Sequence[str],
        label_templates: dict[str, list[str]] | None = None,
    ) -> VocabularyInfo:
        """Record a new vocabulary version (the old one stays for the classifiers made on it)."""
        label_templates = label_templates or {}
        with self.session() as s:
            vocab = Vocabulary(templates=list(templates), created_at=utcnow())
            s.add(vocab)
            s.flush()
            for position, name in enumerate(names):
                s.add(
                    Label(
                        vocabulary_id=vocab.id,
                        position=position,
                        name=name,
                        templates=label_templates.get(name),
                    )
                )
        info = self.vocabulary()
        assert info is not None
        return info

    # -- classifiers and tags ------------------------------------------------------------------

    def latest_classifier(self) -> Classifier | None:
        with self.session() as s:
            return s.scalars(select(Classifier).order_by(Classifier.id.desc())).first()

    def install_classifier(
        self,
        classifier: Classifier,
        scores_key: str,
        segments: list[str],
        tags: Iterable[tuple[Any, Any, Any]],
    ) -> int:
        """Install a new classifier, pointing at its (already durable) score segments, with its
        sparse tags, in one transaction; older classifiers and their tags go.

        `tags` yields (image ids, label ids, fused scores) arrays of the present labels.
        Readers see the old classifier until the commit.
        """
        with self.session() as s:
            classifier.scores_key = scores_key
            classifier.score_segments = list(segments)
            s.add(classifier)
            s.flush()
            with self._retag_changes(s):
                s.execute(delete(Tag))
                self._insert_tags(s, int(classifier.id), tags)
            s.execute(delete(Classifier).where(Classifier.id != classifier.id))
            return int(classifier.id)

    def commit_segment(
        self,
        classifier_id: int,
        segments: list[str],
        rescored: Sequence[int],
        tags: Iterable[tuple[Any, Any, Any]],
        key: str | None = None,
    ) -> bool:
        """Point a classifier at one more (durable) segment and replace the sparse tags of the
        images it scored, in one transaction. With `key`, the classifier moves to a rebuilt
        score folder (its files were lost or predate score matrices) and all tags are replaced.
        False if the classifier is gone meanwhile."""
        with self.session() as s:
            row = s.get(Classifier, classifier_id)
            if row is None:
                return False
            row.score_segments = list(segments)
            if key is not None:
                row.scores_key = key
                with self._retag_changes(s):
                    s.execute(delete(Tag))
                    self._insert_tags(s, classifier_id, tags)
                return True
            for start in range(0, len(rescored), 500):
                chunk = [int(i) for i in rescored[start : start + 500]]
                s.execute(delete(Tag).where(Tag.image_id.in_(chunk)))
            self._insert_tags(s, classifier_id, tags)
            # New or re-encoded images: their tags were cleared by their index commit.
            self._mark_changed(s, rescored)
            return True

    @staticmethod
    def _insert_tags(s: Session, classifier_id: int, tags: Iterable[tuple[Any, Any, Any]]) -> None:
        conn = s.connection()
        copy = conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg"
        for image_ids, label_ids, scores in tags:
            if copy:
                _copy_tags(conn, classifier_id, image_ids, label_ids, scores)
                continue
            rows = [
                {"image_id": i, "label_id": lb, "classifier_id": classifier_id, "score": sc}
                for i, lb, sc in zip(
                    image_ids.tolist(), label_ids.tolist(), scores.tolist(), strict=True
                )
            ]
            for start in range(0, len(rows), 10_000):
                s.execute(_TAG_TABLE.insert(), rows[start : start + 10_000])

    def drop_classifier(self, classifier_id: int) -> None:
        """Remove a classifier whose stored weights are damaged (`piaa db check`), its tags with
        it: the next query (or `piaa fit`) fits the vocabulary again."""
        with self.session() as s:
            with self._retag_changes(s):
                s.execute(delete(Tag).where(Tag.classifier_id == classifier_id))
                s.execute(delete(Classifier).where(Classifier.id == classifier_id))

    def drop_score_segments(self, key: str, names: Sequence[str]) -> None:
        """Stop listing damaged segments of a score folder (`piaa db check`): the next query
        scores the images they held again."""
        drop = set(names)
        with self.session() as s:
            for row in s.scalars(select(Classifier).where(Classifier.scores_key == key)):
                row.score_segments = [n for n in row.score_segments or [] if n not in drop]

    def score_folders(self) -> dict[str, list[str]]:
        """Score folder key -> committed segment names, of every classifier."""
        with self.session() as s:
            rows = s.execute(select(Classifier.scores_key, Classifier.score_segments)).all()
        return {k: list(segs or []) for k, segs in rows if k}

    def data_version(self) -> int:
        """The catalog counter (bumped by triggers on images, classifiers, vocabularies)."""
        with self.session() as s:
            value = s.scalar(select(DataVersion.version).where(DataVersion.name == "catalog"))
        return int(value or 0)

    def indexed_count(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).where(Image.status == INDEXED)) or 0)

    def locations_after(self, shard: int) -> list[tuple[int, int, int]]:
        """(image id, shard, row) of indexed images in shards newer than `shard` (index range)."""
        with self.session() as s:
            # Status is checked here, not in SQL: with both conditions SQLite walks the status
            # index over every indexed image (270 ms at 1M) instead of the few newer shards.
            rows = s.execute(
                select(Image.id, Image.shard, Image.shard_row, Image.status)
                .where(Image.shard > shard)
                .order_by(Image.shard, Image.shard_row)
            ).all()
        return [(int(i), int(sh or 0), int(r or 0)) for i, sh, r, st in rows if st == INDEXED]

    def location(self, image_id: int) -> tuple[int, int] | None:
        """(shard, row) of an indexed image."""
        with self.session() as s:
            row = s.execute(
                select(Image.shard, Image.shard_row).where(
                    Image.id == image_id, Image.status == INDEXED
                )
            ).first()
        if row is None or row[0] is None or row[1] is None:
            return None
        return int(row[0]), int(row[1])

    def indexed_paths(self) -> list[str]:
        with self.session() as s:
            return [str(p) for p in s.scalars(select(Image.path).where(Image.status == INDEXED))]

    def present_tags(self) -> Iterator[tuple[str, str, float]]:
        """(path, label, fused score) of every present tag, by path then best score first."""
        with self.session() as s:
            rows = s.execute(
                select(Image.path, Label.name, Tag.score)
                .join(Image, Image.id == Tag.image_id)
                .join(Label, Label.id == Tag.label_id)
                .order_by(Image.path, Tag.score.desc())
            )
            for path, name, score in rows:
                yield str(path), str(name), float(score)

    def tag_counts(self) -> dict[str, int]:
        """Images tagged present, per label name (the sparse table holds present rows only)."""
        with self.session() as s:
            rows = s.execute(
                select(Label.name, func.count())
                .join(Tag, Tag.label_id == Label.id)
                .group_by(Label.name)
            ).all()
        return {n: int(c) for n, c in rows}

    # -- XMP sidecars we wrote (piaa_index/xmp/sidecars.py) ----------------------------------------------

    def sidecar_records(self) -> dict[str, SidecarRecord]:
        """Every sidecar we wrote, by path (without the original bytes)."""
        with self.session() as s:
            rows = s.execute(
                select(
                    XmpSidecar.path,
                    XmpSidecar.created,
                    XmpSidecar.original.is_not(None),
                    XmpSidecar.written_sha256,
                    XmpSidecar.keywords_sha256,
                )
            ).all()
        return {
            str(p): SidecarRecord(str(p), bool(c), bool(o), str(h), str(k))
            for p, c, o, h, k in rows
        }

    def sidecar_original(self, path: str) -> bytes | None:
        """The bytes a sidecar had before our first write (None: we created it, or it is gone)."""
        with self.session() as s:
            value = s.scalar(select(XmpSidecar.original).where(XmpSidecar.path == path))
        return None if value is None else bytes(value)

    def record_sidecars(self, new: Sequence[dict], written: Sequence[dict]) -> None:
        """Remember sidecars before we write them: `new` rows (path, created, original,
        written_sha256, keywords_sha256) replace any row of their path; `written` rows (path,
        written_sha256, keywords_sha256, keep_original) update the hashes of our last write,
        dropping the original bytes when someone else changed the file since (they can no
        longer be restored as they were)."""
        now = utcnow()
        with self.session() as s:
            for start in range(0, len(new), 500):
                chunk = new[start : start + 500]
                s.execute(delete(XmpSidecar).where(XmpSidecar.path.in_([r["path"] for r in chunk])))
                s.execute(insert(XmpSidecar), [{**r, "written_at": now} for r in chunk])
            for keep in (True, False):
                rows = [
                    {
                        "b_path": r["path"],
                        "b_sha": r["written_sha256"],
                        "b_kw": r["keywords_sha256"],
                    }
                    for r in written
                    if r["keep_original"] == keep
                ]
                if not rows:
                    continue
                values: dict[str, Any] = {
                    "written_sha256": bindparam("b_sha"),
                    "keywords_sha256": bindparam("b_kw"),
                    "written_at": now,
                }
                if not keep:
                    values["original"] = None
                table = _SIDECAR_TABLE
                s.execute(
                    update(table).where(table.c.path == bindparam("b_path")).values(values), rows
                )

    def forget_sidecars(self, paths: Sequence[str]) -> None:
        with self.session() as s:
            for start in range(0, len(paths), 500):
                chunk = list(paths[start : start + 500])
                s.execute(delete(XmpSidecar).where(XmpSidecar.path.in_(chunk)))

    # -- the change feed (HTTP API `/api/tags?since=`) ------------------------------------------

    def feed_version(self) -> int:
        """The change feed's counter: every change numbered at or below it is committed."""
        with self.session() as s:
            value = s.scalar(select(DataVersion.version).where(DataVersion.name == "feed"))
        return int(value or 0)

    @staticmethod
    def _mark_changed(s: Session, ids: Iterable[int]) -> None:
        """Record a change of these images under a new feed version, in the caller's
        transaction. Bumping the counter row locks it until the commit, so feed versions are
        committed in order: a reader that saw version v will never see a new change <= v."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return
        s.execute(
            update(DataVersion)
            .where(DataVersion.name == "feed")
            .values(version=DataVersion.version + 1)
        )
        version = int(s.scalar(select(DataVersion.version).where(DataVersion.name == "feed")) or 0)
        if s.get_bind().dialect.name == "postgresql":
            # One upsert of an array: a fit's first re-tag changes every image (100k rows were
            # 7 s of DELETE / INSERT round trips, a sixth of the re-tag).
            from sqlalchemy.dialects.postgresql import ARRAY
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            ids = bindparam("ids", wanted, type_=ARRAY(BigInteger))
            rows = select(func.unnest(ids), bindparam("version", version, type_=BigInteger))
            upsert = pg_insert(ImageChange).from_select(["image_id", "version"], rows)
            s.execute(
                upsert.on_conflict_do_update(
                    index_elements=[ImageChange.image_id],
                    set_={"version": upsert.excluded.version},
                )
            )
            return
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            s.execute(delete(ImageChange).where(ImageChange.image_id.in_(chunk)))
            s.execute(_CHANGE_TABLE.insert(), [{"image_id": i, "version": version} for i in chunk])

    @contextmanager
    def _retag_changes(self, s: Session) -> Iterator[None]:
        """Around a replacement of the tags: mark in the feed exactly the images whose set of
        present label names changed (by name: a new vocabulary has new label ids), computed
        in SQL as the symmetric difference of the (image, name) pairs before and after."""
        conn = s.connection()
        _OLD_TAGS.create(conn, checkfirst=True)
        conn.execute(_OLD_TAGS.delete())
        current = select(Tag.image_id, Label.name).join(Label, Label.id == Tag.label_id)
        conn.execute(_OLD_TAGS.insert().from_select(["image_id", "name"], current))
        yield
        old = select(_OLD_TAGS.c.image_id, _OLD_TAGS.c.name)
        gone = old.except_(current).subquery()
        came = current.except_(old).subquery()
        changed = s.scalars(select(gone.c.image_id).union(select(came.c.image_id))).all()
        _OLD_TAGS.drop(conn)
        self._mark_changed(s, changed)

    def image_page(
        self, after: int, limit: int, since: int | None = None, upto: int | None = None
    ) -> tuple[list[dict[str, Any]], list[int], int | None]:
        """One page of images by id after `after`: (indexed images' metadata, removed ids,
        the last id of the page or None at the end).

        Without `since`: every indexed image. With it: the images changed in the feed after
        version `since` (up to `upto`); those gone or no longer indexed are `removed`."""
        columns = (
            Image.id,
            Image.path,
            Image.content_hash,
            Image.width,
            Image.height,
            Image.size,
            Image.indexed_at,
            Image.status,
        )
        with self.session() as s:
            if since is None:
                query = (
                    select(Image.id, *columns)
                    .where(Image.status == INDEXED, Image.id > after)
                    .order_by(Image.id)
                )
            else:
                query = (
                    select(ImageChange.image_id, *columns)
                    .outerjoin(Image, Image.id == ImageChange.image_id)
                    .where(ImageChange.version > since, ImageChange.image_id > after)
                    .order_by(ImageChange.image_id)
                )
                if upto is not None:
                    query = query.where(ImageChange.version <= upto)
            rows = s.execute(query.limit(limit)).all()
        images: list[dict[str, Any]] = []
        removed: list[int] = []
        for key, image_id, path, digest, width, height, size, at, status in rows:
            if image_id is None or status != INDEXED:
                removed.append(int(key))
                continue
            images.append(_image_dict(image_id, path, digest, width, height, size, at))
        last = int(rows[-1][0]) if len(rows) == limit else None
        return images, removed, last

    def image_info(self, image_id: int) -> dict[str, Any] | None:
        """Metadata of one indexed image by id (None when there is none)."""
        with self.session() as s:
            row = s.get(Image, image_id)
            if row is None or row.status != INDEXED:
                return None
            return _image_dict(
                row.id, row.path, row.content_hash, row.width, row.height, row.size, row.indexed_at
            )

    def image_refs(self, paths: Sequence[str]) -> dict[str, tuple[int, str | None]]:
        """path -> (id, content hash) of known images, for results that name images by path."""
        wanted = list(dict.fromkeys(paths))
        out: dict[str, tuple[int, str | None]] = {}
        with self.session() as s:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                rows = s.execute(
                    select(Image.path, Image.id, Image.content_hash).where(Image.path.in_(chunk))
                ).all()
                out.update({p: (int(i), h) for p, i, h in rows})
        return out

    def present_tags_of(self, ids: Sequence[int]) -> dict[int, list[tuple[str, float]]]:
        """image id -> [(label, fused score)] of its present tags, best first."""
        out: dict[int, list[tuple[str, float]]] = {int(i): [] for i in ids}
        with self.session() as s:
            for start in range(0, len(ids), 1000):
                chunk = [int(i) for i in ids[start : start + 1000]]
                rows = s.execute(
                    select(Tag.image_id, Label.name, Tag.score)
                    .join(Label, Label.id == Tag.label_id)
                    .where(Tag.image_id.in_(chunk))
                    .order_by(Tag.image_id, Tag.score.desc())
                )
                for image_id, name, score in rows:
                    out[int(image_id)].append((str(name), float(score)))
        return out

    # -- API keys (HTTP API) ---------------------------------------------------------------------

    def add_api_key(self, key_hash: str, prefix: str, scope: str, name: str | None) -> int:
        with self.session() as s:
            row = ApiKey(
                key_hash=key_hash, prefix=prefix, scope=scope, name=name, created_at=utcnow()
            )
            s.add(row)
            s.flush()
            return int(row.id)

    def api_keys(self) -> list[dict[str, Any]]:
        """Every key ever made (revoked ones too), without the hashes."""
        with self.session() as s:
            rows = s.scalars(select(ApiKey).order_by(ApiKey.id)).all()
            return [
                {
                    "id": r.id,
                    "name": r.name,
                    "scope": r.scope,
                    "prefix": r.prefix,
                    "created_at": r.created_at.isoformat(),
                    "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
                }
                for r in rows
            ]

    def revoke_api_key(self, key_id: int) -> bool:
        """False when there is no such key or it was revoked already."""
        with self.session() as s:
            row = s.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = utcnow()
            return True

    def api_key_scope(self, key_hash: str) -> str | None:
        """The scope of a live key by its hash, None when unknown or revoked."""
        with self.session() as s:
            return s.scalar(
                select(ApiKey.scope).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
            )

    def live_api_keys(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).where(ApiKey.revoked_at.is_(None))) or 0)


def _image_dict(
    image_id: int,
    path: str,
    digest: str | None,
    width: int | None,
    height: int | None,
    size: int,
    indexed_at: datetime | None,
) -> dict[str, Any]:
    return {
        "id": int(image_id),
        "path": path,
        "content_hash": digest,
        "width": width,
        "height": height,
        "size": int(size),
        "indexed_at": indexed_at.isoformat() if indexed_at else None,
    }


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


def _outermost(roots: Iterable[str], sep: str) -> list[str]:
    """The roots that lie under no other root (those add nothing to the scope)."""
    unique = {r.rstrip(sep) if r.strip(sep) else sep for r in roots}
    if sep in unique:
        return [sep]
    # A root with an ancestor among the roots is covered by that ancestor (or by its own).
    return sorted(
        root
        for root in unique
        if not any(
            sep.join(parts[:k]) in unique
            for parts in [root.split(sep)]
            for k in range(2, len(parts))
        )
    )


def _with_available_driver(url: str) -> str:
    """`postgresql://` means psycopg2 to SQLAlchemy 2.0; use psycopg 3 when only it is there."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    import importlib.util

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


def _copy_tags(conn: Any, classifier_id: int, image_ids: Any, label_ids: Any, scores: Any) -> None:
    """Sparse tag rows by COPY, in the session's transaction: psycopg's executemany sends one
    INSERT per row (2.5 s for the 50k rows of a 20k-image re-tag, half of the re-tag)."""
    table = conn.dialect.identifier_preparer.format_table(_TAG_TABLE)
    # repr: the shortest text that reads back as the same float64, so COPY stores the same
    # values as the INSERT path.
    text = "".join(
        f"{i}\t{lb}\t{classifier_id}\t{sc!r}\n"
        for i, lb, sc in zip(image_ids.tolist(), label_ids.tolist(), scores.tolist(), strict=True)
    )
    cursor = conn.connection.driver_connection.cursor()
    try:
        columns = "image_id, label_id, classifier_id, score"
        with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            copy.write(text.encode())
    finally:
        cursor.close()


_LABEL_COLUMNS = (
    UserLabel.image_id,
    UserLabel.label,
    UserLabel.name,
    UserLabel.present,
    UserLabel.source,
    UserLabel.updated_at,
)


def _label_row(row: Any) -> dict[str, Any]:
    return {
        "label": row.name,
        "present": bool(row.present),
        "source": row.source,
        "updated_at": row.updated_at,
    }
