"""API keys of the HTTP API (only their hashes are stored)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from piaa_index.catalog.common import utcnow
from piaa_index.catalog.schema import ApiKey


class ApiKeysMixin:
    """The `Store`'s API keys."""

    if TYPE_CHECKING:
        # Given by `Store` and the other parts it is composed of.
        def session(self) -> AbstractContextManager[Session]: ...

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
