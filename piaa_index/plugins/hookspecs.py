"""Plugin hook specifications. A plugin is a module with functions named like these, decorated
with `piaa_index.hookimpl`, registered under the `piaa_index` entry-point group."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from piaa_index.plugins import Exporter, Query

hookspec = pluggy.HookspecMarker("piaa_index")
hookimpl = pluggy.HookimplMarker("piaa_index")


@hookspec
def register_queries(register: Callable[[Query], None]) -> None:
    """Register queries: each becomes `Library.query(name, ...)` and a `piaa NAME` command."""


@hookspec
def register_exporters(register: Callable[[Exporter], None]) -> None:
    """Register exporters that write tags out (`piaa export NAME`)."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add arbitrary sub-commands to the `piaa` CLI."""
