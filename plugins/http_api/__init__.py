"""`piaa serve` and `piaa keys`: the HTTP API for asset-management systems and the gallery.

A first-party plugin written exactly like a third-party one: it implements `register_commands`
and serves every registered query at `GET /api/queries/NAME` with no per-query code. The
ASGI app (FastAPI, served by uvicorn) is built by `app.create_app`; see docs/http-api.md.

This module is imported by every `piaa` command, so it imports nothing heavy: FastAPI and
uvicorn load when `piaa serve` runs.
"""

from __future__ import annotations

import click
from piaa_index_plugins.http_api.cli import keys, serve

from piaa_index.plugins.hookspecs import hookimpl


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(serve)
    cli.add_command(keys)
