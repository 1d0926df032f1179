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
from polyrec.store.migrations import SCHEMA_VERSION, upgrade

DEFAULT_URL = "sqlite:///polyrec.db"

__all__ = ["Store", "DEFAULT_URL", "SCHEMA_VERSION", "models", "normalize_url"]


def normalize_url(url: str | Path | None) -> str:
    """Accept a SQLAlchemy URL or a plain file path (taken as a SQLite file)."""
    if url is None:
        return DEFAULT_URL
    text = str(url)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser()}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class Store:
    """Owns one SQLAlchemy engine and session factory; upgrades the schema on open."""

    def __init__(self, url: str | Path | None = None) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            else:  # one shared connection, or every session would see a new empty database
                kwargs["poolclass"] = StaticPool
        self.engine: SAEngine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.previous_version = upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()
