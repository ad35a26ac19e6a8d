"""The change feed (HTTP API `/api/tags?since=`) and paging: the counters readers watch, the
per-image change log, and images a page at a time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    BigInteger,
    Column,
    MetaData,
    Table,
    Text,
    bindparam,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.orm import Session

from piaa_index.catalog.batching import chunks
from piaa_index.catalog.schema import INDEXED, DataVersion, Image, ImageChange, Label, Tag

# The present tags (image, label name) before a re-tag, to mark in the change feed exactly the
# images whose present labels changed (see `Store._retag_changes`). Temporary, like the scan
# scope in images.py.
_OLD_TAGS = Table(
    "piaa_old_tags",
    MetaData(),
    Column("image_id", BigInteger),
    Column("name", Text),
    prefixes=["TEMPORARY"],
)
_CHANGE_TABLE = cast(Table, ImageChange.__table__)


class ChangeFeedMixin:
    """The `Store`'s change counters, change feed and pages of images."""

    if TYPE_CHECKING:
        # Given by `Store` and the other parts it is composed of.
        def session(self) -> AbstractContextManager[Session]: ...

    def data_version(self) -> int:
        """The catalog counter (bumped by triggers on images, classifiers, vocabularies)."""
        with self.session() as s:
            value = s.scalar(select(DataVersion.version).where(DataVersion.name == "catalog"))
        return int(value or 0)

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
        for chunk in chunks(wanted):
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
            for chunk in chunks(wanted):
                rows = s.execute(
                    select(Image.path, Image.id, Image.content_hash).where(Image.path.in_(chunk))
                ).all()
                out.update({p: (int(i), h) for p, i, h in rows})
        return out


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
