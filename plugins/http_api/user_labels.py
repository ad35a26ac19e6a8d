"""Reads of the user's labels (schema.UserLabel) the label routes need and the Store does not
offer yet: one image's labels with their times, a keyset page of all of them joined with the
images' paths, and which ids or paths name indexed images (chunked, for bulks of thousands);
and the newest images first (the gallery's landing page). Writes go through the Store
(`set_user_labels`, `forget_user_labels`) only.

Candidates for piaa_index/store.py (the plugin reads the tables through `store.session()`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, or_, select

from piaa_index.schema import INDEXED, Image, UserLabel

CHUNK = 500  # values per IN (...): well under any database's bound on parameters


COLUMNS = (
    UserLabel.image_id,
    UserLabel.label,
    UserLabel.name,
    UserLabel.present,
    UserLabel.source,
    UserLabel.updated_at,
)


def _row(row: Any) -> dict[str, Any]:
    return {
        "label": row.name,
        "present": bool(row.present),
        "source": row.source,
        "updated_at": row.updated_at,
    }


def labels_of(store: Any, image_id: int) -> list[dict[str, Any]]:
    """The user's labels of one image, by label key."""
    with store.session() as s:
        rows = s.execute(
            select(*COLUMNS).where(UserLabel.image_id == image_id).order_by(UserLabel.label)
        ).all()
    return [_row(r) for r in rows]


def label_page(
    store: Any,
    after: tuple[int, str] | None,
    limit: int,
    label_key: str | None = None,
    source: str | None = None,
) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
    """Up to `limit` labels after (image id, label key), by image then label, with each image's
    path; and the (image id, label key) to continue after, or None at the end."""
    q = (
        select(*COLUMNS, Image.path)
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
    with store.session() as s:
        found = s.execute(q).all()
    rows = [{**_row(r), "image": int(r.image_id), "path": r.path} for r in found[:limit]]
    if len(found) <= limit:
        return rows, None
    last = found[limit - 1]
    return rows, (int(last.image_id), str(last.label))


def indexed_ids(store: Any, ids: Sequence[int]) -> set[int]:
    """Which of `ids` are indexed images."""
    wanted = sorted(set(ids))
    out: set[int] = set()
    with store.session() as s:
        for start in range(0, len(wanted), CHUNK):
            chunk = wanted[start : start + CHUNK]
            out.update(
                int(i)
                for i in s.scalars(
                    select(Image.id).where(Image.id.in_(chunk), Image.status == INDEXED)
                )
            )
    return out


def indexed_paths(store: Any, paths: Sequence[str]) -> dict[str, int]:
    """path -> id of those `paths` that are indexed images (paths exactly as stored)."""
    wanted = list(dict.fromkeys(paths))
    out: dict[str, int] = {}
    with store.session() as s:
        for start in range(0, len(wanted), CHUNK):
            chunk = wanted[start : start + CHUNK]
            rows = s.execute(
                select(Image.path, Image.id).where(Image.path.in_(chunk), Image.status == INDEXED)
            ).all()
            out.update({str(p): int(i) for p, i in rows})
    return out


def newest_images(
    store: Any, before: int | None, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Up to `limit` indexed images by id, newest (highest id) first, below `before`; and the
    id to continue below, or None at the end. Rows as `Store.image_page` gives them."""
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
    with store.session() as s:
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
