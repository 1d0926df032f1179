"""The migrate command: bring a database (SQLite or PostgreSQL) to this polyrec's schema."""
from __future__ import annotations

import click

from polyrec.cli.errors import check_database
from polyrec.cli.main import CliState, echo_json
from polyrec.errors import ConfigError
from polyrec.store import SCHEMA_VERSION, Store, normalize_url


@click.command("migrate")
@click.option("--check", is_flag=True,
              help="Change nothing: exit 1 when the database needs an upgrade, else 0.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def migrate_command(state: CliState, check: bool, as_json: bool) -> None:
    """Upgrade the database at --db to the latest schema version (SQLite or PostgreSQL).

    Every command upgrades the database it opens; migrate does it on purpose, says what
    it did, and with --check only says whether it is needed (for a deploy step before
    several serving processes start). On PostgreSQL with pgvector it also builds the
    pgvector table and HNSW index of every encoder with stored vectors that has none
    yet, so that no search has to (POLYREC_PGVECTOR=off: not); --check lists them."""
    url = normalize_url(state.db)
    check_database(url)
    store = Store(url, lock_timeout=state.lock_timeout, upgrade=False)
    try:
        found = store.previous_version
        backend = store.engine.dialect.name
        if found is None:
            raise ConfigError(f"{store.engine.url.render_as_string(hide_password=True)} is not "
                              "a polyrec database (no schema version); run polyrec init")
        if found > SCHEMA_VERSION:
            raise ConfigError(f"the database has schema version {found}, newer than this "
                              f"polyrec understands ({SCHEMA_VERSION}); upgrade polyrec")
        if not check and found < SCHEMA_VERSION:
            from polyrec.store.migrations import upgrade
            upgrade(store.engine)
        from polyrec.store import pgvector
        if check:
            tables = [{"encoder": e, "dim": d, "table": None, "built": False}
                      for e, d in pgvector.missing_tables(store)]
        else:  # PostgreSQL with pgvector: dense search's tables ready before serving
            tables = pgvector.build_tables(store, progress=state.progress)
    finally:
        store.close()
    needed = found < SCHEMA_VERSION
    report = {"backend": backend, "from_version": found,
              "to_version": found if check else max(found, SCHEMA_VERSION),
              "latest": SCHEMA_VERSION, "upgraded": needed and not check}
    if tables:  # pgvector tables built (or, with --check, missing)
        report["pgvector"] = tables
    if as_json:
        echo_json(report)
    elif not needed:
        click.echo(f"schema version {found} ({backend}): up to date")
    elif check:
        click.echo(f"schema version {found} ({backend}): needs an upgrade to {SCHEMA_VERSION} "
                   "(run polyrec migrate)")
    else:
        click.echo(f"schema version {found} -> {SCHEMA_VERSION} ({backend}): upgraded")
    for t in [] if as_json else tables:
        if check:
            click.echo(f"pgvector: no table yet for {t['encoder']} ({t['dim']}); "
                       "polyrec migrate builds it")
        elif t["table"] is None:
            click.echo(f"pgvector: table for {t['encoder']} ({t['dim']}) could not be built "
                       "(see the log); dense search stays in the process")
        elif t["built"]:
            click.echo(f"pgvector: built {t['table']} for {t['encoder']} ({t['dim']}) in "
                       f"{t['seconds']:.1f}s")
    if check and needed:
        raise click.exceptions.Exit(1)


COMMANDS = [migrate_command]
