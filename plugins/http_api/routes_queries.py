"""Every registered query (built-in or from a plugin) at `GET /api/queries/NAME`, its query
string converted by its `Param` list: no code per query. Rows that name an image by path also
carry its `id` and `content_hash`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from piaa_index_plugins.http_api.auth import require_read
from piaa_index_plugins.http_api.errors import ApiError, jsonable
from piaa_index_plugins.http_api.state import ApiState, get_state

router = APIRouter(prefix="/api", tags=["queries"], dependencies=[require_read])

TRUE_WORDS = {"", "1", "true", "yes", "on"}  # `?present_only` alone means true
FALSE_WORDS = {"0", "false", "no", "off"}
MAX_VALUE_CHARS = 4096


def describe_param(p: Any) -> dict[str, Any]:
    return {
        "name": p.name,
        "type": "bool" if p.is_flag else getattr(p.type, "__name__", str(p.type)),
        "required": bool(p.required),
        "default": bool(p.default) if p.is_flag else jsonable(p.default),
        "multiple": bool(p.multiple),
        "help": p.help,
    }


def _convert(p: Any, raw: str) -> Any:
    if len(raw) > MAX_VALUE_CHARS:
        raise ApiError(
            400, "bad_request", f"parameter {p.name!r}: over {MAX_VALUE_CHARS} characters"
        )
    if p.is_flag:
        word = raw.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ApiError(400, "bad_request", f"parameter {p.name!r}: expected 1/true or 0/false")
    try:
        return p.type(raw)
    except (TypeError, ValueError, OverflowError):
        kind = getattr(p.type, "__name__", str(p.type))
        raise ApiError(
            400, "bad_request", f"parameter {p.name!r}: expected {kind}, got {raw[:100]!r}"
        ) from None


def query_params(query: Any, raw: list[tuple[str, str]]) -> dict[str, Any]:
    """Query-string values converted per each `Param`; absent ones get the defaults the CLI
    would pass (so `GET /api/queries/NAME` and `piaa NAME` run the same call)."""
    by_name = {p.name: p for p in query.params}
    given: dict[str, list[str]] = {}
    for key, value in raw:
        given.setdefault(key, []).append(value)
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        known = ", ".join(sorted(by_name)) or "none"
        raise ApiError(
            400,
            "bad_request",
            f"unknown parameter {unknown[0][:100]!r} for query {query.name!r} (known: {known})",
        )
    params: dict[str, Any] = {}
    for p in query.params:
        values = given.get(p.name)
        if values is None:
            if p.required:
                raise ApiError(400, "bad_request", f"missing parameter {p.name!r}")
            if p.is_flag:
                params[p.name] = bool(p.default)
            elif p.multiple:
                params[p.name] = list(p.default or [])
            else:
                params[p.name] = p.default
        elif p.multiple:
            params[p.name] = [_convert(p, v) for v in values]
        elif len(values) > 1:
            raise ApiError(400, "bad_request", f"parameter {p.name!r} given more than once")
        else:
            params[p.name] = _convert(p, values[0])
    return params


def with_image_refs(state: ApiState, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each row that names an image by `path` its stable `id` and `content_hash`."""
    paths = [r["path"] for r in rows if isinstance(r, dict) and isinstance(r.get("path"), str)]
    if not paths:
        return rows
    refs = state.library.store.image_refs(paths)
    out = []
    for row in rows:
        ref = refs.get(row.get("path")) if isinstance(row, dict) else None
        if ref is not None:
            row = {"id": ref[0], "content_hash": ref[1], **row}
        out.append(row)
    return out


@router.get("/queries", summary="The registered queries and their parameters")
def list_queries(state: Annotated[ApiState, Depends(get_state)]) -> list[dict[str, Any]]:
    queries = state.run(lambda: state.library.plugins.queries)
    return [
        {"name": q.name, "help": q.help, "params": [describe_param(p) for p in q.params]}
        for _, q in sorted(queries.items())
    ]


@router.get(
    "/queries/{name}",
    summary="Run a registered query",
    description="Parameters are the query's own (see GET /api/queries); an `image` parameter "
    "takes an image id or the path of an indexed image, never any other file.",
)
def run_query(
    name: str, request: Request, state: Annotated[ApiState, Depends(get_state)]
) -> dict[str, Any]:
    def call() -> list[dict[str, Any]]:
        query = state.library.plugins.queries.get(name)
        if query is None:
            known = ", ".join(sorted(state.library.plugins.queries))
            raise ApiError(404, "not_found", f"no query named {name[:100]!r} (known: {known})")
        params = query_params(query, request.query_params.multi_items())
        rows = query.run(state.served, progress=False, **params)
        return with_image_refs(state, rows)

    return {"query": name, "results": state.run(call)}
