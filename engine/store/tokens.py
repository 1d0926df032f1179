"""Change tokens in the ``meta`` table: a value renewed in the transaction of a change, so
that other processes, which compare it, learn that something changed that counts and
newest ids do not show (items retired or restored, vectors rewritten in place)."""
from __future__ import annotations

import time
import uuid

from sqlalchemy.orm import Session

from polyrec.store.models import Meta


def renew_token(session: Session, key: str) -> str:
    """Write a new token under ``key`` in ``session``'s transaction; returns it."""
    from polyrec.store.catalog import dialect_insert
    token = f"{time.time():.6f}-{uuid.uuid4().hex[:12]}"
    stmt = dialect_insert(session, Meta.__table__)
    session.execute(stmt.on_conflict_do_update(index_elements=["key"],
                                               set_={"value": stmt.excluded.value}),
                    [{"key": key, "value": token}])
    return token
