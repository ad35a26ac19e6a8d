"""`piaa plugins`: what loaded, and which hooks each plugin implements."""

from __future__ import annotations

import click

from piaa_index.cli.common import echo_json


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True)
def plugins_command(as_json: bool) -> None:
    """List loaded plugins with their hooks, queries and exporters."""
    from piaa_index.plugins import Plugins

    plugins = Plugins()
    described = plugins.describe()
    queries = sorted(plugins.queries)
    exporters = sorted(plugins.exporters)
    if as_json:
        echo_json({"plugins": described, "queries": queries, "exporters": exporters})
        return
    for plugin in described:
        if plugin.get("error"):
            click.echo(f"{plugin['name']}: FAILED TO LOAD: {plugin['error']}")
        else:
            click.echo(f"{plugin['name']} ({plugin['module']}): {', '.join(plugin['hooks'])}")
    click.echo(f"queries: {', '.join(queries)}")
    click.echo(f"exporters: {', '.join(exporters)}")


COMMANDS = [plugins_command]
