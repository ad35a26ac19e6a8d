"""Indexed images by stable id, and the bulk tag listing with its change feed.

`GET /api/tags` pages through every indexed image's present tags (`next_cursor` until null).
With `since=VERSION` it lists only images changed after that feed version (indexed or
re-encoded, present labels changed by a re-tag) and the ids of images removed since; every
answer carries the current `version` to pass as `since` next time. The cursor holds the
version the listing started at, so the pages of one listing are one consistent window.
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from piaa_index_plugins.http_api.auth import require_read
from piaa_index_plugins.http_api.errors import ApiError, jsonable
from piaa_index_plugins.http_api.models import KEYED, ImagePage, ImageWithTags, TagFeed, errors
from piaa_index_plugins.http_api.state import ApiState, get_state

from piaa_index.errors import LibraryError

router = APIRouter(prefix="/api", tags=["images"], dependencies=[require_read])

MAX_ID = 2**63 - 1
Limit = Annotated[int, Query(ge=1, le=10_000, description="Items per page.")]
Cursor = Annotated[
    str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
]


def encode_cursor(fields: dict[str, Any]) -> str:
    raw = json.dumps(fields, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# The fields each kind of cursor must hold (a forged cursor without them is a 400, not a
# KeyError); "s" (the listing's `since`) may be null. "query": a query's pages
# (routes_queries.py): offset, feed version, query name and a digest of its parameters.
# "labels": the user's labels (routes_labels.py): the image id and label key last listed.
CURSOR_FIELDS = {
    "images": ("a",),
    "tags": ("a", "u"),
    "query": ("o", "u", "q", "h"),
    "labels": ("a", "l"),
    "newest": ("b",),
}


def decode_cursor(cursor: str, kind: str) -> dict[str, Any]:
    try:
        fields = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(fields, dict) or fields.get("k") != kind:
            raise ValueError
        if any(fields.get(key) is None for key in CURSOR_FIELDS[kind]):
            raise ValueError
        for key in ("a", "s", "u", "o", "b"):
            value = fields.get(key)
            if value is not None and (type(value) is not int or not 0 <= value <= MAX_ID):
                raise ValueError
        if any(not isinstance(fields.get(key, ""), str) for key in ("q", "h", "l")):
            raise ValueError
        return fields
    except (ValueError, TypeError, RecursionError):
        raise ApiError(400, "bad_request", "invalid cursor (pass next_cursor as given)") from None


@router.get(
    "/images",
    operation_id="list_images",
    summary="Indexed images by id (or newest first), cursor-paged",
    response_model=ImagePage,
    response_model_exclude_unset=True,
    responses=errors(*KEYED, 400, 409, 422),
)
def list_images(
    state: Annotated[ApiState, Depends(get_state)],
    cursor: Cursor = None,
    limit: Limit = 100,
    order: Annotated[
        Literal["id", "newest"],
        Query(description="`id`: oldest first (ascending id); `newest`: latest indexed first."),
    ] = "id",
) -> dict[str, Any]:
    if order == "newest":
        before = decode_cursor(cursor, "newest")["b"] if cursor else None
        rows, last = state.run(state.library.newest_images, before, limit)
        return {
            "images": jsonable(rows),
            "next_cursor": None if last is None else encode_cursor({"k": "newest", "b": last}),
        }
    after = decode_cursor(cursor, "images")["a"] if cursor else 0
    images, _, last = state.run(state.library.image_page, after, limit)
    return {
        "images": jsonable(images),
        "next_cursor": None if last is None else encode_cursor({"k": "images", "a": last}),
    }


@router.get(
    "/images/{image_id}",
    operation_id="get_image",
    summary="One image: metadata and its tags (as `piaa tags --json`)",
    response_model=ImageWithTags,
    response_model_exclude_unset=True,
    responses=errors(*KEYED, 404, 409, 422),
)
def get_image(
    image_id: Annotated[int, Path(ge=1, le=MAX_ID)], state: Annotated[ApiState, Depends(get_state)]
) -> dict[str, Any]:
    def call() -> dict[str, Any]:
        info = state.library.image_info(image_id)
        if info is None:
            raise ApiError(404, "not_found", f"no indexed image with id {image_id}")
        try:
            info["tags"] = state.served.tags(image_id)
            info["tags_error"] = None
        except LibraryError as exc:  # no vocabulary yet, or not fitted: the metadata stands
            info["tags"], info["tags_error"] = [], str(exc)
        return jsonable(info)

    return state.run(call)


@router.get(
    "/tags",
    operation_id="list_tags",
    summary="Present tags of every image, or of those changed since a version (change feed)",
    response_model=TagFeed,
    response_model_exclude_unset=True,
    responses=errors(*KEYED, 409, 422),
)
def list_tags(
    state: Annotated[ApiState, Depends(get_state)],
    since: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="A `version` from an earlier answer.")
    ] = None,
    cursor: Cursor = None,
    limit: Limit = 1000,
) -> dict[str, Any]:
    library = state.library
    if cursor:
        fields = decode_cursor(cursor, "tags")
        after, since, upto = fields["a"], fields.get("s"), fields["u"]
    else:
        after, upto = 0, state.run(library.feed_version)

    def call() -> tuple[list[dict[str, Any]], list[int], int | None]:
        images, removed, last = library.image_page(after, limit, since, upto)
        tags = library.present_tags_of([im["id"] for im in images])
        for im in images:
            im["tags"] = [{"label": n, "score": round(s, 6)} for n, s in tags[im["id"]]]
        return images, removed, last

    images, removed, last = state.run(call)
    return {
        "version": upto,
        "since": since,
        "images": jsonable(images),
        "removed": removed,
        "next_cursor": None
        if last is None
        else encode_cursor({"k": "tags", "a": last, "s": since, "u": upto}),
    }
