"""Helpers for SQLite database files (the default store)."""
from __future__ import annotations

import sqlite3
from pathlib import Path


def checkpoint(db: str | Path) -> None:
    """Fold the WAL into the main file, so the database is one complete file (to copy it,
    or to read it from another process without the -wal file)."""
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
