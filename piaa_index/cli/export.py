"""`piaa export NAME`: one sub-command per registered exporter."""

from __future__ import annotations

from typing import Any

import click

from piaa_index.cli.common import app_context, echo_json, first_sentence

ERRORS_SHOWN = 10
# The short help of exporters whose help does not start with a short sentence.
SHORT_HELP = {"xmp": "Merge the present labels into XMP sidecars as keywords."}
SHORT_HELP_WIDTH = 60
STDOUT = "-"  # an exporter's `--output -`: the data goes to standard output


class ExportGroup(click.Group):
    """Sub-commands come from exporter plugins, loaded on first use."""

    def _exporters(self) -> dict:
        from piaa_index.plugins import Plugins

        return Plugins().exporters

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self._exporters())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from piaa_index.cli.queries import click_param

        exporter = self._exporters().get(name)
        if exporter is None:
            return None

        @click.pass_context
        def callback(ctx: click.Context, as_json: bool, **params: Any) -> None:
            app = app_context(ctx)
            params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
            # `--output -` puts the data on stdout: the summary goes to stderr instead.
            to_stdout = params.get("output") == STDOUT
            if to_stdout and as_json:
                raise click.UsageError(
                    "--output - writes the data to stdout, --json the summary: give one of them"
                )
            summary = exporter.run(app.library(), **params)
            if as_json:
                echo_json(summary)
            else:
                echo_summary(name, summary, err=to_stdout)

        return click.Command(
            name,
            callback=callback,
            params=[
                *(click_param(p) for p in exporter.params),
                click.Option(["--json", "as_json"], is_flag=True, help="The summary as JSON."),
            ],
            help=exporter.help,
            short_help=SHORT_HELP.get(name) or first_sentence(exporter.help, SHORT_HELP_WIDTH),
        )


def echo_summary(name: str, summary: dict[str, Any], err: bool = False) -> None:
    """One line for the summary (counts and short values); a `paths` mapping (outcome → paths)
    is listed first, one `outcome<TAB>path` line each; `errors` go to stderr, the first few.
    `err`: everything to stderr (the data itself went to stdout)."""
    for outcome, paths in (summary.get("paths") or {}).items():
        for path in paths:
            click.echo(f"{outcome}\t{path}", err=err)
    parts = []
    for key, value in summary.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        if isinstance(value, int) and value == 0 and key not in ("written", "images"):
            continue  # "0 failed" on every line is noise
        parts.append(f"{value} {key}" if isinstance(value, (int, float)) else f"{key}: {value}")
    click.echo(f"{name}: {', '.join(parts) or 'nothing to do'}", err=err)
    errors = summary.get("errors") or []
    for line in errors[:ERRORS_SHOWN]:
        click.echo(line, err=True)
    if len(errors) > ERRORS_SHOWN:
        click.echo(f"… and {len(errors) - ERRORS_SHOWN} more (--json lists them all)", err=True)


@click.group("export", cls=ExportGroup, short_help="Write tags out as XMP sidecars, CSV or JSON.")
def export_group() -> None:
    """Write tags out: XMP sidecars for Lightroom/digiKam/darktable, CSV, JSON."""


COMMANDS = [export_group]
