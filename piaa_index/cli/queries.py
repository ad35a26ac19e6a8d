"""One CLI command per registered query plugin, with the shared output options."""

from __future__ import annotations

from typing import Any

import click

from piaa_index.cli.common import app_context, emit_rows, output_options
from piaa_index.plugins import Param, Plugins, Query


def _click_param(p: Param) -> click.Parameter:
    if p.positional:
        return click.Argument(
            [p.name], required=p.required, nargs=-1 if p.multiple else 1, type=p.type
        )
    flag = "--" + p.name.replace("_", "-")
    if p.is_flag:
        return click.Option([flag, p.name], is_flag=True, default=bool(p.default), help=p.help)
    return click.Option(
        [flag, p.name],
        type=p.type,
        default=p.default,
        required=p.required,
        multiple=p.multiple,
        show_default=p.default is not None,
        help=p.help,
    )


def make_query_command(query: Query) -> click.Command:
    @click.pass_context
    def callback(
        ctx: click.Context, as_json: bool, as_csv: bool, paths_only: bool, **params: Any
    ) -> None:
        app = app_context(ctx)
        library = app.library()
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
        rows = query.run(library, progress=app.progress, **params)
        emit_rows(rows, as_json, as_csv, paths_only)

    command = click.Command(
        query.name,
        callback=output_options(callback),
        params=[_click_param(p) for p in query.params],
        help=query.help,
    )
    # output_options decorated the callback; move its click params onto the command.
    command.params.extend(getattr(command.callback, "__click_params__", [])[::-1])
    return command


def add_query_commands(group: click.Group, plugins: Plugins) -> None:
    for name, query in sorted(plugins.queries.items()):
        if name not in group.commands:
            group.add_command(make_query_command(query))
