"""The `piaa` command: a thin layer over `piaa_index.library.core.Library`.

Sub-command modules are imported when the group is built, but they import torch, open_clip
and faiss only inside command bodies, so `piaa --help` stays instant.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from piaa_index import __version__
from piaa_index.cli import (
    db,
    demo,
    evaluate,
    export,
    index,
    labels,
    models,
    plugins_cmd,
    shapes,
    vocab,
)
from piaa_index.cli.common import AppContext, first_sentence, run_guarded

if TYPE_CHECKING:
    from piaa_index.plugins import Plugins

# Global options: (declarations, settings). The group takes them with their environment
# variables and defaults; every sub-command also accepts them (`piaa index DIR --model X`),
# where a given value overrides the group's.
GLOBAL_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--home",),
        {
            "envvar": "PIAA_HOME",
            "type": click.Path(file_okay=False),
            "metavar": "DIR",
            "help": "Data folder (SQLite database, vectors). Env: PIAA_HOME.",
        },
    ),
    (
        ("--db",),
        {
            "envvar": "PIAA_DB",
            "metavar": "URL",
            "help": "SQLAlchemy URL, e.g. postgresql://host/db. Env: PIAA_DB.",
        },
    ),
    (
        ("--model",),
        {
            "envvar": "PIAA_MODEL",
            "metavar": "NAME",
            "help": "An open_clip model, `shapesworld` or `shapesworld-gap` (shipped, work "
            "offline), or a model-config JSON. Env: PIAA_MODEL. [default: ViT-B-16]",
        },
    ),
    (
        ("--pretrained",),
        {
            "envvar": "PIAA_PRETRAINED",
            "metavar": "WEIGHTS",
            "help": "An open_clip tag (see `piaa models`), a checkpoint file, or `none`. "
            "Env: PIAA_PRETRAINED. [default: openai; the shipped file for the shipped models]",
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
            "type": click.Choice(["auto", "cpu", "cuda", "mps"]),
            "default": "auto",
            "show_default": True,
            "help": "Where the model runs (auto: CUDA, else Apple's MPS, else the CPU). Env: "
            "PIAA_DEVICE.",
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


def with_global_options(command: click.Command | None, path: str = "") -> click.Command | None:
    """Let `command` (and, for a group, every sub-command it resolves) take the global options;
    give it a one-line help that is a whole sentence. `path`: its name under `piaa`."""
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
    if command.short_help is None:  # a whole sentence where the help starts with a short one
        command.short_help = SHORT_HELP.get(path) or first_sentence(command.help, SHORT_HELP_WIDTH)
    if isinstance(command, click.Group):
        resolve = command.get_command

        def get_command(ctx: click.Context, name: str) -> click.Command | None:
            return with_global_options(resolve(ctx, name), f"{path} {name}".strip())

        # On the instance: a plugin's group class is not ours to subclass.
        setattr(command, "get_command", get_command)  # noqa: B010
    return command


# `piaa --help` lists the commands in the order a new user meets them, in these sections;
# commands a plugin adds come last. The one-line help (by command path) of the commands defined
# outside piaa_index/cli (the HTTP plugin's) and of `index`/`status`, each a whole sentence;
# other commands without one get their help's first sentence when it is short.
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Start", ("demo", "index", "vocab", "fit", "status")),
    ("Teach", ("labels", "teach")),
    ("Find", ("search", "tags", "similar")),
    ("Share", ("export", "serve", "keys")),
    ("Look after", ("db", "models", "plugins")),
    ("Measure", ("eval", "shapes")),
)
SHORT_HELP = {
    "index": "Index image folders and files (incremental, resumable).",
    "status": "Show counts, model, vocabulary and whether tags are stale.",
    "serve": "Serve the HTTP API and the web gallery.",
    "keys": "Create, list or revoke the API keys of `piaa serve`.",
    "keys list": "List the keys: id, name, scope, created, revoked.",
    "keys revoke": "Revoke a key by id, at once, also on a running server.",
}
SHORT_HELP_WIDTH = 60

EPILOG = """\b
First steps:
  piaa demo                      try it all offline on generated scenes
  piaa index ~/Pictures          index a folder (fetches ViT-B-16 once)
  piaa vocab set dog bicycle     the labels to tag with (or --from FILE)
  piaa search "dog AND NOT bicycle"
  piaa tags ~/Pictures/a.jpg     one photo's labels and why

\b
`piaa COMMAND --help` shows a command's options; docs/cli.md has them all.
Shell completion: eval "$(_PIAA_COMPLETE=bash_source piaa)" (docs/cli.md).
"""


class PiaaGroup(click.Group):
    """Adds the commands that plugins register (queries and arbitrary commands) on first use,
    and lets every sub-command take the global options. Its help reads as one page: what
    piaa is, the commands by section, the global options, the first steps."""

    _plugins: Plugins | None = None
    _all_plugins_loaded = False

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        self.format_commands(ctx, formatter)
        self.format_options(ctx, formatter)
        self.format_epilog(ctx, formatter)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The global options only (the commands have their own sections)."""
        records = [r for p in self.get_params(ctx) if (r := p.get_help_record(ctx))]
        if records:
            with formatter.section("Global options (before or after the command)"):
                formatter.write_dl(records)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        commands: dict[str, click.Command] = {}
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                commands[name] = command
        if not commands:
            return
        width = max(len(name) for name in commands)
        limit = formatter.width - 6 - width
        placed: set[str] = set()
        sections = [(title, [n for n in names if n in commands]) for title, names in SECTIONS]
        for _, names in sections:
            placed.update(names)
        sections.append(("Plugin commands", [n for n in commands if n not in placed]))
        for title, names in sections:
            if not names:
                continue
            rows = []
            for name in names:
                text = commands[name].short_help  # with_global_options made it whole
                if text is None or len(text) > limit:
                    text = commands[name].get_short_help_str(limit)
                rows.append((name.ljust(width), text))  # one column across sections
            with formatter.section(title):
                formatter.write_dl(rows)

    def _load_plugin_commands(self, wanted: str | None = None) -> None:
        """Add the plugins' commands, on first use. A built-in command needs none. The
        first-party plugins are imported by name; installed plugins' entry points cost a read
        of every installed package's metadata (importlib.metadata, ~30 ms of every command),
        so they are loaded only for a command ours lack, or to list all (`--help`)."""
        from piaa_index.cli.queries import add_query_commands
        from piaa_index.plugins import Plugins

        if self._plugins is None:
            self._plugins = Plugins(load_entry_points=False)
            add_query_commands(self, self._plugins)
            self._plugins.pm.hook.register_commands(cli=self)
        if self._all_plugins_loaded or wanted in self.commands:
            return
        self._all_plugins_loaded = True
        first_party = self._plugins.pm.get_plugins()
        self._plugins.load_entry_points()
        add_query_commands(self, self._plugins)
        installed = self._plugins.pm.subset_hook_caller("register_commands", first_party)
        installed(cli=self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:  # a built-in command needs no plugin loaded
            self._load_plugin_commands(cmd_name)
        return with_global_options(super().get_command(ctx, cmd_name), cmd_name)


@click.group(cls=PiaaGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="piaa")
@_global_option_decorators
@click.pass_context
def cli(ctx: click.Context, **options: object) -> None:
    """Tag and search photo collections by what is in them.

    Index folders once, name the labels you care about, then search by them ("dog AND
    bicycle AND NOT person") or by any phrase (--text). The library lives in --home.
    """
    ctx.obj = AppContext(**options)  # type: ignore[arg-type]


def _register_builtin_commands() -> None:
    for module in (index, vocab, labels, db, models, plugins_cmd, evaluate, demo, shapes, export):
        for command in module.COMMANDS:
            cli.add_command(command)


_register_builtin_commands()


def main() -> None:
    """Entry point of the `piaa` script."""
    run_guarded(cli, sys.argv[1:])
