"""The checks every request passes before any route (pure ASGI middleware, so that a refused
request costs no body parsing and no thread):

- Host header in the allow-list (loopback names, the bound host, `--allow-host`): a web page
  that rebinds its own DNS name to 127.0.0.1 is refused (DNS rebinding).
- Cross-site requests refused unless their Origin is in `--cors-origin` (CORS is off by
  default); browsers send Origin on every cross-site write, so no page can drive the API.
- Bodies: JSON only (415 otherwise, so a form or text/plain "simple request" is refused),
  at most `max_body_bytes` (413, counted as it arrives whatever Content-Length says; a bulk
  of labels, POST /api/user-labels, at most `max_bulk_body_bytes`), nested
  at most `max_json_depth` deep (400, checked before the JSON parser recurses).
- NUL bytes in the path, the query string or a JSON body: 400 (file names and SQL text
  cannot hold them).

Below the ASGI app, at the connection level (`guarded_protocol`, the HTTP protocol class that
`piaa serve` hands to uvicorn): a connection must send each complete request head within
`header_timeout` seconds (slow or silent clients, half-open connections), and one client
address keeps at most `per_client` connections waiting for a request head, so that stalled
connections cannot use up the server's connection limit (every other request would be 503).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, ClassVar
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
# Routes whose bodies may be up to `max_bulk_body_bytes` (others: `max_body_bytes`).
BULK_PATHS = frozenset({"/api/user-labels"})


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
            bulk = method == "POST" and scope["path"] in BULK_PATHS
            limit = self.config.max_bulk_body_bytes if bulk else self.config.max_body_bytes
            result = await self._read_body(headers, receive, limit)
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
        self, headers: dict[str, str], receive: Receive, limit: int
    ) -> bytes | tuple[int, str, str]:
        """The whole body, or (status, code, message) to refuse it with."""
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


# -- connection guard (uvicorn protocol level) ----------------------------------------------------

HEADER_TIMEOUT = 10.0  # seconds a connection may take to send a complete request head
IDLE_PER_CLIENT = 64  # connections one client address may keep waiting for a request head
EVICT_GRACE = 1.0  # seconds a new connection has to send its head before it can be evicted


def guarded_protocol(
    base: type[asyncio.Protocol] | None = None,
    *,
    header_timeout: float = HEADER_TIMEOUT,
    per_client: int = IDLE_PER_CLIENT,
    grace: float = EVICT_GRACE,
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (`base`, default its "auto" choice: h11 or httptools)
    with two guards, for `uvicorn.Config(http=...)`. One class per server: it holds that
    server's per-address bookkeeping.

    A connection is *waiting* from when it is made, or its last response is complete, until a
    complete request head has arrived (uvicorn then starts a request cycle). While waiting:

    - after `header_timeout` seconds it is closed, however many bytes it dribbled in (uvicorn
      has no such timeout: its keep-alive timer stops at the first byte, and a connection that
      never sends one is held until the client goes away);
    - when one client address has more than `per_client` waiting connections, its oldest ones
      beyond that bound are closed, the newest kept: a new connection normally carries a
      request, and a stalled one cannot keep it out. Connections younger than `grace` are
      spared (a burst of connections is accepted before their first bytes are read); a check
      `grace` seconds after each over-bound arrival closes them then if they still wait.

    Connections with a request in flight are never counted or closed here; their number is
    bounded by uvicorn's `limit_concurrency` (503 beyond it).
    """
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    parent: Any = base

    class Guarded(parent):  # type: ignore[misc, valid-type]
        # client address -> {waiting connection: since (loop time)}, oldest first
        waiting: ClassVar[dict[str, dict[Any, float]]] = {}

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._guard_peer: str | None = None
            self._guard_timer: asyncio.TimerHandle | None = None
            self._guard_since: float | None = None
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            if isinstance(peer, (tuple, list)) and peer:
                self._guard_peer = str(peer[0])
            self._guard_sync()
            mine = self.waiting.get(self._guard_peer or "", {})
            if self._guard_peer is not None and len(mine) > per_client:
                _evict(self.waiting, self._guard_peer, self.loop.time())
                self.loop.call_later(grace, self._guard_evict_later, self._guard_peer)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._guard_sync()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._guard_sync()

        def connection_lost(self, exc: Exception | None) -> None:
            self._guard_stop()
            super().connection_lost(exc)

        def _guard_sync(self) -> None:
            """Start or stop waiting as the request cycle says."""
            cycle = getattr(self, "cycle", None)
            transport = self.transport
            idle = cycle is None or bool(getattr(cycle, "response_complete", False))
            if transport is None or transport.is_closing() or transport.get_protocol() is not self:
                idle = False  # closing, or upgraded (WebSocket): no longer ours to time out
            if idle and self._guard_since is None:
                self._guard_since = self.loop.time()
                if self._guard_peer is not None:
                    self.waiting.setdefault(self._guard_peer, {})[self] = self._guard_since
                self._guard_timer = self.loop.call_later(header_timeout, self._guard_timeout)
            elif not idle and self._guard_since is not None:
                self._guard_stop()

        def _guard_stop(self) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None
            self._guard_since = None
            mine = self.waiting.get(self._guard_peer or "")
            if mine is not None:
                mine.pop(self, None)
                if not mine:
                    del self.waiting[self._guard_peer or ""]

        def _guard_timeout(self) -> None:
            self._guard_timer = None
            self._guard_sync()  # a request head may have arrived in the same loop turn
            if self._guard_since is not None:
                self._guard_close()

        def _guard_close(self) -> None:
            self._guard_stop()
            if not self.transport.is_closing():
                self.transport.close()  # flushes what is written, then closes

        def _guard_evict_later(self, peer: str) -> None:
            _evict(self.waiting, peer, self.loop.time())

    def _evict(waiting: dict[str, dict[Any, float]], peer: str, now: float) -> None:
        """Close `peer`'s oldest waiting connections beyond `per_client`, sparing the young."""
        mine = waiting.get(peer, {})
        excess = len(mine) - per_client
        for conn, since in list(mine.items()):  # oldest first
            if excess <= 0 or now - since < grace:
                break
            conn._guard_close()
            excess -= 1

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded
