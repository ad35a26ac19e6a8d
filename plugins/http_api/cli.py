"""The commands: `piaa serve` (uvicorn on the app of app.py) and `piaa keys`."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from piaa_index.cli.common import app_context, echo_json, format_table
from piaa_index.errors import UserInputError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
BACKLOG = 2048  # the listen queue: bursts of connections wait here instead of being reset
LIMIT_CONCURRENCY = 1000  # connections + tasks at once; beyond it new ones get 503 at once
TIMEOUT_KEEP_ALIVE = 5  # seconds an idle kept-alive connection is held
# Connection guard (security.guarded_protocol): a request head must arrive within
# security.HEADER_TIMEOUT seconds (this variable overrides it), and one client address keeps at
# most security.IDLE_PER_CLIENT connections waiting for one.
HEADER_TIMEOUT_ENV = "PIAA_HEADER_TIMEOUT"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that port 0 is known before the URL is printed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


@click.command("serve")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=DEFAULT_PORT,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port (0 picks a free one).",
)
@click.option(
    "--allow-host",
    multiple=True,
    help="Another Host header name to answer (beside loopback names and --host), e.g. the "
    "server's DNS name behind a proxy. Repeatable.",
)
@click.option(
    "--cors-origin",
    multiple=True,
    help="A web origin allowed to call the API cross-site, e.g. https://dam.example.org "
    "(CORS is off by default). Repeatable.",
)
@click.option(
    "--public-read", is_flag=True, help="Answer reads without a key (writes still need one)."
)
@click.option(
    "--index-root",
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Index jobs only under this folder (repeatable; default: any path the server can read).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    allow_host: tuple[str, ...],
    cors_origin: tuple[str, ...],
    public_read: bool,
    index_root: tuple[str, ...],
) -> None:
    """Serve the library as an HTTP API (OpenAPI at /docs) and the web gallery.

    Every read needs a key unless --public-read; every write needs a write key (`piaa keys
    create`). The URL printed at start carries a write key valid until the server stops.
    A non-loopback --host is refused until at least one key exists. A connection that sends
    no complete request head within 10 s (env PIAA_HEADER_TIMEOUT, seconds) is closed, and a
    client address keeps at most 64 connections waiting for one (the oldest are closed).
    """

    try:
        import uvicorn
        from piaa_index_plugins.http_api.app import create_app
        from piaa_index_plugins.http_api.auth import new_token
        from piaa_index_plugins.http_api.security import guarded_protocol
        from piaa_index_plugins.http_api.state import ServerConfig
    except ImportError as exc:  # pragma: no cover - the server deps are core dependencies
        raise click.ClickException(
            f"the HTTP server needs {exc.name}: pip install 'piaa-index' with its dependencies"
        ) from None

    header_timeout = _header_timeout()  # before the library opens: a bad value stops here
    app_ctx = app_context(ctx)
    library = app_ctx.library()
    demo = library.settings.home / "demo" / "index"
    if (
        library.indexed_count() == 0
        and (demo / "piaa.sqlite3").is_file()
        and app_ctx.db is None
        and not os.environ.get("PIAA_DB")
    ):
        # `piaa demo` keeps its library in its own home: `piaa demo` then `piaa serve` shows it.
        from piaa_index.library.core import Library

        library.close()
        library = Library.open(home=demo, db=f"sqlite:///{demo / 'piaa.sqlite3'}")
        click.echo(
            f"this library is empty: serving the demo's (piaa --home {demo} serve)", err=True
        )
    if not is_loopback(host) and library.live_api_keys() == 0:
        library.close()
        raise UserInputError(
            f"refusing to listen on {host} (not loopback) without an API key: create one with "
            "`piaa keys create --scope read` first"
        )
    try:
        sock = _listen(host, port)
    except OSError as exc:
        library.close()
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    session_key = new_token()
    config = ServerConfig(
        host=host,
        allow_hosts=allow_host,
        cors_origins=cors_origin,
        public_read=public_read,
        session_key=session_key,
        index_roots=index_root,
    )
    app = create_app(library, config, close_library=True)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"piaa HTTP API and gallery on http://{shown}:{bound}/ (Ctrl-C to stop)", err=True)
    click.echo(f"open http://{shown}:{bound}/#key={session_key}", err=True)
    click.echo(f"API docs: http://{shown}:{bound}/docs", err=True)
    sys.stderr.flush()
    server = _server_class()(
        uvicorn.Config(
            app,
            http=guarded_protocol(header_timeout=header_timeout),
            backlog=BACKLOG,
            limit_concurrency=LIMIT_CONCURRENCY,
            timeout_keep_alive=TIMEOUT_KEEP_ALIVE,
            timeout_graceful_shutdown=10,
            log_level="warning" if app_ctx.quiet else "info",
            access_log=not app_ctx.quiet,
            server_header=False,
        )
    )
    try:
        server.run(sockets=[sock])  # SIGINT / SIGTERM: stop accepting, finish, shut down
    finally:
        sock.close()
    click.echo("stopped", err=True)


def _header_timeout() -> float:
    """Seconds a connection may take to send a request head: PIAA_HEADER_TIMEOUT, else 10."""
    from piaa_index_plugins.http_api.security import HEADER_TIMEOUT

    raw = os.environ.get(HEADER_TIMEOUT_ENV, "").strip()
    if not raw:
        return HEADER_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:  # also refuses nan and inf
        raise UserInputError(f"{HEADER_TIMEOUT_ENV} must be seconds in (0, 3600], not {raw!r}")
    return value


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown, so the process would
        die by the signal; here the shutdown (requests finished, jobs and library closed) is the
        end, and `piaa serve` exits 0."""

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return Server


@click.group("keys")
def keys() -> None:
    """API keys of `piaa serve` (stored hashed; a key is shown only when created)."""


@keys.command("create")
@click.option(
    "--scope",
    type=click.Choice(["read", "write"]),
    required=True,
    help="read: queries, images, tags; write: also vocabulary and jobs.",
)
@click.option("--name", default=None, help="A note on who uses it.")
@click.pass_context
def keys_create(ctx: click.Context, scope: str, name: str | None) -> None:
    """Create a key and print it (it cannot be shown again)."""
    from piaa_index_plugins.http_api.auth import create_key

    key_id, token = create_key(app_context(ctx).library(), scope, name)
    click.echo(f"key {key_id} ({scope}) created; it is shown only now:", err=True)
    click.echo(token)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON list.")
@click.pass_context
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """Every key: id, name, scope, the key's first characters, created, revoked."""

    rows = app_context(ctx).library().api_keys()
    if as_json:
        echo_json(rows)
    elif rows:
        click.echo(format_table(rows, list(rows[0])))
    else:
        click.echo("(no keys)", err=True)


@keys.command("revoke")
@click.argument("key_id", type=int)
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: int) -> None:
    """Revoke a key by id (it stops working at once, also on a running server)."""

    # An id past the database's integer range names no key (and would overflow the driver).
    in_range = -(2**63) <= key_id <= 2**63 - 1
    if not in_range or not app_context(ctx).library().revoke_api_key(key_id):
        raise UserInputError(f"no live key with id {key_id} (see `piaa keys list`)")
    click.echo(f"key {key_id} revoked", err=True)
