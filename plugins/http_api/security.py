"""The checks every request passes before any route (pure ASGI middleware, so that a refused
request costs no body parsing and no thread):

- Host header in the allow-list (loopback names, the bound host, `--allow-host`): a web page
  that rebinds its own DNS name to 127.0.0.1 is refused (DNS rebinding).
- Cross-site requests refused unless their Origin is in `--cors-origin` (CORS is off by
  default); browsers send Origin on every cross-site write, so no page can drive the API.
- Bodies: JSON only (415 otherwise, so a form or text/plain "simple request" is refused),
  at most `max_body_bytes` (413, counted as it arrives whatever Content-Length says), nested
  at most `max_json_depth` deep (400, checked before the JSON parser recurses).
- NUL bytes in the path, the query string or a JSON body: 400 (file names and SQL text
  cannot hold them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from piaa_index_plugins.http_api.errors import error_response
from piaa_index_plugins.http_api.state import ServerConfig

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
CORS_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, X-API-Key, Content-Type"


def host_name(value: str) -> str:
    """The name part of a Host header or an origin's netloc, lower-case, IPv6 unbracketed."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """True when JSON brackets nest deeper than `limit` (strings skipped), in one pass."""
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, config: ServerConfig):
        self.app = app
        self.config = config
        self.hosts = config.allowed_hosts()
        self.origins = {o.rstrip("/").lower() for o in config.cors_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]

        async def refuse(status: int, code: str, message: str, **extra: str) -> None:
            await error_response(status, code, message, extra or None)(scope, receive, send)

        host = headers.get("host", "")
        if host_name(host) not in self.hosts:
            await refuse(400, "host_not_allowed", f"Host {host!r} is not served here")
            return
        origin = headers.get("origin")
        cors = False
        if origin is not None and origin != "null" and self._same_origin(origin, host, scope):
            pass
        elif origin is not None and origin.rstrip("/").lower() in self.origins:
            cors = True
        elif origin is not None or headers.get("sec-fetch-site") == "cross-site":
            await refuse(403, "origin_not_allowed", f"cross-site request from {origin!r} refused")
            return
        if cors and method == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(origin or "", send)
            return
        raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        if b"\x00" in unquote_to_bytes(raw) or b"\x00" in unquote_to_bytes(scope["query_string"]):
            await refuse(400, "bad_request", "NUL bytes are not allowed in a URL")
            return
        body: bytes | None = None
        if method in BODY_METHODS:
            result = await self._read_body(headers, receive)
            if isinstance(result, tuple):
                await refuse(*result)
                return
            body = result
        inner_receive = receive if body is None else _replay(body, receive)
        inner_send = send if not cors else _with_cors(send, origin or "")
        await self.app(scope, inner_receive, inner_send)

    def _same_origin(self, origin: str, host: str, scope: Scope) -> bool:
        """Same scheme and same host:port: `https://127.0.0.1:PORT` is another origin than the
        `http://127.0.0.1:PORT` served here (behind a TLS proxy, uvicorn's proxy headers make
        the scope's scheme https)."""
        try:
            parts = urlsplit(origin)
        except ValueError:  # e.g. "http://[::1" (an unclosed IPv6 bracket)
            return False
        scheme = str(scope.get("scheme") or "http").lower()
        return (
            bool(parts.netloc)
            and parts.scheme.lower() == scheme
            and parts.netloc.lower() == host.lower()
        )

    async def _preflight(self, origin: str, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-allow-methods", CORS_METHODS.encode()),
                    (b"access-control-allow-headers", CORS_HEADERS.encode()),
                    (b"access-control-max-age", b"600"),
                    (b"vary", b"Origin"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async def _read_body(
        self, headers: dict[str, str], receive: Receive
    ) -> bytes | tuple[int, str, str]:
        """The whole body, or (status, code, message) to refuse it with."""
        limit = self.config.max_body_bytes
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            if not declared.isdigit():
                return 400, "bad_request", "invalid Content-Length"
            return 413, "body_too_large", f"body over {limit} bytes"
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return 413, "body_too_large", f"body over {limit} bytes"
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if ctype and ctype != "application/json" and not ctype.endswith("+json"):
            return 415, "unsupported_media_type", "request bodies must be application/json"
        if body and not ctype:
            return 415, "unsupported_media_type", "request bodies must be application/json"
        if b"\x00" in body or b"\\u0000" in body.lower():
            return 400, "bad_request", "NUL characters are not allowed in a request body"
        if json_depth_exceeds(body, self.config.max_json_depth):
            return 400, "bad_request", f"JSON nested deeper than {self.config.max_json_depth}"
        return body


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read already, then the connection's own messages (its disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _with_cors(send: Send, origin: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message.setdefault("headers", [])
            message["headers"] = [
                *message["headers"],
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"vary", b"Origin"),
            ]
        await send(message)

    return wrapped
