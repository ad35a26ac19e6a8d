"""One CLI command per registered query plugin, with the shared output options.

A generated command may carry CLI-only options (a `CommandExtension`, e.g. `tags --evidence`):
things that belong to a terminal (an output file) rather than to the query every front end
serves.
"""

from __future__ import annotations

from typing import Any

import click

from piaa_index.cli.common import (
    CommandExtension,
    app_context,
    emit_rows,
    first_sentence,
    output_options,
)
from piaa_index.cli.evidence import TAGS_EVIDENCE
from piaa_index.plugins import Param, Plugins, Query

# The one-line help of the built-in queries in `piaa --help` (their full help is the query's).
SHORT_HELP = {
    "tags": "Show an image's labels, scores and why each is tagged or not.",
    "search": "Find images by a label expression or by any text phrase.",
    "similar": "Find the images most similar to IMAGE.",
}
SHORT_HELP_WIDTH = 60


def _extensions() -> dict[str, CommandExtension]:
    return {"tags": TAGS_EVIDENCE}


def click_param(p: Param) -> click.Parameter:
    """A positional `Param` as a click argument, the others as `--name` options (the names,
    defaults and types as `Param` gives them to every front end)."""
    if p.positional:
        return click.Argument(
            [p.name], required=p.required, nargs=-1 if p.multiple else 1, type=p.type
        )
    if p.is_flag:
        return click.Option([p.option, p.name], is_flag=True, default=p.default_value, help=p.help)
    return click.Option(
        [p.option, p.name],
        type=p.type,
        default=p.default_value,
        required=p.required,
        multiple=p.multiple,
        show_default=p.has_default,
        help=p.help,
    )


def make_query_command(query: Query, extension: CommandExtension | None = None) -> click.Command:
    own = {str(p.name) for p in extension.params} if extension else set()

    @click.pass_context
    def callback(
        ctx: click.Context,
        as_json: bool,
        as_csv: bool,
        paths_only: bool,
        print0: bool,
        **params: Any,
    ) -> None:
        app = app_context(ctx)
        extra = {k: params.pop(k) for k in own}
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
        if extension is not None:
            fmt = (
                "json"
                if as_json
                else "csv"
                if as_csv
                else "paths"
                if paths_only or print0
                else "table"
            )
            if extension.run(app, params, extra, fmt):
                return
        rows = None
        if query.quick is not None and not app.library_is_open:
            rows = query.quick(app.settings(), progress=app.progress, **params)
        if rows is None:
            rows = query.run(app.library(), progress=app.progress, **params)
        table = extension.table if extension is not None else None
        if table is not None and rows and not (as_json or as_csv or paths_only or print0):
            click.echo(table(rows))
            return
        emit_rows(rows, as_json, as_csv, paths_only, print0)

    command = click.Command(
        query.name,
        callback=output_options(callback),
        params=[click_param(p) for p in query.params] + list(extension.params if extension else ()),
        help=query.help,
        short_help=SHORT_HELP.get(query.name) or first_sentence(query.help, SHORT_HELP_WIDTH),
    )
    # output_options decorated the callback; move its click params onto the command.
    command.params.extend(getattr(command.callback, "__click_params__", [])[::-1])
    return command


def add_query_commands(group: click.Group, plugins: Plugins) -> None:
    extensions = _extensions()
    for name, query in sorted(plugins.queries.items()):
        if name not in group.commands:
            group.add_command(make_query_command(query, extensions.get(name)))
