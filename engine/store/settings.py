"""Key -> JSON settings in the ``settings`` table, read and written inside a caller's
session (so a read-check-write can be one transaction)."""
from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from polyrec.store.models import Setting


def get_setting(session: Session, key: str) -> Any | None:
    """The stored value of ``key`` (None when absent)."""
    row = session.get(Setting, key)
    return row.value if row is not None else None


def put_setting(session: Session, key: str, value: Any) -> None:
    """Store ``value`` under ``key``, replacing what was there."""
    row = session.get(Setting, key)
    if row is None:
        session.add(Setting(key=key, value=value))
    else:
        row.value = value
