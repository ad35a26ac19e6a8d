"""The `piaa` command: a thin layer over `piaa_index.library.Library`.

Sub-command modules are imported when the group is built, but they import torch, open_clip
and faiss only inside command bodies, so `piaa --help` stays instant.
"""

from __future__ import annotations

import sys

import click

from piaa_index import __version__
from piaa_index.cli.common import AppContext, run_guarded


class PiaaGroup(click.Group):
    """Adds the commands that plugins register (queries and arbitrary commands) on first use."""

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
        return super().get_command(ctx, cmd_name)


@click.group(cls=PiaaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="piaa")
@click.option(
    "--home",
    envvar="PIAA_HOME",
    type=click.Path(file_okay=False),
    help="Data folder (SQLite database, vectors). Env: PIAA_HOME.",
)
@click.option(
    "--db", envvar="PIAA_DB", help="SQLAlchemy URL, e.g. postgresql://host/db. Env: PIAA_DB."
)
@click.option(
    "--model",
    envvar="PIAA_MODEL",
    help="open_clip model name, `shapesworld`, or a model-config JSON. Env: PIAA_MODEL. "
    "[default: ViT-B-16]",
)
@click.option(
    "--pretrained",
    envvar="PIAA_PRETRAINED",
    help="Weights: an open_clip tag (downloaded on first use), a checkpoint file, or `none`. "
    "Env: PIAA_PRETRAINED. [default: openai for ViT-B-16, the shipped file for shapesworld]",
)
@click.option(
    "--front-end",
    envvar="PIAA_FRONT_END",
    type=click.Choice(["clip", "sclip"]),
    help="Patch front-end. [default: sclip; clip for shapesworld]",
)
@click.option(
    "--device",
    envvar="PIAA_DEVICE",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Env: PIAA_DEVICE.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def cli(ctx: click.Context, **options: object) -> None:
    """Tag and search photo collections by what is in them.

    \b
    Quick start:
      piaa index ~/Pictures
      piaa vocab set dog bicycle person
      piaa search "dog AND bicycle AND NOT person"
    """
    ctx.obj = AppContext(**options)  # type: ignore[arg-type]


def _register_builtin_commands() -> None:
    from piaa_index.cli import db, demo, evaluate, export, index, plugins_cmd, shapes, vocab

    for module in (index, vocab, db, plugins_cmd, evaluate, demo, shapes, export):
        for command in module.COMMANDS:
            cli.add_command(command)


_register_builtin_commands()


def main() -> None:
    """Entry point of the `piaa` script."""
    run_guarded(cli, sys.argv[1:])
