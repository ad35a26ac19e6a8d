"""Image references in the label and teach routes' bodies (an id, or a path exactly as stored)
resolved to indexed image ids through the Library's plugin API (docs/plugins.md), with one
404 that names every unknown reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from piaa_index_plugins.http_api.errors import ApiError


def resolve_images(library: Any, refs: Sequence[int | str], nothing_done: str) -> list[int]:
    """The indexed image id of each of `refs` (an id, or a path exactly as stored), in order.
    A 404 names the refs that are no indexed image (`nothing_done` says what was not done)."""
    from piaa_index_plugins.http_api.routes_images import MAX_ID

    def is_number(ref: int | str) -> bool:
        return isinstance(ref, int) or (ref.isascii() and ref.isdigit())

    numbers = {int(r) for r in refs if is_number(r)}
    known = library.indexed_ids([i for i in numbers if i <= MAX_ID])
    by_path = library.indexed_ids_by_path([str(r) for r in refs if not is_number(r)])
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
