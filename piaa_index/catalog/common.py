"""What every part of the store shares: its error and its clock."""

from __future__ import annotations

from datetime import datetime, timezone

from piaa_index.errors import PiaaError


class StoreError(PiaaError):
    """A database that cannot be opened or used, with a message for the user."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
