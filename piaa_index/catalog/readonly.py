"""The store's read-only twin, for a fresh `piaa search` process on a SQLite library.

Importing SQLAlchemy (and the ORM schema) is most of a query command's start-up: ~0.25 s of a
~0.5 s `piaa search`. A boolean search needs only a handful of SELECTs and the memory-mapped
score matrix, so this module runs those SELECTs through the standard library's `sqlite3`.

It answers only when the answer needs no write: the schema is this code's, the scores belong to
the current vocabulary and hold every indexed image. Anything else (Postgres, a stale
vocabulary, images not scored yet, a schema to upgrade, another model asked for, a damaged
file) returns None, and the caller opens `Library`, which fits, scores, upgrades or names the
problem. These statements mirror `Store`'s; tests/test_store_readonly.py checks that both
answer alike.
"""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from piaa_index.catalog.status import INDEXED
from piaa_index.config import Settings
from piaa_index.textio import from_db_text, to_db_text

SQLITE_PREFIX = "sqlite:///"


def migrations_dir() -> Path:
    import piaa_index_migrations

    return Path(piaa_index_migrations.__file__).parent


def head_revision() -> str:
    """This code's schema head, from the migration file names (`NNNN_what.py` holds revision
    "NNNN", each one's parent the one before): opening an up-to-date library then needs no
    alembic import, a third of a query's start-up. A test checks it against alembic's head."""
    numbers = [
        f.name.split("_", 1)[0]
        for f in (migrations_dir() / "versions").glob("[0-9]*_*.py")
        if f.name.split("_", 1)[0].isdigit()
    ]
    return max(numbers, key=int)


def sqlite_file_kind(path: Path) -> str:
    """What `path` holds: "missing", "folder", "empty", "sqlite" or "other" (not a database).

    Never opens the file outside SQLite: closing any descriptor of a database file drops every
    POSIX lock this process holds on it (SQLite's "How To Corrupt", section 2.2), so a server
    whose connections are open would lose its locks, and another process closing the library
    would then delete the WAL the server still writes into. SQLite itself shares one descriptor
    per file among the process's connections, so probing through it is safe."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    if st.st_size == 0:
        return "empty"
    try:
        probe = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return "other"
    try:
        probe.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError:
        return "other"  # "file is not a database"
    except UnicodeDecodeError:
        return "sqlite"  # SQLite quoted a garbled schema: a damaged database, said on open
    finally:
        probe.close()
    return "sqlite"


class ReadOnlyStore:
    """A SQLite library's catalog, read in one snapshot (`snapshot()`), never written."""

    def __init__(self, connection: sqlite3.Connection):
        self.connection = connection

    @classmethod
    def open(cls, db_url: str) -> ReadOnlyStore | None:
        """None unless `db_url` names an existing SQLite file at this code's schema head."""
        if not db_url.startswith(SQLITE_PREFIX) or "?" in db_url:
            return None
        path = Path(db_url.removeprefix(SQLITE_PREFIX)).expanduser()
        if sqlite_file_kind(path) != "sqlite":
            return None  # missing, empty or not SQLite: `Store.open` says what to do
        try:
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return None
        store = cls(connection)
        try:
            connection.execute("PRAGMA query_only=ON")
            current = store._one("SELECT version_num FROM alembic_version")
            if current is None or current[0] != head_revision():
                store.close()
                return None
        except (sqlite3.Error, UnicodeDecodeError):  # damaged: `Store.open` says so
            store.close()
            return None
        return store

    def close(self) -> None:
        self.connection.close()

    @contextmanager
    def snapshot(self) -> Iterator[ReadOnlyStore]:
        """One read transaction: every SELECT inside sees the same commit (WAL snapshot)."""
        self.connection.execute("BEGIN")
        try:
            yield self
        finally:
            self.connection.execute("ROLLBACK")

    def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with closing(self.connection.execute(sql, params)) as cursor:
            row = cursor.fetchone()
        return None if row is None else tuple(row)

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with closing(self.connection.execute(sql, params)) as cursor:
            return [tuple(r) for r in cursor.fetchall()]

    def get_setting(self, key: str) -> dict | None:
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        return None if row is None else dict(json.loads(row[0]))

    def vocabulary(self) -> tuple[int, list[str]] | None:
        """(id, label names in order) of the newest vocabulary, as `Store.vocabulary`."""
        row = self._one("SELECT id FROM vocabularies ORDER BY id DESC LIMIT 1")
        if row is None:
            return None
        names = self._all(
            "SELECT name FROM labels WHERE vocabulary_id = ? ORDER BY position", (row[0],)
        )
        return int(row[0]), [str(n) for (n,) in names]

    def latest_classifier(self) -> tuple[int, int, str | None, list[str]] | None:
        """(id, vocabulary id, scores key, score segments) of the newest classifier."""
        row = self._one(
            "SELECT id, vocabulary_id, scores_key, score_segments FROM classifiers "
            "ORDER BY id DESC LIMIT 1"
        )
        if row is None:
            return None
        segments = json.loads(row[3]) if row[3] is not None else []
        return int(row[0]), int(row[1]), row[2], [str(s) for s in segments or []]

    def indexed_count(self) -> int:
        row = self._one("SELECT count(*) FROM images WHERE status = ?", (INDEXED,))
        return int(row[0]) if row else 0

    def has_indexed_after(self, shard: int) -> bool:
        """Whether an indexed image lies in a shard newer than `shard` (`locations_after`)."""
        # `+status`: SQLite then reads the few rows past `shard` from the shard index instead
        # of walking the status index over every indexed image (270 ms at 1M).
        sql = "SELECT 1 FROM images WHERE shard > ? AND +status = ? LIMIT 1"
        return self._one(sql, (shard, INDEXED)) is not None

    def image_by_path(self, path: str) -> tuple[int, str] | None:
        """(id, status) of the image stored under `path`, as `Store.image_by_path`."""
        row = self._one("SELECT id, status FROM images WHERE path = ?", (to_db_text(path),))
        return None if row is None else (int(row[0]), str(row[1]))

    def templates(self, vocabulary_id: int) -> list[str] | None:
        """A vocabulary's prompt templates (None: not readable as stored)."""
        row = self._one("SELECT templates FROM vocabularies WHERE id = ?", (vocabulary_id,))
        try:
            value = json.loads(row[0]) if row is not None and row[0] is not None else []
        except ValueError:
            return None
        return [str(t) for t in value] if isinstance(value, list) else None

    def decisions(self, classifier_id: int) -> dict | None:
        """The tag rule a classifier was installed with (its report's "decisions")."""
        row = self._one("SELECT report FROM classifiers WHERE id = ?", (classifier_id,))
        report = json.loads(row[0]) if row is not None and row[0] is not None else None
        return report.get("decisions") if isinstance(report, dict) else None

    def paths(self, ids: Sequence[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            for image_id, path in self._all(
                f"SELECT id, path FROM images WHERE id IN ({marks})", chunk
            ):
                out[int(image_id)] = from_db_text(path)
        return out


def search(
    settings: Settings, expression: str, limit: int | None, include_absent: bool = False
) -> list[dict[str, Any]] | None:
    """`Library.search`'s rows when the library can answer without writing, else None."""
    from piaa_index.query.engine import parse_query, search_rows

    def answer(store: ReadOnlyStore, current: _Current) -> list[dict[str, Any]]:
        node = parse_query(expression, current.names)
        return search_rows(node, current.names, current.view, store.paths, limit, include_absent)

    return _read_only(settings, answer)


def tags(settings: Settings, path: str) -> list[dict[str, Any]] | None:
    """`Library.tags`'s rows when the library can answer without writing, else None (also for
    any path it does not hold as an indexed image: the full path says why)."""
    from piaa_index.method.decisions import Decisions
    from piaa_index.query.engine import path_candidates, tag_rows

    def answer(store: ReadOnlyStore, current: _Current) -> list[dict[str, Any]] | None:
        found = next(filter(None, map(store.image_by_path, path_candidates(path))), None)
        if found is None or found[1] != INDEXED:
            return None
        located = current.view.row_of(found[0])
        rule = store.decisions(current.classifier_id)
        if located is None or rule is None:
            return None
        seg, r = located
        stored = store.paths([found[0]])[found[0]]
        return tag_rows(current.names, Decisions.from_json(rule), seg.mats, r, stored)

    return _read_only(settings, answer)


def vocabulary_listing(settings: Settings) -> dict[str, Any] | None:
    """`piaa vocab list --json`'s object (version, labels, templates), read-only; None where
    the library path must answer (no database yet, another model asked for, SQLite trouble)."""

    def read(store: ReadOnlyStore) -> dict[str, Any] | None:
        vocab = store.vocabulary()
        if vocab is None:
            return {"version": None, "labels": [], "templates": []}
        templates = store.templates(vocab[0])
        if templates is None:
            return None
        return {"version": vocab[0], "labels": vocab[1], "templates": templates}

    return _in_snapshot(settings, read)


@dataclass
class _Current:
    """What a read-only answer reads: the vocabulary's names, its classifier and the score
    matrix, current (nothing indexed or removed since it was written)."""

    names: list[str]
    classifier_id: int
    view: Any  # scores.ScoreView


def _read_only(settings: Settings, answer: Any) -> Any:
    """`answer(store, current)` in one read snapshot, or None whenever the scores are not
    current (a refit, new images, removals) or `_in_snapshot` says no: the full path then
    deals with it."""
    from piaa_index.vectors.scores import ScoreView, scores_root

    def read(store: ReadOnlyStore) -> Any:
        vocab = store.vocabulary()
        classifier = store.latest_classifier()
        store_id = store.get_setting("store_id")
        if vocab is None or classifier is None or store_id is None:
            return None
        classifier_id, vocabulary_id, key, segments = classifier
        if vocabulary_id != vocab[0] or not key or not segments:
            return None  # a refit or a first scoring is due
        folder = scores_root(settings.home / "vectors" / str(store_id["uuid"])) / key
        try:
            view = ScoreView.open(folder, key, segments)
        except (OSError, ValueError):
            return None  # lost or damaged: the full path re-scores
        # `Store.changes_since`'s cheap test: nothing indexed since, nothing removed.
        if store.has_indexed_after(view.max_shard):
            return None
        if int(np.count_nonzero(view.valid)) != store.indexed_count():
            return None
        return answer(store, _Current(vocab[1], classifier_id, view))

    return _in_snapshot(settings, read)


def _in_snapshot(settings: Settings, read: Any) -> Any:
    """`read(store)` in one read snapshot of the SQLite database, or None when there is no
    such database, the user asked for another model (`Library.open` says no) or SQLite cannot
    be read as expected (locked, damaged, an older layout)."""
    store = ReadOnlyStore.open(settings.db_url)
    if store is None:
        return None
    try:
        with store.snapshot():
            if not _same_model(store, settings):
                return None
            return read(store)
    except (sqlite3.Error, UnicodeDecodeError):  # SQLite may quote garbled text
        return None
    finally:
        store.close()


def _same_model(store: ReadOnlyStore, settings: Settings) -> bool:
    """False when the user asked for a model setting: `Library.open` checks it (and says no)."""
    if settings.pretrained is not None:
        return False
    record = store.get_setting("model") or {}
    return all(
        asked is None or asked == record.get(key)
        for key, asked in (("model", settings.model), ("front_end", settings.front_end))
    )
