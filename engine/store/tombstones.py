"""Tombstones of forgotten users (engine/feedback/forget.py writes them, file ingestion
reads them): the SHA-256 of the external id, never the id itself."""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Iterable

from sqlalchemy import delete, select

from polyrec.store.models import ForgottenUser

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.orm import Session

_CHUNK = 900  # stay under SQLite's bound-parameter limit


def id_hash(external_id: str) -> str:
    """The tombstone key of an external id."""
    return hashlib.sha256(str(external_id).encode("utf-8")).hexdigest()


def forgotten(session: "Session", external_ids: Iterable[str]) -> set[str]:
    """The external ids among ``external_ids`` that have a tombstone."""
    by_hash = {id_hash(e): e for e in set(external_ids)}
    found: set[str] = set()
    keys = list(by_hash)
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start:start + _CHUNK]
        found.update(by_hash[h] for h in session.execute(
            select(ForgottenUser.id_hash).where(ForgottenUser.id_hash.in_(chunk))).scalars())
    return found


def lift(session: "Session", external_ids: Iterable[str]) -> None:
    """Remove the tombstones of ``external_ids`` (they are being restored on purpose)."""
    hashes = [id_hash(e) for e in set(external_ids)]
    for start in range(0, len(hashes), _CHUNK):
        session.execute(delete(ForgottenUser).where(
            ForgottenUser.id_hash.in_(hashes[start:start + _CHUNK])))
