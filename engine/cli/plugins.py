"""``polyrec plugins``: which plugins are loaded, their versions, hooks and components."""
from __future__ import annotations

import os

import click

from polyrec.cli.main import CliState, echo_json
from polyrec.plugin_host import ENV_LOAD_PLUGINS


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def plugins_command(state: CliState, as_json: bool) -> None:
    """List plugins with version, hooks and what each registered, and load errors.

    Built-in plugins come first, then installed ones (entry-point group 'polyrec'),
    limited by the POLYREC_LOAD_PLUGINS environment variable (comma list; empty: none).
    """
    from polyrec.plugin_host import PluginHost
    records = [r.as_dict() for r in PluginHost().describe()]  # no database needed
    if as_json:
        echo_json(records)
        return
    limit = os.environ.get(ENV_LOAD_PLUGINS)
    if limit is not None:
        click.echo(f"{ENV_LOAD_PLUGINS}={limit!r}: only these installed plugins load")
    if not records:
        click.echo("No plugins loaded.")
    for r in records:
        origin = r["source"] if not r["distribution"] or r["source"] == "builtin" \
            else f"{r['source']}, {r['distribution']}"
        click.echo(f"{r['name']} {r['version'] or '-'} ({origin})")
        if r["error"]:
            click.echo(f"  ERROR: {r['error']}")
            continue
        click.echo(f"  hooks: {', '.join(r['hooks']) or '-'}")
        for kind, names in r["registered"].items():
            click.echo(f"  {kind}: {', '.join(names)}")


COMMANDS = [plugins_command]
