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
import re
import sqlite3
import stat
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

from piaa_index.catalog.status import INDEXED
from piaa_index.config import Settings
from piaa_index.layout import DATABASE_MARKER
from piaa_index.textio import from_db_text, to_db_text

SQLITE_PREFIX = "sqlite:///"
# A Postgres URL the read-only twin opens with libpq, and that SQLAlchemy renders as it is
# written (`Library.status` shows the rendered URL): user, host, port and database, no password
# (rendered as ***), no query. Any other URL is left to the Library.
POSTGRES_URL = re.compile(
    r"postgresql(?:\+psycopg)?://((?:[A-Za-z0-9_.-]+@)?[A-Za-z0-9_.-]+(?::[0-9]+)?/[A-Za-z0-9_-]+)"
)


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
    """A library's catalog, read in one snapshot (`snapshot()`), never written: SQLite through
    `sqlite3`, Postgres through libpq (`catalog/libpq.py`: ~20 ms to load against psycopg's
    0.14-0.24 s import and SQLAlchemy's ~0.35 s). Both take sqlite3-style statements."""

    def __init__(self, connection: Any, dialect: str = "sqlite"):
        self.connection = connection
        self.dialect = dialect
        self.errors: tuple[type[BaseException], ...] = (sqlite3.Error, UnicodeDecodeError)

    @classmethod
    def open(cls, db_url: str) -> ReadOnlyStore | None:
        """None unless `db_url` names an existing SQLite file or a reachable Postgres database
        at this code's schema head."""
        if POSTGRES_URL.fullmatch(db_url):
            return cls._open_postgres(db_url)
        if not db_url.startswith(SQLITE_PREFIX) or "?" in db_url:
            return None
        if "%" in db_url:
            return None  # SQLAlchemy unquotes %XX in the path: it may open another file
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

    @classmethod
    def _open_postgres(cls, db_url: str) -> ReadOnlyStore | None:
        from piaa_index.catalog import libpq

        match = POSTGRES_URL.fullmatch(db_url)
        assert match is not None
        try:
            connection = libpq.connect(f"postgresql://{match.group(1)}")
        except libpq.Error:
            return None  # down, refused, or no libpq here: the Library says so
        store = cls(connection, "postgresql")
        store.errors = (libpq.Error, UnicodeDecodeError)
        try:
            current = store._one("SELECT version_num FROM alembic_version")
        except libpq.Error:
            current = None  # no such table: a new database, the Library creates it
        if current is None or current[0] != head_revision():
            store.close()
            return None
        return store

    def close(self) -> None:
        self.connection.close()

    @contextmanager
    def snapshot(self) -> Iterator[ReadOnlyStore]:
        """One read transaction: every SELECT inside sees the same commit (SQLite's WAL
        snapshot; Postgres's repeatable read)."""
        begin = "BEGIN" if self.dialect == "sqlite" else "BEGIN ISOLATION LEVEL REPEATABLE READ"
        self.connection.execute(begin + ("" if self.dialect == "sqlite" else " READ ONLY"))
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

    @staticmethod
    def _json(value: Any) -> Any:
        """A JSON column's value: text in SQLite, already decoded from Postgres (libpq.py)."""
        return json.loads(value) if isinstance(value, str | bytes) else value

    def get_setting(self, key: str) -> dict | None:
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        return None if row is None else dict(self._json(row[0]))

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
        segments = self._json(row[3]) if row[3] is not None else []
        return int(row[0]), int(row[1]), row[2], [str(s) for s in segments or []]

    def indexed_count(self) -> int:
        """As `Store.indexed_count`: the trigger-kept count (migration 0007)."""
        row = self._one("SELECT n FROM image_counts WHERE status = ?", (INDEXED,))
        return int(row[0]) if row else 0

    def has_indexed_after(self, shard: int) -> bool:
        """Whether an indexed image lies in a shard newer than `shard` (`locations_after`)."""
        # `+status`: SQLite then reads the few rows past `shard` from the shard index instead
        # of walking the status index over every indexed image (270 ms at 1M).
        sql = "SELECT 1 FROM images WHERE shard > ? AND +status = ? LIMIT 1"
        if self.dialect != "sqlite":
            sql = sql.replace("+status", "status")
        return self._one(sql, (shard, INDEXED)) is not None

    def data_version(self) -> int:
        """The catalog counter, as `Store.data_version` (the derived indexes save it)."""
        row = self._one("SELECT version FROM data_versions WHERE name = 'catalog'")
        return int(row[0] or 0) if row else 0

    def location(self, image_id: int) -> tuple[int, int] | None:
        """(shard, row) of an indexed image, as `Store.location`."""
        row = self._one(
            "SELECT shard, shard_row FROM images WHERE id = ? AND status = ?", (image_id, INDEXED)
        )
        if row is None or row[0] is None or row[1] is None:
            return None
        return int(row[0]), int(row[1])

    def live_locations(self) -> list[tuple[int, int, int]]:
        """(image id, shard, row) of every indexed image, shard by shard, as
        `Store.live_locations` (which also refuses a count that disagrees: a damaged page)."""
        rows = self._all(
            "SELECT id, shard, shard_row FROM images WHERE status = ? ORDER BY shard, shard_row",
            (INDEXED,),
        )
        counted = self._one("SELECT count(*) FROM images WHERE status = ?", (INDEXED,))
        if counted is None or len(rows) != int(counted[0]):
            raise sqlite3.DatabaseError("the images table and its status index disagree")
        return [(int(i), int(s), int(r)) for i, s, r in rows]

    def locations_after(self, shard: int) -> list[tuple[int, int, int]]:
        """(image id, shard, row) of indexed images in shards newer than `shard`, as
        `Store.locations_after` (status checked here: see `has_indexed_after`)."""
        rows = self._all(
            "SELECT id, shard, shard_row, status FROM images WHERE shard > ? "
            "ORDER BY shard, shard_row",
            (shard,),
        )
        return [(int(i), int(sh or 0), int(r or 0)) for i, sh, r, st in rows if st == INDEXED]

    def changes_since(
        self, ids: np.ndarray, shards: np.ndarray, max_shard: int
    ) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """`Store.changes_since`, read-only: the same rule (`changes_since`)."""
        return changes_since(self, ids, shards, max_shard)

    def image_by_path(self, path: str) -> tuple[int, str] | None:
        """(id, status) of the image stored under `path`, as `Store.image_by_path`."""
        row = self._one("SELECT id, status FROM images WHERE path = ?", (to_db_text(path),))
        return None if row is None else (int(row[0]), str(row[1]))

    def templates(self, vocabulary_id: int) -> list[str] | None:
        """A vocabulary's prompt templates (None: not readable as stored)."""
        row = self._one("SELECT templates FROM vocabularies WHERE id = ?", (vocabulary_id,))
        try:
            value = self._json(row[0]) if row is not None and row[0] is not None else []
        except ValueError:
            return None
        return [str(t) for t in value] if isinstance(value, list) else None

    def decisions(self, classifier_id: int) -> dict | None:
        """The tag rule a classifier was installed with (its report's "decisions")."""
        row = self._one("SELECT report FROM classifiers WHERE id = ?", (classifier_id,))
        report = self._json(row[0]) if row is not None and row[0] is not None else None
        return report.get("decisions") if isinstance(report, dict) else None

    def image_counts(self) -> dict[str, int]:
        """Images per status, as `Store.image_counts`."""
        rows = self._all("SELECT status, n FROM image_counts WHERE n > 0")
        return {str(status): int(n) for status, n in rows}

    def referenced_shards(self) -> set[int]:
        """The shards SQL points at, as `Store.referenced_shards`: one seek of the shard index
        per shard (a million images lie in ~1,000 shards) instead of a DISTINCT over every row."""
        found: set[int] = set()
        row = self._one("SELECT min(shard) FROM images WHERE shard IS NOT NULL")
        while row is not None and row[0] is not None:
            found.add(int(row[0]))
            row = self._one("SELECT min(shard) FROM images WHERE shard > ?", (row[0],))
        return found

    def ids_indexed_after(self, shard: int) -> np.ndarray:
        """Ids of the indexed images in shards newer than `shard` (`Store.locations_after`)."""
        rows = self._all("SELECT id, status FROM images WHERE shard > ?", (shard,))
        return np.array([int(i) for i, st in rows if st == INDEXED], dtype=np.int64)

    def vocabulary_names(self, vocabulary_id: int) -> list[str]:
        rows = self._all(
            "SELECT name FROM labels WHERE vocabulary_id = ? ORDER BY position", (vocabulary_id,)
        )
        return [str(n) for (n,) in rows]

    def classifier_facts(self, classifier_id: int) -> tuple[str, int, dict] | None:
        """(created_at as stored, n_images, report) of a classifier."""
        row = self._one(
            "SELECT created_at, n_images, report FROM classifiers WHERE id = ?", (classifier_id,)
        )
        if row is None:
            return None
        report = self._json(row[2]) if row[2] is not None else {}
        return str(row[0]), int(row[1]), report if isinstance(report, dict) else {}

    def tag_counts(self) -> dict[str, int]:
        """Images tagged present per label name, as `Store.tag_counts` (the same statement)."""
        rows = self._all(
            "SELECT labels.name, count(*) AS count_1 FROM labels "
            "JOIN tags ON tags.label_id = labels.id GROUP BY labels.name"
        )
        return {str(n): int(c) for n, c in rows}

    def score_folders(self) -> dict[str, list[str]]:
        """Score folder key -> committed segment names, as `Store.score_folders`."""
        rows = self._all("SELECT scores_key, score_segments FROM classifiers")
        return {k: list(self._json(segs) or []) if segs else [] for k, segs in rows if k}

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


def changes_since(
    store: Any,
    ids: np.ndarray,
    shards: np.ndarray,
    max_shard: int,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """What changed for something built from the vectors (the score matrix, the [CLS] and
    patch indexes) whose rows hold images `ids` from `shards`, up to shard `max_shard`:
    (rows SQL no longer vouches for, as a mask; indexed images it lacks, as locations). The
    one rule, for `Store` and its read-only twin (`store` gives `locations_after`,
    `indexed_count` and `live_locations`).

    Cheap path: images in shards newer than `max_shard` (each index commit writes a new
    shard) supersede their old rows, and if the counts then agree with SQL nothing was
    removed. Otherwise (prune, lost shard, failed re-encode) compare (id, shard) pairs with
    every indexed image once. `valid` marks the rows still counted (default: all).
    """
    valid = np.ones(len(ids), bool) if valid is None else np.asarray(valid, bool)
    stale = np.zeros(len(ids), bool)
    new = store.locations_after(max_shard)
    if new:
        new_ids = np.fromiter((loc[0] for loc in new), np.int64, len(new))
        stale |= valid & np.isin(ids, new_ids)
    if int((valid & ~stale).sum()) + len(new) == store.indexed_count():
        return stale, new
    live = store.live_locations()
    arr = np.asarray(live, dtype=np.int64).reshape(-1, 3)
    base = int(max(max_shard, int(arr[:, 1].max(initial=0)))) + 1
    live_keys = arr[:, 0] * base + arr[:, 1]
    keys = np.asarray(ids, np.int64) * base + np.asarray(shards, np.int64)
    stale |= valid & ~np.isin(keys, live_keys)
    held = np.isin(live_keys, keys[valid & ~stale])
    return stale, [live[i] for i in np.nonzero(~held)[0]]


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
    from piaa_index.vectors.scores import ScoreView

    def read(store: ReadOnlyStore) -> Any:
        vocab = store.vocabulary()
        classifier = store.latest_classifier()
        store_id = store.get_setting("store_id")
        if vocab is None or classifier is None or store_id is None:
            return None
        classifier_id, vocabulary_id, key, segments = classifier
        if vocabulary_id != vocab[0] or not key or not segments:
            return None  # a refit or a first scoring is due
        folder = settings.layout.vectors(str(store_id["uuid"])).scores / key
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
    """`read(store)` in one read snapshot of the database, or None when there is no such
    database, the user asked for another model (`Library.open` says no) or the database cannot
    be read as expected (locked, damaged, an older layout, a lost connection)."""
    store = ReadOnlyStore.open(settings.db_url)
    if store is None:
        return None
    try:
        with store.snapshot():
            if not _same_model(store, settings):
                return None
            return read(store)
    except store.errors:  # SQLite may quote garbled text (UnicodeDecodeError)
        return None
    except (TypeError, ValueError, KeyError):
        return None  # a value no release writes (a damaged page): the Library names it
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


def status(settings: Settings) -> dict[str, Any] | None:
    """`Library.status()`'s dict, field for field, read-only; None whenever opening the Library
    would write or answer otherwise: Postgres, a schema to upgrade, no database yet, another
    model asked for, a model record or vector manifest to update, vectors or score files to
    reconcile with SQL, a classifier from before the tag rule was stored, images removed since
    the scores were written (their tombstones are due), SQLite trouble. The caller then opens
    the Library, which writes what is due and answers."""

    def read(store: ReadOnlyStore) -> dict[str, Any] | None:
        return _status(settings, store)

    return _in_snapshot(settings, read)


def _status(settings: Settings, store: ReadOnlyStore) -> dict[str, Any] | None:
    store_id = store.get_setting("store_id")
    if store_id is None:
        return None
    vectors_dir = settings.layout.vectors(str(store_id["uuid"])).root
    if not _marker_current(store, settings.db_url, vectors_dir):
        return None  # `Library.open` writes the marker
    model = store.get_setting("model")
    vectors_bytes = 0
    if not model and store.latest_classifier() is not None:
        return None  # `Tagger.state` would open the vectors without a model record
    if model:
        if "weights_sha256" not in model:
            from piaa_index.model.model_record import checkpoint_path

            if checkpoint_path(model.get("pretrained")) is not None:
                return None  # `Library.open` may add the weights' hash to the record
        found = _vectors_bytes(store, vectors_dir, model)
        if found is None:
            return None
        vectors_bytes = found

    vocab = store.vocabulary()
    templates = store.templates(vocab[0]) if vocab is not None else []
    if templates is None:
        return None
    latest = store.latest_classifier()
    counts = store.image_counts()
    indexed = counts.get(INDEXED, 0)
    user_labels = store.get_setting("user_labels")
    labels_version = int(user_labels["version"]) if user_labels else 0
    out = status_report(
        home=settings.home,
        database=_shown_url(settings.db_url),
        schema_revision=head_revision(),  # `ReadOnlyStore.open` checked it
        model=model,
        counts=counts,
        vectors_bytes=vectors_bytes,
        vocabulary=(vocab[0], vocab[1], templates) if vocab else None,
        stale=vocab is not None and (latest is None or latest[1] != vocab[0]),
        labels_changed=labels_version != 0,
    )
    if latest is None:
        return out
    from piaa_index.method.decisions import Decisions

    classifier_id, vocabulary_id, key, segments = latest
    facts = store.classifier_facts(classifier_id)
    if facts is None:
        return None
    created_at, n_images, report = facts
    params = report.get("params") or {}
    out["labels_changed"] = labels_version != int(params.get("user_labels_version", 0))
    if not report.get("decisions"):
        return None  # a classifier from before the tag rule: `stored_decisions` rebuilds it
    try:
        decisions = Decisions.from_json(report["decisions"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None  # the Library names the damage
    fitted_on = store.vocabulary_names(vocabulary_id)
    if len(label_statuses(decisions, len(fitted_on))) != len(fitted_on):
        return None  # the Library names the mismatch
    # `Tagger.state(score_new=False)`: the matrix's present bits when it is the vocabulary's,
    # else (stale, or its files lost) the sparse SQL tags.
    matrix: tuple[dict[str, int]] | tuple[()] = ()
    if vocab is not None and vocabulary_id == vocab[0] and vocab[1] and key and segments:
        found_counts = _present_counts(store, vectors_dir, vocab[1], key, segments)
        if found_counts is None:
            return None
        matrix = found_counts
    tagged = matrix[0] if matrix else store.tag_counts()
    try:
        fitted_at = datetime.fromisoformat(created_at)
    except ValueError:
        return None
    out["classifier"] = classifier_report(
        version=classifier_id,
        vocabulary_version=vocabulary_id,
        fitted_at=fitted_at,
        n_images=n_images,
        indexed=indexed,
        fitted_on=fitted_on,
        decisions=decisions,
        tagged=tagged,
    )
    return out


def status_report(
    *,
    home: Path,
    database: str,
    schema_revision: str | None,
    model: dict | None,
    counts: dict[str, int],
    vectors_bytes: int,
    vocabulary: tuple[int, list[str], list[str]] | None,
    stale: bool,
    labels_changed: bool,
) -> dict[str, Any]:
    """`piaa status`'s dict without its classifier (None until `classifier_report` fills it):
    one shape for `Library.status` and the read-only status of a fresh process."""
    version, labels, templates = vocabulary if vocabulary is not None else (None, [], [])
    return {
        "home": str(home),
        "database": database,
        "schema_revision": schema_revision,
        "model": model,
        "images": {
            "indexed": counts.get(INDEXED, 0),
            "failed": counts.get("failed", 0),
            "pending": counts.get("pending", 0) + counts.get("missing_vectors", 0),
        },
        "vectors_bytes": vectors_bytes,
        "vocabulary": {"version": version, "labels": labels, "templates": templates},
        "classifier": None,
        "stale": stale,
        # Your labels changed since the last fit: `piaa fit` learns from them.
        "labels_changed": labels_changed,
    }


def label_statuses(decisions: Any, n_labels: int) -> list[str]:
    """Each fitted label's status ("present", "weak", "absent") as the tag rule recorded it;
    all present for a rule that recorded none."""
    return [r.get("status", "present") for r in decisions.status] or ["present"] * n_labels


def classifier_report(
    *,
    version: int,
    vocabulary_version: int,
    fitted_at: datetime,
    n_images: int,
    indexed: int,
    fitted_on: list[str],
    decisions: Any,
    tagged: dict[str, int],
) -> dict[str, Any]:
    """`piaa status`'s classifier entry (the labels by name, as `piaa fit --json` gives them)."""
    status = label_statuses(decisions, len(fitted_on))
    return {
        "version": version,
        "vocabulary_version": vocabulary_version,
        "fitted_at": fitted_at.isoformat(timespec="seconds"),
        "n_images": n_images,
        "images_added_since": max(0, indexed - n_images),
        "absent_labels": [n for n, st in zip(fitted_on, status, strict=True) if st == "absent"],
        "weak_labels": [n for n, st in zip(fitted_on, status, strict=True) if st == "weak"],
        "warnings": list(decisions.info.get("warnings", [])),
        "tagged": tagged,
    }


def _present_counts(
    store: ReadOnlyStore,
    vectors_dir: Path,
    names: list[str],
    key: str,
    segments: list[str],
) -> tuple[dict[str, int]] | tuple[()] | None:
    """(images decided present per label,) from the score matrix as `Tagger.state` syncs it
    with SQL; () when its files cannot be read (the Library then counts the sparse tags too);
    None when images left the index since it was written (the Library compares every row)."""
    from piaa_index.vectors.scores import ScoreView, scores_root

    try:
        view = ScoreView.open(scores_root(vectors_dir) / key, key, segments)
    except (OSError, ValueError):
        return ()
    # `Store.changes_since`'s cheap path: newer shards supersede their images' rows.
    new_ids = store.ids_indexed_after(view.max_shard)
    stale = view.valid & np.isin(view.ids, new_ids)
    if int((view.valid & ~stale).sum()) + len(new_ids) != store.indexed_count():
        return None
    view.invalidate(stale)
    counts = view.present_counts(len(names))
    return ({name: int(n) for name, n in zip(names, counts, strict=True) if n},)


def _vectors_bytes(store: ReadOnlyStore, vectors_dir: Path, model: dict) -> int | None:
    """`VectorStore.disk_bytes()` as `Library.vectors` opens the folder, or None when opening
    it would write (a manifest to create, upgrade or record, files to reconcile with SQL) or
    refuse (a damaged or mismatched manifest)."""
    from piaa_index.vectors.scores import leftovers, scores_root

    vectors = open_vectors(store, vectors_dir, model)
    if vectors is None:
        return None
    if any(vectors.to_reconcile(store.referenced_shards())):
        return None
    if leftovers(scores_root(vectors_dir), store.score_folders()):
        return None
    return vectors.disk_bytes()


def open_vectors(store: ReadOnlyStore, vectors_dir: Path, model: dict) -> Any:
    """The library's `VectorStore`, opened without writing, or None where `Library.vectors`
    would write first (a manifest to create, upgrade or record) or refuse (a damaged or
    mismatched manifest)."""
    from piaa_index.vectors.shards import (
        MANIFEST_SETTING,
        VectorStore,
        VectorStoreError,
        manifest_problem,
    )

    try:
        manifest = VectorStore.read_manifest(vectors_dir)
    except VectorStoreError:
        return None
    if manifest is None or "checksums_from" not in manifest:
        return None
    recorded = store.get_setting(MANIFEST_SETTING)
    if manifest_problem(manifest, recorded, model) is not None:
        return None
    vectors = VectorStore(
        vectors_dir, manifest["identity"], manifest["codec"], int(manifest["checksums_from"])
    )
    return vectors if recorded == vectors.manifest else None


def _marker_current(store: ReadOnlyStore, db_url: str, vectors_dir: Path) -> bool:
    """Whether `Library.open` would leave the vector folder's database marker as it is: it
    writes one for a SQLite library only (a copied or moved database file is told from it)."""
    if store.dialect != "sqlite" or not vectors_dir.is_dir():
        return True
    return _remembers_database(db_url, vectors_dir)


def _remembers_database(db_url: str, vectors_dir: Path) -> bool:
    """Whether the vector folder's marker names this database (`Library.open` writes it)."""
    path = Path(db_url.removeprefix(SQLITE_PREFIX)).expanduser().absolute()
    try:
        marker = json.loads((vectors_dir / DATABASE_MARKER).read_text())
        return bool(marker["path"] == str(path))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _shown_url(db_url: str) -> str:
    """A SQLite URL as SQLAlchemy renders it (`URL.render_as_string`): the path unquoted when
    parsed (`ReadOnlyStore.open` leaves a path with "%" to the Library), quoted when rendered;
    a Postgres URL as written (`POSTGRES_URL` admits only those SQLAlchemy renders unchanged)."""
    if POSTGRES_URL.fullmatch(db_url):
        return db_url

    return SQLITE_PREFIX + quote(unquote(db_url.removeprefix(SQLITE_PREFIX)), safe=" +/")
