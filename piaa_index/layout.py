"""Where a library keeps its files: every path under its home, named once.

    <home>/piaa.sqlite3                  the default SQLite database (`PIAA_DB` may put it elsewhere)
    <home>/<database>.open.lock          beside a SQLite database: its first-open lock
    <home>/vectors/<store uuid>/         one folder per database (its `store_id` setting):
        manifest.json                    the vectors' model identity and codec
        sqlite-database.json             the SQLite file it belongs to (a lost one is refused)
        writer.lock, readers.lock        one index run at a time; vacuum waits for readers
        scores/                          score segments, one folder per classifier
        scores/writer.lock               one score writer at a time
        similar/                         the [CLS] index for `similar` (a cache)
        text/                            text search's patch index (a cache)
    <home>/cache/text-tower/             the text tower's weights per model (a cache)
    <home>/thumbnails/                   JPEG thumbnails by content hash (a cache)
    <home>/weights-sha256.json           checkpoint hashes by (path, size, mtime) (a cache)

Standard library only, and nothing of the package: the read-only store (a fresh `piaa search`)
imports it without SQLAlchemy or numpy. The names are what existing libraries have on disk:
never change one without a migration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SQLITE_FILE = "piaa.sqlite3"
VECTORS = "vectors"
MANIFEST = "manifest.json"
# Each vector folder names the SQLite file it belongs to: a deleted or moved database next to
# its vectors is then refused, not silently replaced by a new empty library.
DATABASE_MARKER = "sqlite-database.json"
WRITER_LOCK = "writer.lock"
READERS_LOCK = "readers.lock"
SCORES = "scores"
SIMILAR = "similar"
TEXT = "text"
TEXT_TOWER_CACHE = ("cache", "text-tower")
THUMBNAILS = "thumbnails"
WEIGHT_HASHES = "weights-sha256.json"


def open_lock(database: str | Path) -> str:
    """The first-open lock beside a SQLite database file (wherever `PIAA_DB` put it)."""
    return f"{database}.open.lock"


@dataclass(frozen=True)
class VectorsLayout:
    """The files beside SQL of one database: `<home>/vectors/<store uuid>/`."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def database_marker(self) -> Path:
        return self.root / DATABASE_MARKER

    @property
    def writer_lock(self) -> Path:
        return self.root / WRITER_LOCK

    @property
    def readers_lock(self) -> Path:
        return self.root / READERS_LOCK

    @property
    def scores(self) -> Path:
        return self.root / SCORES

    @property
    def scores_writer_lock(self) -> Path:
        return self.scores / WRITER_LOCK

    @property
    def similar(self) -> Path:
        return self.root / SIMILAR

    @property
    def text(self) -> Path:
        return self.root / TEXT


@dataclass(frozen=True)
class Layout:
    """The paths under a library's home (`Settings.home`)."""

    home: Path

    @property
    def sqlite_file(self) -> Path:
        """The database when neither `--db` nor `PIAA_DB` names one."""
        return self.home / SQLITE_FILE

    @property
    def vectors_root(self) -> Path:
        return self.home / VECTORS

    def vectors(self, store_id: str) -> VectorsLayout:
        """The vector folder of the database whose `store_id` setting is `store_id`."""
        return VectorsLayout(self.vectors_root / str(store_id))

    @property
    def text_tower_cache(self) -> Path:
        return self.home.joinpath(*TEXT_TOWER_CACHE)

    @property
    def thumbnails(self) -> Path:
        return self.home / THUMBNAILS

    @property
    def weight_hashes(self) -> Path:
        return self.home / WEIGHT_HASHES
