"""The store: SQLAlchemy engine and sessions over any database URL (SQLite by default)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from polyrec.store import models
from polyrec.store.migrations import SCHEMA_VERSION, stored_version
from polyrec.store.migrations import upgrade as run_upgrade

DEFAULT_URL = "sqlite:///polyrec.db"
#: Seconds a SQLite connection keeps retrying a locked database (SQLite's busy handler
#: sleeps with growing delays between tries) before "database is locked" is raised.
DEFAULT_LOCK_TIMEOUT = 30.0

__all__ = ["Store", "DEFAULT_URL", "DEFAULT_LOCK_TIMEOUT", "SCHEMA_VERSION", "models", "normalize_url"]


def normalize_url(url: str | Path | None) -> str:
    """Accept a SQLAlchemy URL or a plain file path (taken as a SQLite file). A
    ``postgresql://`` URL without a driver uses psycopg 3 (the extra ``postgres``) when
    SQLAlchemy's default driver, psycopg2, is not installed."""
    if url is None:
        return DEFAULT_URL
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")) and _use_psycopg3():
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser()}"


def _use_psycopg3() -> bool:
    from importlib.util import find_spec
    return find_spec("psycopg2") is None and find_spec("psycopg") is not None


def _sqlite_pragmas(lock_timeout: float):  # type: ignore[no-untyped-def]
    def on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(lock_timeout * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()
    return on_connect


_WROTE = "polyrec_wrote"
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


def _note_write(conn, _cursor, statement, _params, _context, _many) -> None:  # type: ignore[no-untyped-def]
    """Mark the connection's transaction as one that wrote (read by ``Store.session``)."""
    if statement.lstrip()[:7].upper().startswith(_WRITES):
        conn.info[_WROTE] = True


class Store:
    """Owns one SQLAlchemy engine and session factory; upgrades the schema on open."""

    def __init__(self, url: str | Path | None = None, *,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT, upgrade: bool = True) -> None:
        """``lock_timeout``: seconds to keep retrying a database another process holds
        locked (SQLite), then "database is locked". ``upgrade=False`` opens the database
        as it is (``polyrec migrate --check``): ``previous_version`` is then its version."""
        self.url = normalize_url(url)
        self.lock_timeout = float(lock_timeout)
        parsed = make_url(self.url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": self.lock_timeout}
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            else:  # one shared connection, or every session would see a new empty database
                kwargs["poolclass"] = StaticPool
        #: one connection shared by every session (in-memory SQLite): no isolation possible
        self.shared_connection = kwargs.get("poolclass") is StaticPool
        self.engine: SAEngine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas(self.lock_timeout))
        event.listen(self.engine, "after_cursor_execute", _note_write)
        self.previous_version = (run_upgrade(self.engine) if upgrade
                                 else stored_version(self.engine))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        #: committed transactions that wrote through this Store (``session()``,
        #: ``written()``): readers that cache what they read (the Recommender) check the
        #: database again when it moved, so this process always reads its own writes
        self.writes = 0

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error.

        For writes. On SQLite its SELECTs before the first write are not isolated from
        other writers; reads that must agree with each other use :meth:`snapshot`."""
        with self._sessions.begin() as session:
            yield session
            wrote = session.connection().info.pop(_WROTE, False)
        if wrote:  # counted once committed: a reader never sees the count before the rows
            self.written()

    def written(self) -> None:
        """Note a committed write (called by ``session()``; by code that writes through
        ``engine.begin()`` itself after its commit)."""
        self.writes += 1

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read-only session whose every SELECT sees one snapshot of the database.

        ``session()`` reads in autocommit mode on SQLite (the driver begins a transaction
        only before the first write), so two SELECTs may see different data when a writer
        commits between them. Here the reads run in one transaction: a deferred ``BEGIN``
        on SQLite (in WAL mode the read snapshot is fixed at the first SELECT and kept until
        the end; writers are never blocked), REPEATABLE READ elsewhere (PostgreSQL). The
        transaction is rolled back at the end: nothing written here is kept. With one
        shared in-memory connection (``:memory:``) there is no isolation to be had, and
        this is a plain session.
        """
        with self.engine.connect() as conn:
            if not self.is_sqlite:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            elif not self.shared_connection:
                conn.exec_driver_sql("BEGIN")
            session = Session(bind=conn, autoflush=False, expire_on_commit=False)
            try:
                yield session
            finally:
                session.close()
                conn.rollback()

    def close(self) -> None:
        self.engine.dispose()
