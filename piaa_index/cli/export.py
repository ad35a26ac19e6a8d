"""`piaa export NAME`: one sub-command per registered exporter."""

from __future__ import annotations

from typing import Any

import click

from piaa_index.cli.common import app_context, echo_json


class ExportGroup(click.Group):
    """Sub-commands come from exporter plugins, loaded on first use."""

    def _exporters(self) -> dict:
        from piaa_index.plugins import Plugins

        return Plugins().exporters

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self._exporters())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from piaa_index.cli.queries import _click_param

        exporter = self._exporters().get(name)
        if exporter is None:
            return None

        @click.pass_context
        def callback(ctx: click.Context, **params: Any) -> None:
            app = app_context(ctx)
            params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
            echo_json(exporter.run(app.library(), **params))

        return click.Command(
            name,
            callback=callback,
            params=[_click_param(p) for p in exporter.params],
            help=exporter.help,
        )


@click.group("export", cls=ExportGroup)
def export_group() -> None:
    """Write tags out: XMP sidecars for Lightroom/digiKam/darktable, CSV, JSON."""


COMMANDS = [export_group]
