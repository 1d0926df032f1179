"""``polyrec plugins``: which plugins are loaded, their versions, hooks and components."""
from __future__ import annotations

import click

from engine.cli import CliState, echo_json


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def plugins_command(state: CliState, as_json: bool) -> None:
    """List installed plugins with version, hooks and what each registered."""
    records = [r.as_dict() for r in state.engine().plugins.describe()]
    if as_json:
        echo_json(records)
        return
    for r in records:
        version = r["version"] or "-"
        click.echo(f"{r['name']} {version} ({r['source']})")
        if r["error"]:
            click.echo(f"  FAILED TO LOAD: {r['error']}")
            continue
        click.echo(f"  hooks: {', '.join(r['hooks']) or '-'}")
        for kind, names in r["registered"].items():
            click.echo(f"  {kind}: {', '.join(names)}")


COMMANDS = [plugins_command]
