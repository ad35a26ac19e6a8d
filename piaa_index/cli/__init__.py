"""The `piaa` command: a thin layer over `piaa_index.library.Library`.

Sub-command modules are imported when the group is built, but they import torch, open_clip
and faiss only inside command bodies, so `piaa --help` stays instant.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from piaa_index import __version__
from piaa_index.cli.common import AppContext, run_guarded

# Global options: (declarations, settings). The group takes them with their environment
# variables and defaults; every sub-command also accepts them (`piaa index DIR --model X`),
# where a given value overrides the group's.
GLOBAL_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--home",),
        {
            "envvar": "PIAA_HOME",
            "type": click.Path(file_okay=False),
            "help": "Data folder (SQLite database, vectors). Env: PIAA_HOME.",
        },
    ),
    (
        ("--db",),
        {"envvar": "PIAA_DB", "help": "SQLAlchemy URL, e.g. postgresql://host/db. Env: PIAA_DB."},
    ),
    (
        ("--model",),
        {
            "envvar": "PIAA_MODEL",
            "help": "open_clip model name, `shapesworld` or `shapesworld-gap` (the shipped "
            "stand-ins), or a model-config JSON. "
            "Env: PIAA_MODEL. [default: ViT-B-16]",
        },
    ),
    (
        ("--pretrained",),
        {
            "envvar": "PIAA_PRETRAINED",
            "help": "Weights: an open_clip tag (downloaded on first use; see `piaa models`), a "
            "checkpoint file (recorded by its sha256, so it may move), or `none`. "
            "Env: PIAA_PRETRAINED. [default: openai for ViT-B-16, the shipped file for "
            "the shipped models]",
        },
    ),
    (
        ("--front-end",),
        {
            "envvar": "PIAA_FRONT_END",
            "type": click.Choice(["clip", "sclip"]),
            "help": "Patch front-end. [default: sclip; clip for the shipped models]",
        },
    ),
    (
        ("--device",),
        {
            "envvar": "PIAA_DEVICE",
            "type": click.Choice(["auto", "cpu", "cuda"]),
            "default": "auto",
            "show_default": True,
            "help": "Where the model runs. Env: PIAA_DEVICE.",
        },
    ),
    (("-q", "--quiet"), {"is_flag": True, "default": False, "help": "No progress bars."}),
]


def _global_option_decorators(func: Callable[..., Any]) -> Callable[..., Any]:
    for decls, settings in reversed(GLOBAL_OPTIONS):
        func = click.option(*decls, **settings)(func)
    return func


def _override_global(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A global option given after the sub-command: it wins over the group's value."""
    if value is None or value is False:
        return
    app = ctx.find_object(AppContext)
    if app is not None and param.name is not None:
        setattr(app, param.name, value)


def with_global_options(command: click.Command | None) -> click.Command | None:
    """Let `command` (and, for a group, every sub-command it resolves) take the global options."""
    if command is None or getattr(command, "_piaa_globals", False):
        return command
    taken = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    for decls, settings in GLOBAL_OPTIONS:
        if taken.intersection(decls):
            continue  # the command's own option of that name wins
        local = {
            k: v for k, v in settings.items() if k not in ("envvar", "default", "show_default")
        }
        # Hidden: the group's help documents them once and says they may follow a command.
        command.params.append(
            click.Option(decls, expose_value=False, callback=_override_global, hidden=True, **local)
        )
    command._piaa_globals = True  # type: ignore[attr-defined]
    if isinstance(command, click.Group):
        resolve = command.get_command

        def get_command(ctx: click.Context, name: str) -> click.Command | None:
            return with_global_options(resolve(ctx, name))

        # On the instance: a plugin's group class is not ours to subclass.
        setattr(command, "get_command", get_command)  # noqa: B010
    return command


class PiaaGroup(click.Group):
    """Adds the commands that plugins register (queries and arbitrary commands) on first use,
    and lets every sub-command take the global options."""

    _plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from piaa_index.cli.queries import add_query_commands
        from piaa_index.plugins import Plugins

        plugins = Plugins()
        add_query_commands(self, plugins)
        plugins.pm.hook.register_commands(cli=self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_plugin_commands()
        return with_global_options(super().get_command(ctx, cmd_name))


@click.group(cls=PiaaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="piaa")
@_global_option_decorators
@click.pass_context
def cli(ctx: click.Context, **options: object) -> None:
    """Tag and search photo collections by what is in them.

    \b
    Quick start:
      piaa index ~/Pictures
      piaa vocab set dog bicycle person
      piaa search "dog AND bicycle AND NOT person"

    Global options may also follow the sub-command: piaa index DIR --model shapesworld.
    """
    ctx.obj = AppContext(**options)  # type: ignore[arg-type]


def _register_builtin_commands() -> None:
    from piaa_index.cli import (
        db,
        demo,
        evaluate,
        export,
        index,
        models,
        plugins_cmd,
        shapes,
        vocab,
    )

    for module in (index, vocab, db, models, plugins_cmd, evaluate, demo, shapes, export):
        for command in module.COMMANDS:
            cli.add_command(command)


_register_builtin_commands()


def main() -> None:
    """Entry point of the `piaa` script."""
    run_guarded(cli, sys.argv[1:])
