"""``polyrec items``: the catalogue's lifecycle (retire, restore, list); see docs/data.md
("Retiring items")."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import click

from polyrec.cli.main import CliState, echo_json
from polyrec.errors import ConfigError


@click.group("items")
def items_group() -> None:
    """Retire items that are sold out or discontinued, bring them back, list them.
    A retired item keeps its history (it still trains models) but is never
    recommended, found by search or shown as a similar item; every process serving
    the store sees the change within its refresh delay, without a retrain."""


def _ids(ids: tuple[str, ...], path: Path | None) -> list[str]:
    """The ids given as arguments and, with --file, one a line of PATH (blank lines and
    '#' comments skipped)."""
    out = list(ids)
    if path is not None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the id file: {exc}") from None
        out += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise ConfigError("name at least one item id (ID... or --file FILE)")
    return out


def _change(state: CliState, ids: tuple[str, ...], path: Path | None, as_json: bool,
            retire: bool) -> None:
    engine = state.engine()
    wanted = _ids(ids, path)
    report = engine.retire_items(wanted) if retire else engine.restore_items(wanted)
    if as_json:
        echo_json(report.as_dict())
    else:
        click.echo(report.summary())


_FILE = click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path),
                     help="Also the ids in this file, one a line ('#' comments allowed).")
_JSON = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")


@items_group.command("retire")
@click.argument("ids", nargs=-1)
@_FILE
@_JSON
@click.pass_obj
def retire_command(state: CliState, ids: tuple[str, ...], path: Path | None,
                   as_json: bool) -> None:
    """Retire the items IDS (external ids): never served again until restored. An
    unknown id retires nothing and is named; an item retired already is left as it is.
    Re-ingesting an items file does not restore them (only an 'active' column does)."""
    _change(state, ids, path, as_json, retire=True)


@items_group.command("restore")
@click.argument("ids", nargs=-1)
@_FILE
@_JSON
@click.pass_obj
def restore_command(state: CliState, ids: tuple[str, ...], path: Path | None,
                    as_json: bool) -> None:
    """Serve the retired items IDS again. An unknown id restores nothing and is named."""
    _change(state, ids, path, as_json, retire=False)


@items_group.command("list")
@click.option("--retired", "which", flag_value="retired",
              help="Only the retired items, newest retirement first.")
@click.option("--live", "which", flag_value="live", help="Only the live items.")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True,
              help="At most this many (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_command(state: CliState, which: str | None, limit: int, as_json: bool) -> None:
    """List items with their state (live or retired since when)."""
    retired = {"retired": True, "live": False}.get(which or "")
    rows = state.engine().list_items(retired=retired, limit=limit or None)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo({"retired": "no retired items", "live": "no live items"}.get(which or "",
                                                                             "no items"))
    for row in rows:
        when = ("live" if row["retired_at"] is None else "retired " + datetime.fromtimestamp(
            row["retired_at"], timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        click.echo(f"{row['item']}\t{when}\t{row['title'] or ''}")


COMMANDS = [items_group]
