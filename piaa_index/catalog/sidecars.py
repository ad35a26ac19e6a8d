"""The XMP sidecars we wrote (piaa_index/xmp/sidecars.py): their hashes and original bytes."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from sqlalchemy import Table, bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from piaa_index.catalog.batching import chunks
from piaa_index.catalog.common import utcnow
from piaa_index.catalog.schema import XmpSidecar


class SidecarRecord(NamedTuple):
    """What `piaa export xmp` remembers of a sidecar it wrote (its original bytes load apart)."""

    path: str
    created: bool
    has_original: bool
    written_sha256: str
    keywords_sha256: str


_SIDECAR_TABLE = cast(Table, XmpSidecar.__table__)


class SidecarsMixin:
    """The `Store`'s records of XMP sidecars."""

    if TYPE_CHECKING:
        # Given by `Store` and the other parts it is composed of.
        def session(self) -> AbstractContextManager[Session]: ...

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
            for chunk in chunks(new):
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
            for part in chunks(paths):
                chunk = list(part)
                s.execute(delete(XmpSidecar).where(XmpSidecar.path.in_(chunk)))
