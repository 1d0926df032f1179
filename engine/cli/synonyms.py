"""``polyrec synonyms``: the shop's own search synonyms (import, list, clear, try); see
docs/search.md ("The shop's synonyms")."""
from __future__ import annotations

import click

from polyrec.cli.main import CliState, echo_json


@click.group("synonyms")
def synonyms_group() -> None:
    """Words of your shoppers that search should read as your catalogue's words
    (plaid => check). Stored in the database; every process uses them from its next
    search."""


@synonyms_group.command("import")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--append", is_flag=True,
              help="Add the file's rules to the stored ones instead of replacing them.")
@click.pass_obj
def import_command(state: CliState, path: str, append: bool) -> None:
    """Store the rules of PATH (one a line: 'plaid, tartan => check'; '#' comments).
    A bad line stores nothing and names the line."""
    from polyrec.retrieve.synonyms import Synonyms
    engine = state.engine()
    rules = Synonyms.read(path)
    if append:
        rules = Synonyms([*engine.synonyms().rules, *rules.rules])
    count = engine.set_synonyms(rules, source=path)
    click.echo(f"{count} synonym rule(s) stored" + (" (appended)" if append else ""))


@synonyms_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_command(state: CliState, as_json: bool) -> None:
    """Print the stored rules."""
    found = state.engine().synonyms()
    if as_json:
        echo_json(found.as_json())
        return
    if not len(found):
        click.echo("no synonyms (polyrec synonyms import FILE)")
    for rule in found.rules:
        click.echo(rule.as_text())


@synonyms_group.command("clear")
@click.pass_obj
def clear_command(state: CliState) -> None:
    """Remove every stored rule."""
    state.engine().set_synonyms(None)
    click.echo("synonyms cleared")


@synonyms_group.command("try")
@click.argument("query")
@click.pass_obj
def try_command(state: CliState, query: str) -> None:
    """Show how the stored rules rewrite QUERY (search reads the rewritten text)."""
    rewritten, applied = state.engine().synonyms().rewrite(query)
    for phrase, replacement in applied.items():
        click.echo(f"{phrase} -> {replacement}")
    click.echo(f"search reads: {rewritten}")


COMMANDS = [synonyms_group]
