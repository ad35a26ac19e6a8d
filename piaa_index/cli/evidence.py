"""`piaa tags IMAGE --evidence LABEL [--output map.png]`: the patch evidence map from the CLI.

A CLI-only extension of the generated `tags` command (see `piaa_index/cli/queries.py`): the
map is a file written on the caller's machine, which is not something a query registered for
every front end (Python, HTTP) should take as a parameter.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from piaa_index.cli.common import AppContext, CommandExtension, echo_json, format_table
from piaa_index.cli.tags_table import tags_table


def _run(app: AppContext, params: dict[str, Any], extra: dict[str, Any], fmt: str) -> bool:
    label, output, size = extra["evidence"], extra["output"], extra["evidence_size"]
    if label is None:
        if output is not None:
            raise click.UsageError("--output writes the map of --evidence LABEL; give both")
        return False
    if fmt in ("csv", "paths"):
        raise click.UsageError("--evidence prints a table or --json, not --csv/--paths-only")
    if output == "-" and fmt == "json":
        raise click.UsageError("--output - writes the PNG to stdout, --json the grid: give one")
    from piaa_index.library.evidence import evidence_png

    ev = app.library().evidence(params["image"], label)
    if output == "-":  # the PNG alone on stdout (`… --output - | display`)
        png = evidence_png(ev, size=size)
        sys.stdout.flush()
        sys.stdout.buffer.write(png)
        sys.stdout.buffer.flush()
        return True
    if output is not None:
        png = evidence_png(ev, size=size)  # before opening the file: a bad size writes nothing
        Path(output).write_bytes(png)
    if fmt == "json":
        echo_json(ev.as_json())
        return True
    keys = ("label", "score", "patch_score", "threshold", "present", "why")
    click.echo(format_table([{k: ev.tag.get(k) for k in keys}], list(keys)))
    click.echo(f"\nevidence per patch ({ev.grid.shape[0]}x{ev.grid.shape[1]}, max = patch score):")
    for row in ev.grid:
        click.echo(" ".join(f"{v:.3f}" for v in row))
    if output is not None:
        click.echo(f"wrote {output}", err=True)
    return True


TAGS_EVIDENCE = CommandExtension(
    params=(
        click.Option(
            ["--evidence", "evidence"],
            metavar="LABEL",
            help="Where the classifier sees LABEL on IMAGE: the per-patch evidence grid "
            "(--json: as JSON) and, with --output, the heatmap over the photo as PNG.",
        ),
        click.Option(
            ["--output", "output"],
            type=click.Path(dir_okay=False, writable=True, allow_dash=True),
            help="With --evidence: write the heatmap PNG here (- for standard output).",
        ),
        click.Option(
            ["--evidence-size", "evidence_size"],
            type=click.IntRange(16, 2048),
            default=512,
            show_default=True,
            help="With --output: the PNG's longer side in pixels (at most the photo's).",
        ),
    ),
    run=_run,
    table=tags_table,
)
