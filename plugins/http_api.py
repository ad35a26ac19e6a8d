"""`piaa serve`: a small JSON-over-HTTP API for asset-management systems.

A first-party plugin written exactly like a third-party one: it implements `register_commands`
and uses only the public `Library` API and the registered queries, so every query plugin
(built-in or installed) is served at `GET /queries/NAME` with no extra code.

Standard library only (`http.server` + `json`). The server holds ONE `Library` and runs every
library call under one lock: the encoder and the SQLite connection are not meant to be used
from many threads at once, so requests are answered concurrently but computed one at a time.

There is no authentication: the default host is 127.0.0.1; put a reverse proxy in front of it
before exposing it to a network (`POST /index` reads any path the server's user can read).

Routes (all answers are JSON):

    GET  /health                 {"status": "ok", "version": ...}
    GET  /status                 Library.status()
    GET  /queries                the registered queries and their parameters
    GET  /queries/NAME?p=v&...   {"query": NAME, "results": [...]}
    GET  /vocabulary             {"version", "labels", "templates"}
    PUT  /vocabulary             body {"labels": [...], "templates": [...]?} -> the new vocabulary
    POST /index                  body {"paths": [...], "prune": false} -> the index report

Errors: {"error": message} with 400 (bad input), 404 (unknown route or query), 405 (wrong
method), 409 (another process is indexing this library: retry later), 413 (body too large) or
500 (the library could not do its job; unexpected errors are logged on the server, never sent
as a traceback).
"""

from __future__ import annotations

import json
import math
import sys
import threading
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import click

from piaa_index.hookspecs import hookimpl
from piaa_index.textio import json_text

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_BODY_BYTES = 1 << 20  # JSON bodies are label and path lists: 1 MiB is plenty

TRUE_WORDS = {"", "1", "true", "yes", "on"}  # `?present_only` alone means true
FALSE_WORDS = {"0", "false", "no", "off"}


class HttpError(Exception):
    """An answer other than 200, raised from a route handler."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class ApiServer(ThreadingHTTPServer):
    """A threading HTTP server bound to one library; `lock` serialises every library call."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], library: Any, quiet: bool = False):
        self.library = library
        self.lock = threading.Lock()
        self.quiet = quiet
        super().__init__(address, ApiHandler)


def make_server(
    library: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, quiet: bool = False
) -> ApiServer:
    """A server for `library` listening on (host, port); port 0 picks a free port
    (`server.server_port`). Call `serve_forever()` (in a thread, for tests) and `shutdown()`."""
    return ApiServer((host, port), library, quiet=quiet)


# -- JSON helpers ------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become null; numpy scalars, paths etc. plain values."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _encode(value: Any) -> bytes:
    return json_text(_jsonable(value), indent=None).encode("utf-8")


# -- parameters --------------------------------------------------------------------------------


def _describe_param(p: Any) -> dict[str, Any]:
    return {
        "name": p.name,
        "type": "bool" if p.is_flag else getattr(p.type, "__name__", str(p.type)),
        "required": bool(p.required),
        "default": bool(p.default) if p.is_flag else _jsonable(p.default),
        "multiple": bool(p.multiple),
        "help": p.help,
    }


def _convert(p: Any, raw: str) -> Any:
    if p.is_flag:
        word = raw.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise HttpError(HTTPStatus.BAD_REQUEST, f"parameter {p.name!r}: expected 1/true or 0/false")
    try:
        return p.type(raw)
    except (TypeError, ValueError):
        kind = getattr(p.type, "__name__", str(p.type))
        raise HttpError(
            HTTPStatus.BAD_REQUEST, f"parameter {p.name!r}: expected {kind}, got {raw!r}"
        ) from None


def query_params(query: Any, raw: dict[str, list[str]]) -> dict[str, Any]:
    """Query-string values converted per each `Param`; absent ones get the defaults the CLI
    would pass (so `GET /queries/NAME` and `piaa NAME` run the same call)."""
    by_name = {p.name: p for p in query.params}
    unknown = sorted(set(raw) - set(by_name))
    if unknown:
        known = ", ".join(sorted(by_name)) or "none"
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            f"unknown parameter {unknown[0]!r} for query {query.name!r} (known: {known})",
        )
    params: dict[str, Any] = {}
    for p in query.params:
        values = raw.get(p.name)
        if values is None:
            if p.required:
                raise HttpError(HTTPStatus.BAD_REQUEST, f"missing parameter {p.name!r}")
            if p.is_flag:
                params[p.name] = bool(p.default)
            elif p.multiple:
                params[p.name] = list(p.default or [])
            else:
                params[p.name] = p.default
        elif p.multiple:
            params[p.name] = [_convert(p, v) for v in values]
        elif len(values) > 1:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"parameter {p.name!r} given more than once")
        else:
            params[p.name] = _convert(p, values[0])
    return params


# -- the handler -------------------------------------------------------------------------------


Route = Callable[["ApiHandler", list[str]], Any]


class ApiHandler(BaseHTTPRequestHandler):
    server: ApiServer
    server_version = "piaa-index"

    # -- dispatch ----------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch("GET")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def _routes(self, parts: list[str]) -> dict[str, Route] | None:
        if parts == ["health"]:
            return {"GET": ApiHandler._health}
        if parts == ["status"]:
            return {"GET": ApiHandler._status}
        if parts == ["queries"]:
            return {"GET": ApiHandler._queries}
        if len(parts) == 2 and parts[0] == "queries":
            return {"GET": ApiHandler._run_query}
        if parts == ["vocabulary"]:
            return {"GET": ApiHandler._get_vocabulary, "PUT": ApiHandler._put_vocabulary}
        if parts == ["index"]:
            return {"POST": ApiHandler._index}
        return None

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self._query_string = url.query
        self._body_read = False
        parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
        try:
            methods = self._routes(parts)
            if methods is None:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no route {url.path!r}")
            if method not in methods:
                allowed = ", ".join(sorted(methods))
                raise HttpError(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    f"{method} is not allowed on {url.path!r} (allowed: {allowed})",
                    {"Allow": allowed},
                )
            body = methods[method](self, parts)
        except HttpError as exc:
            self._drain_body()
            self._send(exc.status, {"error": exc.message}, exc.headers)
            return
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never a traceback
            status, message = self._error_status(exc)
            self._drain_body()
            self._send(status, {"error": message})
            return
        self._send(HTTPStatus.OK, body)

    def _error_status(self, exc: Exception) -> tuple[HTTPStatus, str]:
        from piaa_index.cli.common import EXIT_USAGE, exit_code_for
        from piaa_index.vectors import LockedError

        code = exit_code_for(exc)
        if code is None:
            # A bug: the traceback goes to the server's log, the client gets one line.
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            return HTTPStatus.INTERNAL_SERVER_ERROR, (
                f"internal error ({type(exc).__name__}); see the server log"
            )
        if code == EXIT_USAGE:
            return HTTPStatus.BAD_REQUEST, str(exc)
        if isinstance(exc, LockedError):  # another process is indexing: retry later
            return HTTPStatus.CONFLICT, str(exc)
        return HTTPStatus.INTERNAL_SERVER_ERROR, str(exc)

    def _send(self, status: HTTPStatus, body: Any, headers: dict[str, str] | None = None) -> None:
        data = _encode(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        if not self.server.quiet:
            super().log_message(format, *args)

    # -- request bodies ----------------------------------------------------------------------

    def _content_length(self) -> int:
        try:
            return max(0, int(self.headers.get("Content-Length") or 0))
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "invalid Content-Length") from None

    def _drain_body(self) -> None:
        """Read an unread (small) body before answering, so the client sees the answer rather
        than a connection reset."""
        if self._body_read:
            return
        self._body_read = True
        try:
            length = self._content_length()
        except HttpError:
            return
        if 0 < length <= MAX_BODY_BYTES:
            self.rfile.read(length)

    def _json_body(self) -> dict[str, Any]:
        length = self._content_length()
        if length > MAX_BODY_BYTES:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes"
            )
        self._body_read = True
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw.strip():
            raise HttpError(HTTPStatus.BAD_REQUEST, "a JSON object body is required")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "the JSON body must be an object")
        return body

    @staticmethod
    def _string_list(body: dict[str, Any], key: str, required: bool) -> list[str] | None:
        value = body.get(key)
        if value is None:
            if required:
                raise HttpError(HTTPStatus.BAD_REQUEST, f"{key!r} is required (a list of strings)")
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{key!r} must be a list of strings")
        return value

    @staticmethod
    def _unknown_keys(body: dict[str, Any], known: set[str]) -> None:
        extra = sorted(set(body) - known)
        if extra:
            raise HttpError(
                HTTPStatus.BAD_REQUEST,
                f"unknown field {extra[0]!r} (known: {', '.join(sorted(known))})",
            )

    # -- routes ------------------------------------------------------------------------------

    def _health(self, parts: list[str]) -> dict[str, Any]:
        from piaa_index import __version__

        return {"status": "ok", "version": __version__}

    def _status(self, parts: list[str]) -> dict[str, Any]:
        with self.server.lock:
            return self.server.library.status()

    def _queries(self, parts: list[str]) -> list[dict[str, Any]]:
        with self.server.lock:
            queries = self.server.library.plugins.queries
        return [
            {"name": q.name, "help": q.help, "params": [_describe_param(p) for p in q.params]}
            for _, q in sorted(queries.items())
        ]

    def _run_query(self, parts: list[str]) -> dict[str, Any]:
        name = parts[1]
        raw = parse_qs(self._query_string, keep_blank_values=True)
        with self.server.lock:
            library = self.server.library
            query = library.plugins.queries.get(name)
            if query is None:
                known = ", ".join(sorted(library.plugins.queries))
                raise HttpError(HTTPStatus.NOT_FOUND, f"no query named {name!r} (known: {known})")
            params = query_params(query, raw)
            rows = query.run(library, progress=False, **params)
        return {"query": name, "results": rows}

    def _vocabulary(self) -> dict[str, Any]:
        vocab = self.server.library.vocabulary()
        return {
            "version": vocab.id if vocab else None,
            "labels": vocab.names if vocab else [],
            "templates": vocab.templates if vocab else [],
        }

    def _get_vocabulary(self, parts: list[str]) -> dict[str, Any]:
        with self.server.lock:
            return self._vocabulary()

    def _put_vocabulary(self, parts: list[str]) -> dict[str, Any]:
        body = self._json_body()
        self._unknown_keys(body, {"labels", "templates"})
        labels = self._string_list(body, "labels", required=True)
        templates = self._string_list(body, "templates", required=False)
        assert labels is not None
        with self.server.lock:
            self.server.library.set_vocabulary(labels, templates)
            return self._vocabulary()

    def _index(self, parts: list[str]) -> dict[str, Any]:
        body = self._json_body()
        self._unknown_keys(body, {"paths", "prune"})
        paths = self._string_list(body, "paths", required=True)
        if not paths:
            raise HttpError(HTTPStatus.BAD_REQUEST, "'paths' is empty")
        prune = body.get("prune", False)
        if not isinstance(prune, bool):
            raise HttpError(HTTPStatus.BAD_REQUEST, "'prune' must be true or false")
        with self.server.lock:
            report = self.server.library.index(paths, prune=prune)
        return report.as_dict()


# -- the command -------------------------------------------------------------------------------


@click.command("serve")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=DEFAULT_PORT,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port (0 picks a free one).",
)
@click.pass_context
def serve(ctx: click.Context, host: str, port: int) -> None:
    """Serve the library as a JSON HTTP API (queries, vocabulary, indexing, status).

    No authentication: keep the default 127.0.0.1, or put a reverse proxy in front.
    """
    from piaa_index.cli.common import app_context

    app = app_context(ctx)
    library = app.library()
    try:
        server = make_server(library, host, port, quiet=app.quiet)
    except OSError as exc:
        library.close()
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    click.echo(f"piaa HTTP API on http://{host}:{server.server_port}/ (Ctrl-C to stop)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    finally:
        server.server_close()
        library.close()


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(serve)
