"""Data commands: init, ingest, stats, doctor, forget-user."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from polyrec.cli.main import CliState, echo_json
from polyrec.errors import ConfigError


@click.command("init")
@click.pass_obj
def init_command(state: CliState) -> None:
    """Create (or upgrade) the database at --db."""
    eng = state.engine(create=True)
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


def _parse_map(pairs: tuple[str, ...]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for pair in pairs:
        fld, sep, col = pair.partition("=")
        if not sep or not fld.strip():
            raise ConfigError(f"--map takes FIELD=COLUMN, not '{pair}'")
        mapping[fld.strip()] = col.strip()
    return mapping


@click.command("ingest")
@click.argument("kind", type=click.Choice(["items", "users", "interactions", "kg", "links"]))
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", help="Reader name (csv, tsv, jsonl, parquet, recbole, or a "
              "plugin's); default: chosen by the file suffix.")
@click.option("--map", "maps", multiple=True, metavar="FIELD=COLUMN",
              help="Map a field onto a column (repeatable); an empty COLUMN turns the field off.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="fail: write nothing when any row is bad; skip: keep the good rows.")
@click.option("--kind", "event_kind", help="Interaction kind for rows without a kind column "
              "(default: rating when there is a rating column, else click).")
@click.option("--image-template", help="Items: image path built from columns, e.g. "
              "'images/{article_id:010d}.jpg' (kept only where the file exists).")
@click.option("--image-root", type=click.Path(file_okay=False, path_type=Path),
              help="Directory that relative image references are resolved against and "
              "that local images must lie under; recorded in the store for the admin "
              "pages and the API (default: the data file's directory).")
@click.option("--links", type=click.Path(dir_okay=False, path_type=Path),
              help="kg: also ingest this item->entity link file (RecBole .link).")
@click.option("--batch-size", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Rows per INSERT batch (all batches share one transaction).")
@click.option("--include-forgotten", is_flag=True,
              help="users/interactions: also restore rows of users removed by forget-user "
              "(left out by default).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def ingest_command(state: CliState, kind: str, path: Path, fmt: str | None, maps: tuple[str, ...],
                   on_error: str, event_kind: str | None, image_template: str | None,
                   image_root: Path | None, links: Path | None, batch_size: int,
                   include_forgotten: bool, as_json: bool) -> None:
    """Load KIND (items, users, interactions, kg or links) from the file PATH."""
    options: dict[str, Any] = {"batch_size": batch_size}
    if include_forgotten:
        options["include_forgotten"] = True
    if event_kind:
        options["interaction_kind"] = event_kind
    if image_template:
        options["image_template"] = image_template
    if image_root:
        options["image_root"] = image_root
    if links:
        if kind != "kg":
            raise ConfigError("--links goes with 'ingest kg'")
        options["links"] = links
    report = state.engine().ingest(path, kind, format=fmt, mapping=_parse_map(maps),
                                   on_error=on_error, **options)
    if as_json:
        echo_json(report.as_dict())
        return
    click.echo(report.summary())
    for rep in (report, report.links):
        if rep is not None and rep.skipped:
            for err in rep.errors:
                where = ", ".join(x for x in (err["file"], err["row"] and f"row {err['row']}",
                                              err["field"] and f"field '{err['field']}'") if x)
                click.echo(f"  skipped {where}: {err['message']}", err=True)
            if rep.skipped > len(rep.errors):
                click.echo(f"  ... and {rep.skipped - len(rep.errors):,} more bad rows", err=True)


@click.command("doctor")
@click.option("--min-interactions", type=click.IntRange(min=1), default=5, show_default=True,
              help="Flag users and items with fewer interactions than this.")
@click.option("--examples", type=click.IntRange(min=0), default=5, show_default=True,
              help="Example ids shown per check.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def doctor_command(state: CliState, min_interactions: int, examples: int, as_json: bool) -> None:
    """Data quality report: missing text or images, duplicates, orphans, sparse users/items."""
    report = state.engine().doctor(min_interactions=min_interactions, examples=examples)
    if as_json:
        echo_json(report)
        return
    counts = report["counts"]
    click.echo(f"{counts['items']:,} items, {counts['users']:,} users, "
               f"{counts['interactions']:,} interactions, {counts['linked_items']:,} items linked "
               "to the knowledge graph")
    if report["sparsity"] is not None:
        click.echo(f"sparsity {report['sparsity']:.4%} ({counts['user_item_pairs']:,} user-item "
                   "pairs)")
    for name, check in report["checks"].items():
        shown = ", ".join(str(e) for e in check["examples"])
        click.echo(f"  {name:<30} {check['count']:>8,}" + (f"  e.g. {shown}" if shown else ""))
    for enc in report.get("encoders", []):
        weights = {True: ", pretrained weights", False: ", NO pretrained weights",
                   None: ""}[enc["pretrained"]]
        chosen = f" (instead of {enc['instead_of']}: {enc['reason']})" if enc["instead_of"] else ""
        click.echo(f"{enc['modality']} encoder: {enc['encoder']}{weights}{chosen}")
    if report["warnings"]:
        click.echo("warnings:")
        for line in report["warnings"]:
            click.echo(f"  - {line}")
    else:
        click.echo("no problems found")


@click.command("forget-user")
@click.argument("user")
@click.option("--no-tombstone", is_flag=True,
              help="Record no tombstone: a later ingestion of an old file brings them back.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def forget_user_command(state: CliState, user: str, no_tombstone: bool, as_json: bool) -> None:
    """Remove USER: their interactions, online state and experiment assignments, in one
    transaction; a tombstone keeps old files from bringing them back."""
    report = state.engine().forget_user(user, tombstone=not no_tombstone)
    if as_json:
        echo_json(report)
        return
    click.echo(f"Forgot user {user!r}: {report['interactions']:,} interactions, "
               f"{report['user_states']:,} online states, {report['experiment_assignments']:,} "
               "experiment assignments removed" + ("; tombstone recorded" if report["tombstone"]
                                                   else ""))


COMMANDS = [init_command, ingest_command, stats_command, doctor_command, forget_user_command]
