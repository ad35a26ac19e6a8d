"""Shared CLI plumbing: the lazily opened library, output formats, error → exit code."""

from __future__ import annotations

import csv
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from piaa_index.errors import DAMAGED_DATABASE_WAY_OUT, PiaaError, is_damaged_database
from piaa_index.textio import json_text

if TYPE_CHECKING:
    from piaa_index.config import Settings
    from piaa_index.library.core import Library

# Exit codes scripts can rely on.
EXIT_OK = 0
EXIT_ERROR = 1  # the tool could not do its job (model, database, files)
EXIT_USAGE = 2  # the user asked for something malformed or unknown


@dataclass
class AppContext:
    home: str | None = None
    db: str | None = None
    model: str | None = None
    pretrained: str | None = None
    front_end: str | None = None
    device: str = "auto"
    quiet: bool = False
    _library: Library | None = field(default=None, repr=False)

    @property
    def progress(self) -> bool:
        return not self.quiet and sys.stderr.isatty()

    @property
    def library_is_open(self) -> bool:
        return self._library is not None

    def settings(self) -> Settings:
        """Where the library is and which model was asked for (opens nothing)."""
        from piaa_index.config import Settings

        return Settings.resolve(
            self.home, self.db, self.model, self.pretrained, self.front_end, self.device
        )

    def library(self) -> Library:
        if self._library is None:
            from piaa_index.library.core import Library

            self._library = Library.open(
                home=self.home,
                db=self.db,
                model=self.model,
                pretrained=self.pretrained,
                front_end=self.front_end,
                device=self.device,
            )
        return self._library


pass_app = click.make_pass_decorator(AppContext)


def app_context(ctx: click.Context) -> AppContext:
    """The AppContext the `piaa` group put on the context (a usage error without one)."""
    app = ctx.find_object(AppContext)
    if app is None:
        raise click.UsageError("this command must run under the piaa command group", ctx=ctx)
    return app


def run_guarded(command: click.Command, args: list[str]) -> None:
    """Run the CLI; expected failures print one line to stderr and exit 1 or 2, no traceback."""
    raw_file_names_on_output()
    try:
        command.main(args=args, prog_name="piaa", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(
            "Interrupted: what was committed is kept; run the command again to resume.", err=True
        )
        sys.exit(130)
    except OSError as exc:
        # The environment failed (a folder that is not there or not writable, a full disk):
        # exit 1 with what the system said, no traceback.
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"Error: {exc.strerror or exc}{where}", err=True)
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # noqa: BLE001 - mapped to messages below, re-raised otherwise
        code = exit_code_for(exc)
        if code is None:
            raise
        if _is_bad_zip(exc):  # the only zip left unchecked: a classifier's weights
            click.echo(
                f"Error: stored data is damaged ({exc}): `piaa db check` finds it (a damaged "
                "classifier is removed, and the next query fits it again)",
                err=True,
            )
        elif _is_database_error(exc):
            reason = getattr(exc, "orig", None) or exc
            if is_damaged_database(reason):
                click.echo(
                    f"Error: the database file is damaged: {reason}; `piaa db check` reports "
                    f"the damage; {DAMAGED_DATABASE_WAY_OUT}",
                    err=True,
                )
            else:
                click.echo(f"Error: the database failed: {reason} (see `piaa db check`)", err=True)
        else:
            click.echo(f"Error: {exc}", err=True)
        sys.exit(code)
    sys.exit(EXIT_OK)


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of an expected error, None for a bug (which keeps its traceback)."""

    if isinstance(exc, PiaaError):
        return exc.exit_code
    if _is_database_error(exc) or _is_bad_zip(exc):
        return EXIT_ERROR  # a damaged or unreachable database is the environment, not a bug
    return None


def _is_bad_zip(exc: BaseException) -> bool:
    zipfile = sys.modules.get("zipfile")  # not imported here: the error path stays light
    return zipfile is not None and isinstance(exc, zipfile.BadZipFile)


def _is_database_error(exc: BaseException) -> bool:
    if "sqlalchemy" not in sys.modules:
        return False
    from sqlalchemy.exc import DatabaseError

    return isinstance(exc, DatabaseError)


def output_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--json / --csv / --paths-only / --print0, shared by every query command."""

    @click.option("--json", "as_json", is_flag=True, help="One JSON list of result objects.")
    @click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
    @click.option("--paths-only", is_flag=True, help="Only the paths, one per line (for piping).")
    @click.option(
        "--print0",
        "-0",
        "print0",
        is_flag=True,
        help="Only the paths, each followed by a NUL byte (for `xargs -0`: names may hold "
        "newlines).",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def emit_rows(
    rows: list[dict[str, Any]],
    as_json: bool,
    as_csv: bool,
    paths_only: bool,
    print0: bool = False,
) -> None:
    """Print query results to stdout in the chosen format (table by default)."""
    if as_json:
        click.echo(json_text(rows))
        return
    if print0:
        # The names' own bytes, each NUL-terminated as `find -print0` writes them: nothing
        # (newlines, escape sequences, bytes that are not UTF-8) is altered.

        sys.stdout.flush()
        out = sys.stdout.buffer
        written = set()
        for row in rows:
            path = row.get("path")
            if path and path not in written:
                written.add(path)
                out.write(os.fsencode(path) + b"\0")
        out.flush()
        return
    if paths_only:
        seen = set()
        for row in rows:
            if row.get("path") and row["path"] not in seen:
                seen.add(row["path"])
                click.echo(row["path"])
        return
    flat = [_flatten(row) for row in rows]
    columns: list[str] = []
    for row in flat:
        for key in row:
            if key not in columns:
                columns.append(key)
    if as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        return
    if not flat:
        click.echo("(no results)", err=True)
        return
    click.echo(format_table(flat, columns))


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, bool):
            return "yes" if v else "no"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )
    return "\n".join(lines)


def first_sentence(text: str | None, limit: int) -> str | None:
    """The first sentence of `text`'s first paragraph when it fits in `limit` characters, else
    None: a command's short help that is a whole sentence (click's own cuts mid-sentence, at
    "e.g." or at its width)."""
    if not text:
        return None
    paragraph = " ".join(text.strip().split("\n\n")[0].replace("\b", "").split())
    depth = 0
    for i, ch in enumerate(paragraph):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(depth - 1, 0)
        elif ch == "." and depth == 0 and paragraph[i + 1 : i + 2] in ("", " "):
            sentence = paragraph[: i + 1]
            if sentence.endswith(("e.g.", "i.e.", "etc.", "vs.")):
                continue
            return sentence if len(sentence) <= limit else None
    return paragraph if len(paragraph) <= limit else None


def echo_json(value: Any) -> None:
    click.echo(json_text(value))


def raw_file_names_on_output() -> None:
    """Tables and --paths-only write a non-UTF-8 file name as its own bytes, as `ls` does, so
    that `piaa search X --paths-only | xargs …` reaches the file (strict UTF-8 would crash)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="surrogateescape")


# A generated query command's CLI-only options (cli/queries.py builds the commands,
# cli/evidence.py defines `tags --evidence`); here so that neither imports the other.
@dataclass(frozen=True)
class CommandExtension:
    """Extra click options of a generated query command, and what they do.

    `run(app, query params, extension params, output format)` returns True when it answered
    the command itself (its options were given), False to run the query as usual; the format
    is "json", "csv", "paths" or "table". `table(rows)`, when given, is the human table of the
    query's rows (the other formats keep every field).
    """

    params: tuple[click.Parameter, ...]
    run: Callable[[AppContext, dict[str, Any], dict[str, Any], str], bool]
    table: Callable[[list[dict[str, Any]]], str] | None = None
