"""The user's own labels (migration 0006): what they said an image is or is not, and the
counter a fit learns from."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from piaa_index.catalog.batching import chunks
from piaa_index.catalog.common import utcnow
from piaa_index.catalog.schema import Image, Setting, UserLabel
from piaa_index.query.language import normalize_label


class UserLabelsMixin:
    """The `Store`'s user labels."""

    if TYPE_CHECKING:
        # Given by `Store` and the other parts it is composed of.
        def session(self) -> AbstractContextManager[Session]: ...

        def get_setting(self, key: str) -> dict | None: ...

    def set_user_labels(self, rows: Sequence[tuple[int, str, bool]], source: str) -> int:
        """Record (image id, label name, present) as the user's labels from `source`, replacing
        what was recorded for the same image and label; returns the rows that changed. Rows
        that say what is already recorded write nothing (and do not count as a change the
        next fit must learn from)."""

        latest: dict[tuple[int, str], tuple[str, bool]] = {}
        for image_id, name, present in rows:
            latest[(int(image_id), normalize_label(name))] = (name.strip(), bool(present))
        now = utcnow()
        items = list(latest.items())
        changed = 0
        with self.session() as s:
            for chunk in chunks(items):
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

        n = 0
        with self.session() as s:
            for chunk in chunks(image_ids):
                q = delete(UserLabel).where(UserLabel.image_id.in_(chunk))
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

    @staticmethod
    def _bump_user_labels(s: Session) -> None:
        row = s.get(Setting, "user_labels")
        version = int(row.value["version"]) + 1 if row is not None else 1
        s.merge(Setting(key="user_labels", value={"version": version}))


def _label_row(row: Any) -> dict[str, Any]:
    return {
        "label": row.name,
        "present": bool(row.present),
        "source": row.source,
        "updated_at": row.updated_at,
    }


_LABEL_COLUMNS = (
    UserLabel.image_id,
    UserLabel.label,
    UserLabel.name,
    UserLabel.present,
    UserLabel.source,
    UserLabel.updated_at,
)
