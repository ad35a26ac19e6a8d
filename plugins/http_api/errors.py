"""One JSON shape for every error the API answers: `{"error": {"code", "message"}}`, for 4xx
and 5xx alike (404, 405 and 422 from the framework included); never HTML, never a traceback."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from piaa_index.cli.common import EXIT_USAGE, exit_code_for
from piaa_index.errors import NotFoundError
from piaa_index.textio import json_text

log = logging.getLogger("piaa.http")
T = TypeVar("T")


class ApiError(Exception):
    """An answer other than 2xx, raised from a route or a dependency."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = int(status)
        self.code = code
        self.message = message
        self.headers = headers or {}


def jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become null; numpy scalars, paths etc. plain values."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


class ApiJSONResponse(JSONResponse):
    """JSON that holds any file name (non-UTF-8 bytes as \\udcXX escapes, piaa_index/textio)."""

    def render(self, content: Any) -> bytes:
        return json_text(jsonable(content), indent=None).encode("utf-8")


def mapped(fn: Callable[[], T]) -> T:
    """Run `fn` outside the Library's lock; its exceptions become API errors."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - mapped to a status, never a traceback
        raise from_exception(exc) from None


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> ApiJSONResponse:
    return ApiJSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _code_of(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def from_exception(exc: BaseException) -> ApiError:
    """The answer to an exception from the library: an image id not indexed (or its file
    gone) 404, usage errors 400, another process indexing 409, a vocabulary not fitted yet 409,
    other expected failures 500 with their message; a bug 500 with its type only (the
    traceback goes to the server log)."""
    from piaa_index.library.tagging import NeedsFit
    from piaa_index.vectors.shards import LockedError

    if isinstance(exc, ApiError):
        return exc
    code = exit_code_for(exc)
    if code is None:
        log.error("internal error", exc_info=(type(exc), exc, exc.__traceback__))
        return ApiError(
            500, "internal_error", f"internal error ({type(exc).__name__}); see the server log"
        )
    if isinstance(exc, NotFoundError):
        return ApiError(404, "not_found", str(exc))
    if code == EXIT_USAGE:
        return ApiError(400, "bad_request", str(exc))
    if isinstance(exc, LockedError):
        return ApiError(409, "busy", str(exc))
    if isinstance(exc, NeedsFit):
        return ApiError(409, "needs_fit", str(exc))
    return ApiError(500, "library_error", str(exc))


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _flat_routes(routes: Any) -> Any:
    """Every endpoint route, through included routers (FastAPI nests them)."""
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner is not None:
            yield from _flat_routes(inner)
        else:
            yield route


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the one JSON shape."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else _code_of(exc.status_code)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.url.path!r}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only; name them all.
            methods: set[str] = set()
            for route in _flat_routes(request.app.router.routes):
                if (
                    getattr(route, "methods", None)
                    and route.matches(request.scope)[0] != Match.NONE
                ):
                    methods |= set(route.methods)
            allowed = ", ".join(sorted(methods)) or headers.get("Allow", "")
            headers["Allow"] = allowed
            message = (
                f"{request.method} is not allowed on {request.url.path!r} (allowed: {allowed})"
            )
        return error_response(exc.status_code, _code_of(exc.status_code), message, headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "invalid_request", _validation_message(exc))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = from_exception(exc)
        return error_response(err.status, err.code, err.message, err.headers)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
