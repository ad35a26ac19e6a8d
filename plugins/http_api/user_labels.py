"""The label routes' reads of the user's labels and of indexed images, through the Store (the
one home of SQL): one image's labels with their times, a keyset page of all of them with the
images' paths, which ids or paths name indexed images (chunked, for bulks of thousands), and
the newest images first (the gallery's landing page)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from piaa_index_plugins.http_api.errors import ApiError


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


def resolve_images(store: Any, refs: Sequence[int | str], nothing_done: str) -> list[int]:
    """The indexed image id of each of `refs` (an id, or a path exactly as stored), in order.
    A 404 names the refs that are no indexed image (`nothing_done` says what was not done)."""
    from piaa_index_plugins.http_api.routes_images import MAX_ID

    def is_number(ref: int | str) -> bool:
        return isinstance(ref, int) or (ref.isascii() and ref.isdigit())

    numbers = {int(r) for r in refs if is_number(r)}
    known = indexed_ids(store, [i for i in numbers if i <= MAX_ID])
    by_path = indexed_paths(store, [str(r) for r in refs if not is_number(r)])
    found = [
        (int(r) if int(r) in known else None) if is_number(r) else by_path.get(str(r)) for r in refs
    ]
    unknown = list(dict.fromkeys(r for r, i in zip(refs, found, strict=True) if i is None))
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:20])
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        raise ApiError(
            404,
            "not_found",
            f"{len(unknown)} images are not indexed ({nothing_done}): {shown}{more}",
        )
    return [i for i in found if i is not None]
