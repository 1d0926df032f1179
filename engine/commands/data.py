"""Data commands: init, stats (ingest and doctor are added here too)."""
from __future__ import annotations

import click

from engine.cli import CliState, echo_json


@click.command("init")
@click.pass_obj
def init_command(state: CliState) -> None:
    """Create (or upgrade) the database at --db."""
    eng = state.engine()
    click.echo(f"Database ready: {eng.url} (schema version {eng.store_schema_version})")


@click.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def stats_command(state: CliState, as_json: bool) -> None:
    """Counts by table and interactions by kind."""
    stats = state.engine().stats()
    if as_json:
        echo_json(stats)
        return
    for key, value in stats.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k:<20} {v:>10,}")
        else:
            click.echo(f"{key:<22} {value:>10,}")


COMMANDS = [init_command, stats_command]
