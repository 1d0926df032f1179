"""The CLI's expected failures, each as one line with a hint.

``message(exc)`` turns an exception into the text after ``Error: ``;
``check_database(url)`` refuses, before anything is opened, a ``--db`` that is not a
polyrec database (missing file, a directory, a CSV, another program's SQLite file), so
that no command but ``init`` creates a database by accident.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import click

from polyrec.errors import PolyrecError


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def check_database(url: str) -> None:
    """ConfigError unless ``url`` names an existing polyrec database (SQLite files are
    checked without being changed; other databases are checked when opened)."""
    from polyrec.errors import ConfigError
    path = _sqlite_path(url)
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a polyrec database; "
                          "give --db the database file")
    if not path.exists():
        raise ConfigError(f"no polyrec database at {path}; run polyrec init "
                          f"(polyrec --db {path} init)")
    try:
        con = sqlite3.connect(path, timeout=1)  # the file exists: nothing is created
        try:
            found = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                "AND name = 'meta'").fetchone()
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            return  # a busy database: opening it waits for the lock (--lock-timeout)
        raise ConfigError(f"{path} cannot be opened as a polyrec database ({exc})") from None
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{path} is not a polyrec database ({exc}); "
                          "give --db a database made by polyrec init") from None
    if found is None:
        raise ConfigError(f"{path} is not a polyrec database (it has no polyrec tables); "
                          "give --db a database made by polyrec init")


def message(exc: BaseException) -> str:
    """The one line (after ``Error: ``) for an exception, with a hint where there is one."""
    from sqlalchemy import exc as sa

    if isinstance(exc, PolyrecError):
        return str(exc)
    if isinstance(exc, sa.NoSuchModuleError):
        return (f"{exc}: unknown database URL scheme; --db takes a SQLAlchemy URL "
                "(sqlite:///file.db, postgresql://...) or a file path")
    if isinstance(exc, ModuleNotFoundError):
        name = exc.name or str(exc)
        hint = {"psycopg2": "pip install 'polyrec[postgres]'",
                "psycopg": "pip install 'polyrec[postgres]'",
                "pymysql": "pip install pymysql", "fastapi": "pip install 'polyrec[serve]'",
                "uvicorn": "pip install 'polyrec[serve]'"}.get(name.split(".")[0],
                                                               f"pip install {name.split('.')[0]}")
        return f"a required module is not installed: {name} ({hint})"
    if isinstance(exc, sa.OperationalError) and "locked" in str(exc.orig):
        return ("the database is locked by another process and stayed locked for the whole "
                "--lock-timeout; retry later or raise --lock-timeout")
    if isinstance(exc, sa.ArgumentError):
        return f"bad database URL: {exc}"
    if isinstance(exc, sa.DBAPIError):
        return (f"database error: {_first_line(exc.orig)} (check --db and that the database "
                "is a polyrec database; --debug shows the traceback)")
    if isinstance(exc, sa.SQLAlchemyError):
        return f"database error: {_first_line(exc)} (--debug shows the traceback)"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"{exc.strerror or exc}{where} (check the path and its permissions)"
    if isinstance(exc, MemoryError):
        return "out of memory (try a smaller --batch-size or fewer items at once)"
    return (f"unexpected {type(exc).__name__}: {_first_line(exc)} (a bug in polyrec or a "
            "plugin: rerun with --debug and report the traceback)")


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def fail(ctx: click.Context, exc: BaseException) -> None:
    """Print ``Error: ...`` on stderr and exit with status 1 (quietly when the reader of
    our output went away: ``polyrec ... | head``)."""
    if isinstance(exc, BrokenPipeError):
        ctx.exit(1)
    click.echo(f"Error: {message(exc)}", err=True)
    ctx.exit(1)
