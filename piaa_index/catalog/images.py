"""The images table: reserving and committing index runs, change detection for what is built
from the vectors, vector locations, paths, hashes and counts."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
from sqlalchemy import Column, MetaData, Table, and_, delete, func, insert, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from piaa_index.catalog import schema
from piaa_index.catalog.batching import chunks
from piaa_index.catalog.common import StoreError, utcnow
from piaa_index.catalog.readonly import changes_since
from piaa_index.catalog.schema import (
    FAILED,
    INDEXED,
    FsText,
    Image,
    ImageCount,
    Tag,
    UserLabel,
)
from piaa_index.errors import DAMAGED_DATABASE_WAY_OUT


class KnownImage(NamedTuple):
    """What an index run needs of an image it may skip, re-encode or prune."""

    id: int
    path: str
    size: int
    mtime: float
    status: str


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


class ImagesMixin:
    """The `Store`'s images: one row per file an index run saw."""

    if TYPE_CHECKING:
        # Given by `Store` and the other parts it is composed of.
        def session(self) -> AbstractContextManager[Session]: ...

        @staticmethod
        def _mark_changed(s: Session, ids: Iterable[int]) -> None: ...

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
            for chunk in chunks(wanted):
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

    def indexed_ids(self, ids: Sequence[int]) -> set[int]:
        """Which of `ids` are indexed images (any number of them)."""
        wanted = sorted(set(int(i) for i in ids))
        out: set[int] = set()
        with self.session() as s:
            for chunk in chunks(wanted):
                q = select(Image.id).where(Image.id.in_(chunk), Image.status == INDEXED)
                out.update(int(i) for i in s.scalars(q))
        return out

    def indexed_ids_by_path(self, paths: Sequence[str]) -> dict[str, int]:
        """path -> id of those `paths` (exactly as stored) that are indexed images."""
        wanted = list(dict.fromkeys(paths))
        out: dict[str, int] = {}
        with self.session() as s:
            for chunk in chunks(wanted):
                rows = s.execute(
                    select(Image.path, Image.id).where(
                        Image.path.in_(chunk), Image.status == INDEXED
                    )
                ).all()
                out.update({str(p): int(i) for p, i in rows})
        return out

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
            for chunk in chunks(stale):
                s.execute(delete(Tag).where(Tag.image_id.in_(chunk)))
            self._mark_changed(s, stale)

    def changes_since(
        self,
        ids: np.ndarray,
        shards: np.ndarray,
        max_shard: int,
        valid: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """What changed for something built from the vectors since it was built:
        `catalog.readonly.changes_since`, the one rule (the read-only twin answers with it
        too)."""

        return changes_since(self, ids, shards, max_shard, valid)

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
            for part in chunks(ids):
                chunk = list(part)
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
            for part in chunks(ids):
                chunk = list(part)
                s.execute(delete(Tag).where(Tag.image_id.in_(chunk)))
                s.execute(delete(UserLabel).where(UserLabel.image_id.in_(chunk)))
                s.execute(delete(Image).where(Image.id.in_(chunk)))
            self._mark_changed(s, ids)

    def image_counts(self) -> dict[str, int]:
        """Images per status, from the trigger-kept `image_counts` (no walk of the images)."""
        with self.session() as s:
            return {status: n for status, n in _held_counts(s).items() if n > 0}

    def counted_image_counts(self) -> dict[str, int]:
        """Images per status counted row by row: what `image_counts` must agree with."""
        with self.session() as s:
            return _counted(s)

    def repair_image_counts(self) -> dict[str, int] | None:
        """Rewrite `image_counts` from a real count where they differ (a database edited with
        its triggers off, or restored from parts); the wrong counts it held, else None."""
        with self.session() as s:
            held, real = _held_counts(s), _counted(s)  # one transaction: one state
            if held == real:
                return None
            s.execute(delete(ImageCount))
            if real:
                s.execute(insert(ImageCount), [{"status": k, "n": v} for k, v in real.items()])
        return held

    def failed_images(self) -> list[tuple[str, str]]:
        with self.session() as s:
            rows = s.execute(
                select(Image.path, Image.error).where(Image.status == FAILED).order_by(Image.path)
            ).all()
        return [(p, e or "") for p, e in rows]

    def indexed_count(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(ImageCount.n).where(ImageCount.status == INDEXED)) or 0)

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


def _held_counts(s: Session) -> dict[str, int]:
    """The trigger-kept images per status, rows of 0 left out (a negative one is drift)."""
    rows = s.execute(select(ImageCount.status, ImageCount.n).where(ImageCount.n != 0)).all()
    return {status: int(n) for status, n in rows}


def _counted(s: Session) -> dict[str, int]:
    """Images per status, counted row by row."""
    rows = s.execute(select(Image.status, func.count()).group_by(Image.status)).all()
    return {status: int(n) for status, n in rows}
