"""Every registered query (built-in or from a plugin) at `GET /api/queries/NAME`, its query
string converted by its `Param` list: no code per query. Rows that name an image by path also
carry its `id` and `content_hash`.

`registered_router(library)` (called by create_app) gives each query registered when the app
is built its own OpenAPI operation (operation id: the query's name), its parameters declared
from its `Param`s, so a generated client has `search(expression=..., limit=...)`. The values
are still converted here, by `query_params` (400 for a bad value, as the CLI's words for flags
are accepted), so the documented routes and the generic `/api/queries/{name}` (queries
registered later; not in the schema) answer alike.

Paging: a query with an int `limit` parameter pages by `cursor`: `limit` rows a page and
`next_cursor` until null. The rows are the query's ranking (deterministic: score, then image
id), each page cut from the ranking of the library as it is; a cursor whose library changed
since the first page (the change feed's version moved) is a 409 `cursor_expired`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request
from piaa_index_plugins.http_api.auth import require_read
from piaa_index_plugins.http_api.errors import ApiError, jsonable
from piaa_index_plugins.http_api.models import KEYED, QueryInfo, QueryResult, errors
from piaa_index_plugins.http_api.routes_images import decode_cursor, encode_cursor
from piaa_index_plugins.http_api.state import ApiState, get_state

if TYPE_CHECKING:
    from piaa_index.library.core import Library
    from piaa_index.plugins import Param, Query

router = APIRouter(prefix="/api", tags=["queries"], dependencies=[require_read])

MAX_VALUE_CHARS = 4096


def describe_param(p: Param) -> dict[str, Any]:
    described: dict[str, Any] = jsonable(p.describe())
    return described


def _convert(p: Param, raw: str) -> Any:
    if len(raw) > MAX_VALUE_CHARS:
        raise ApiError(
            400, "bad_request", f"parameter {p.name!r}: over {MAX_VALUE_CHARS} characters"
        )
    try:
        return p.parse(raw)
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None


def query_params(query: Query, raw: list[tuple[str, str]]) -> dict[str, Any]:
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
            params[p.name] = p.absent_value()
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
    refs = state.library.image_refs(paths)
    out = []
    for row in rows:
        ref = refs.get(row.get("path")) if isinstance(row, dict) else None
        if ref is not None:
            row = {"id": ref[0], "content_hash": ref[1], **row}
        out.append(row)
    return out


# -- paging ---------------------------------------------------------------------------------------

CURSOR = "cursor"


def pages(query: Any) -> bool:
    """A query pages when it has an int `limit` parameter (and no `cursor` of its own)."""
    names = {p.name: p for p in query.params}
    limit = names.get("limit")
    return CURSOR not in names and limit is not None and limit.type is int and not limit.multiple


def _digest(name: str, params: dict[str, Any]) -> str:
    """The parameters a listing was started with (all but `limit`), so a cursor is never
    applied to another search."""
    text = json.dumps(
        [name, jsonable({k: v for k, v in params.items() if k != "limit"})], sort_keys=True
    )
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def run_query_page(state: ApiState, name: str, raw: list[tuple[str, str]]) -> dict[str, Any]:
    """One answer of query `name` to the query string `raw`: a page of rows, `next_cursor`."""
    library = state.library

    def call() -> dict[str, Any]:
        query = state.library.plugins.queries.get(name)
        if query is None:
            known = ", ".join(sorted(state.library.plugins.queries))
            raise ApiError(404, "not_found", f"no query named {name[:100]!r} (known: {known})")
        paged = pages(query)
        cursors = [v for k, v in raw if k == CURSOR] if paged else []
        if len(cursors) > 1:
            raise ApiError(400, "bad_request", "parameter 'cursor' given more than once")
        params = query_params(query, [(k, v) for k, v in raw if not (paged and k == CURSOR)])
        limit = params.get("limit") if paged else None
        if not (isinstance(limit, int) and limit > 0):  # no paging: all rows (or the error)
            if cursors and cursors[0]:
                raise ApiError(400, "bad_request", "'cursor' needs a positive 'limit'")
            rows = query.run(state.served, progress=False, **params)
            return {"results": with_image_refs(state, rows), "next_cursor": None}
        digest = _digest(name, params)
        version = int(library.feed_version())
        offset = 0
        if cursors and cursors[0]:
            if len(cursors[0]) > 400:
                raise ApiError(400, "bad_request", "invalid cursor (pass next_cursor as given)")
            fields = decode_cursor(cursors[0], "query")
            if fields["q"] != name or fields["h"] != digest:
                raise ApiError(
                    400,
                    "bad_request",
                    "this cursor belongs to another query or other parameters (pass the "
                    "parameters of the first page, and next_cursor as given)",
                )
            if fields["u"] != version:
                raise ApiError(
                    409,
                    "cursor_expired",
                    "the library changed since the first page: start the listing again",
                )
            offset = fields["o"]
        # The ranking's first offset + limit + 1 rows: this page, and whether one follows.
        rows = query.run(state.served, progress=False, **{**params, "limit": offset + limit + 1})
        page = rows[offset : offset + limit]
        more = len(rows) > offset + limit
        cursor = {"k": "query", "o": offset + limit, "u": version, "q": name, "h": digest}
        return {
            "results": with_image_refs(state, page),
            "next_cursor": encode_cursor(cursor) if more else None,
        }

    out = state.run(call)
    return {"query": name, "results": jsonable(out["results"]), "next_cursor": out["next_cursor"]}


# -- the routes -----------------------------------------------------------------------------------

QUERY_ERRORS = errors(*KEYED, 404, 409)


@router.get(
    "/queries",
    operation_id="list_queries",
    summary="The registered queries and their parameters",
    response_model=list[QueryInfo],
    responses=errors(*KEYED),
)
def list_queries(state: Annotated[ApiState, Depends(get_state)]) -> list[dict[str, Any]]:
    queries = state.run(lambda: state.library.plugins.queries)
    return [
        {"name": q.name, "help": q.help, "params": [describe_param(p) for p in q.params]}
        for _, q in sorted(queries.items())
    ]


@router.get(
    "/queries/{name}",
    operation_id="run_query",
    summary="Run a registered query",
    description="Parameters are the query's own (see GET /api/queries); an `image` parameter "
    "takes an image id or the path of an indexed image, never any other file. Each query "
    "registered when the server started is also its own operation (e.g. `search`).",
    response_model=QueryResult,
    response_model_exclude_unset=True,
    responses=QUERY_ERRORS,
    include_in_schema=False,
)
def run_query(
    name: str, request: Request, state: Annotated[ApiState, Depends(get_state)]
) -> dict[str, Any]:
    return run_query_page(state, name, request.query_params.multi_items())


# -- one operation per registered query -----------------------------------------------------------

# Operation ids of the fixed routes: a query named like one gets `query_NAME` instead.
FIXED_OPERATION_IDS = frozenset(
    {
        "health", "get_status", "list_queries", "run_query", "get_vocabulary", "set_vocabulary",
        "complete_labels", "list_images", "get_image", "list_tags", "get_thumbnail",
        "get_evidence", "start_index_job", "start_fit_job", "list_jobs", "get_job",
        "get_image_labels", "set_image_label", "forget_image_label", "set_labels", "list_labels",
    }
)  # fmt: skip
PATH_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def registered_queries(library: Library) -> dict[str, Any]:
    """The queries registered now (none for a stand-in library without plugins)."""
    try:
        return dict(library.plugins.queries)
    except AttributeError:
        return {}


def operation_id(name: str, taken: set[str]) -> str:
    """`search` for the query `search`; `query_NAME` when that is taken or not an identifier."""
    ident = re.sub(r"\W", "_", name)
    if not ident.isidentifier() or ident in taken or ident in FIXED_OPERATION_IDS:
        ident = "query_" + ident
    while ident in taken or ident in FIXED_OPERATION_IDS:
        ident += "_"
    taken.add(ident)
    return ident


def param_spec(p: Param) -> dict[str, Any]:
    """The OpenAPI query parameter of a `Param`."""
    schema: dict[str, Any] = {"type": p.json_type}
    if p.multiple and not p.is_flag:
        schema = {"type": "array", "items": schema}
        if p.default:
            schema["default"] = jsonable(p.absent_value())
    elif p.has_default:
        schema["default"] = jsonable(p.default_value)
    help_text = p.help or ""
    if p.name == "image":
        help_text = (help_text + " " if help_text else "") + (
            "An image id, or the path of an indexed image."
        )
    if p.name == "limit":
        help_text += " With a positive limit the answer is a page of that many rows."
    spec: dict[str, Any] = {
        "name": p.name,
        "in": "query",
        "required": bool(p.required),
        "schema": schema,
    }
    if help_text.strip():
        spec["description"] = help_text.strip()
    if p.multiple:
        spec.update(style="form", explode=True)
    return spec


def _endpoint(name: str) -> Callable[..., dict[str, Any]]:
    def endpoint(request: Request, state: Annotated[ApiState, Depends(get_state)]) -> Any:
        return run_query_page(state, name, request.query_params.multi_items())

    endpoint.__name__ = "query_" + re.sub(r"\W", "_", name)
    return endpoint


def registered_router(library: Library) -> APIRouter:
    """One documented GET operation per registered query, its parameters from its `Param`s."""
    out = APIRouter(prefix="/api", tags=["queries"], dependencies=[require_read])
    taken: set[str] = set()
    for name, query in sorted(registered_queries(library).items()):
        if not PATH_SAFE.match(name):
            continue  # served by the generic route only
        parameters = [param_spec(p) for p in query.params]
        if pages(query):
            parameters.append(
                {
                    "name": CURSOR,
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "`next_cursor` of the previous page (with the same "
                    "parameters); opaque.",
                }
            )
        help_text = " ".join((query.help or name).split())
        out.add_api_route(
            f"/queries/{name}",
            _endpoint(name),
            methods=["GET"],
            operation_id=operation_id(name, taken),
            summary=f"Query {name}: " + help_text.split(". ")[0].rstrip(".")[:120],
            description=help_text + (" Pages by `cursor` / `next_cursor`." if pages(query) else ""),
            response_model=QueryResult,
            response_model_exclude_unset=True,
            responses=QUERY_ERRORS,
            openapi_extra={"parameters": parameters},
        )
    return out
