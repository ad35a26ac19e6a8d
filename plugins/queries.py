"""The built-in queries: tags, search (boolean or open-vocabulary text), similar."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from piaa_index.errors import UserInputError
from piaa_index.plugins import Param, Query
from piaa_index.plugins.hookspecs import hookimpl

LIMIT = Param("limit", "Maximum number of results (0: all of them).", type=int, default=20)


def _limit(limit: int | None) -> int | None:
    """None or 0: no limit (every match, for piping); a negative number is a usage error."""

    if limit is not None and limit < 0:
        raise UserInputError(f"--limit must be 0 (all) or a positive number, not {limit}")
    return limit or None


def _tags(
    library: Any,
    image: str,
    progress: bool = False,
    limit: int | None = None,
    present_only: bool = False,
) -> list[dict[str, Any]]:
    limit = _limit(limit)
    rows = library.tags(image, progress=progress)
    if present_only:
        rows = [r for r in rows if r["present"]]
    return rows[:limit] if limit else rows


def _tags_quick(
    settings: Any,
    image: str,
    progress: bool = False,
    limit: int | None = None,
    present_only: bool = False,
) -> list[dict[str, Any]] | None:
    """An image's tags answered read-only, without SQLAlchemy, when the scores are current."""
    from piaa_index.catalog import readonly as store_readonly

    rows = store_readonly.tags(settings, image)
    if rows is None:
        return None
    limit = _limit(limit)
    if present_only:
        rows = [r for r in rows if r["present"]]
    return rows[:limit] if limit else rows


def _search(
    library: Any,
    expression: str | None = None,
    text: str | None = None,
    limit: int | None = 20,
    all_images: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    from piaa_index.library.core import UserInputError

    limit = _limit(limit)
    if text and expression:
        raise UserInputError("give either a label EXPRESSION or --text PHRASE, not both")
    if text:
        return library.text_search(text, limit=limit, progress=progress)
    if not expression:
        raise UserInputError('give a label EXPRESSION (e.g. "dog AND bicycle") or --text PHRASE')
    if progress:
        library.ensure_tags(progress=True)
    return library.search(expression, limit=limit, include_absent=all_images)


def _search_quick(
    settings: Any,
    expression: str | None = None,
    text: str | None = None,
    limit: int | None = 20,
    all_images: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]] | None:
    """A boolean search answered read-only, without SQLAlchemy, when the scores are current; a
    text search when the derived indexes are current and the text tower is cached."""
    if text and not expression:
        from piaa_index.catalog import readonly_vectors

        return readonly_vectors.text_search(settings, text, _limit(limit), progress)
    if text or not expression:
        return None
    from piaa_index.catalog import readonly as store_readonly

    return store_readonly.search(settings, expression, _limit(limit), include_absent=all_images)


def _similar(
    library: Any, image: str, limit: int | None = 20, progress: bool = False
) -> list[dict[str, Any]]:
    return library.similar(image, limit=_limit(limit), progress=progress)


def _similar_quick(
    settings: Any, image: str, limit: int | None = 20, progress: bool = False
) -> list[dict[str, Any]] | None:
    """Neighbours of an indexed image, read-only, when the saved [CLS] index is current."""
    from piaa_index.catalog import readonly_vectors

    return readonly_vectors.similar(settings, image, _limit(limit), progress)


@hookimpl
def register_queries(register: Callable[[Query], None]) -> None:
    register(
        Query(
            "tags",
            "Labels of IMAGE with fused, patch and [CLS] scores and the present/absent decision.",
            _tags,
            (
                Param("image", positional=True, required=True),
                Param("present_only", "Only labels decided present.", is_flag=True),
                Param("limit", "Maximum number of labels (0: all).", type=int),
            ),
            quick=_tags_quick,
        )
    )
    register(
        Query(
            "search",
            'Images matching a label EXPRESSION, e.g. "dog AND bicycle AND NOT person", '
            'ranked by the weakest required label; or --text "red umbrella" for any phrase.',
            _search,
            (
                Param("expression", positional=True, required=False),
                Param("text", "Open-vocabulary phrase (no refit needed)."),
                Param("all_images", "Also rank images that do not match.", is_flag=True),
                LIMIT,
            ),
            quick=_search_quick,
        )
    )
    register(
        Query(
            "similar",
            "Images most similar to IMAGE (indexed or not), by [CLS] embedding.",
            _similar,
            (Param("image", positional=True, required=True), LIMIT),
            quick=_similar_quick,
        )
    )
