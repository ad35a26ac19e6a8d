"""The label routes' reads of the user's labels and of indexed images, through the Store (the
one home of SQL): one image's labels with their times, a keyset page of all of them with the
images' paths, which ids or paths name indexed images (chunked, for bulks of thousands), and
the newest images first (the gallery's landing page)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def labels_of(store: Any, image_id: int) -> list[dict[str, Any]]:
    """The user's labels of one image, by label key."""
    return list(store.user_labels_of(image_id))


def label_page(
    store: Any,
    after: tuple[int, str] | None,
    limit: int,
    label_key: str | None = None,
    source: str | None = None,
) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
    """Up to `limit` labels after (image id, label key), and where to continue."""
    return store.user_label_page(after, limit, label_key, source)  # type: ignore[no-any-return]


def indexed_ids(store: Any, ids: Sequence[int]) -> set[int]:
    """Which of `ids` are indexed images."""
    return set(store.indexed_ids(ids))


def indexed_paths(store: Any, paths: Sequence[str]) -> dict[str, int]:
    """path -> id of those `paths` that are indexed images (paths exactly as stored)."""
    return dict(store.indexed_ids_by_path(paths))


def newest_images(
    store: Any, before: int | None, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Up to `limit` indexed images, newest first, below `before`; and where to continue."""
    return store.newest_images(before, limit)  # type: ignore[no-any-return]
