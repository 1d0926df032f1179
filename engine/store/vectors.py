"""Item vectors in the store: compact blobs (float16 by default), loaded as float32 matrices."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from polyrec.store.catalog import _insert
from polyrec.errors import ConfigError
from polyrec.store import vector_cache
from polyrec.store.models import ItemVector, Meta
from polyrec.store.tokens import renew_token

DTYPES = {"float16": np.float16, "float32": np.float32}
#: ``meta`` key prefix of an encoder's written token (:func:`mark_written`)
WRITTEN_PREFIX = "vectors.written:"
_NAME_CHARS = 64 - len(WRITTEN_PREFIX)  # meta.key is 64 characters


def save_vectors(session: Session, encoder: str, fingerprint: str,
                 rows: Sequence[tuple[int, str]], vectors: torch.Tensor,
                 dtype: str = "float16") -> int:
    """Store ``vectors[k]`` for item ``rows[k][0]`` with content hash ``rows[k][1]``,
    replacing that item's earlier vector of this encoder."""
    if dtype not in DTYPES:
        raise ConfigError(f"vector dtype must be one of {sorted(DTYPES)}, not '{dtype}'")
    if len(rows) != vectors.shape[0]:
        raise ValueError(f"{len(rows)} rows but {vectors.shape[0]} vectors")
    if not rows:
        return 0
    array = vectors.detach().float().cpu().numpy().astype(DTYPES[dtype])
    dim = int(array.shape[1])
    stamp = time.time()  # a rewrite is dated too, so readers can tell vectors changed
    payload = [{"item_id": int(item), "encoder": encoder, "fingerprint": fingerprint,
                "content_hash": chash, "dtype": dtype, "dim": dim, "vector": array[k].tobytes(),
                "created_at": stamp}
               for k, (item, chash) in enumerate(rows)]
    stmt = _insert(session, ItemVector.__table__)
    stmt = stmt.on_conflict_do_update(
        index_elements=["item_id", "encoder"],
        set_={c: stmt.excluded[c] for c in ("fingerprint", "content_hash", "dtype", "dim", "vector",
                                               "created_at")})
    session.execute(stmt, payload)
    mark_written(session, encoder)
    return len(payload)


def mark_written(session: Session, encoder: str) -> None:
    """A new written token for ``encoder``'s vectors in ``session``'s transaction: other
    processes learn that its vectors changed, also when one was rewritten in place (which
    keeps the count and the newest id they compare)."""
    renew_token(session, WRITTEN_PREFIX + encoder[:_NAME_CHARS])


def written_token(tokens: dict[str, str], encoder: str) -> str | None:
    """``encoder``'s token in what :func:`written_tokens` read (None: never marked)."""
    return tokens.get(encoder[:_NAME_CHARS])


def written_tokens(session: Session) -> dict[str, str]:
    """Every encoder's written token (:func:`mark_written`), by encoder name."""
    rows = session.execute(select(Meta.key, Meta.value)
                           .where(Meta.key.startswith(WRITTEN_PREFIX, autoescape=True)))
    return {key[len(WRITTEN_PREFIX):]: value for key, value in rows}


def cached_keys(session: Session, encoder: str) -> dict[int, tuple[str, str]]:
    """item id -> (fingerprint, content hash) of the vectors stored for ``encoder``."""
    rows = session.execute(select(ItemVector.item_id, ItemVector.fingerprint, ItemVector.content_hash)
                           .where(ItemVector.encoder == encoder))
    return {item: (fp, ch) for item, fp, ch in rows}


def delete_vectors(session: Session, encoder: str, item_ids: Sequence[int]) -> None:
    """Remove this encoder's vectors of the given items (e.g. an image that disappeared)."""
    for start in range(0, len(item_ids), 900):
        session.execute(delete(ItemVector).where(ItemVector.encoder == encoder)
                        .where(ItemVector.item_id.in_(list(item_ids[start:start + 900]))))
    if item_ids:
        mark_written(session, encoder)


def stored_signature(session: Session, encoder: str) -> tuple | None:
    """(count, newest id, newest write time, min and max width) of ``encoder``'s stored
    vectors: any vector added, deleted or rewritten in place changes it. None when the
    encoder has none."""
    stats = tuple(session.execute(
        select(func.count(), func.max(ItemVector.id), func.max(ItemVector.created_at),
               func.min(ItemVector.dim), func.max(ItemVector.dim))
        .where(ItemVector.encoder == encoder)).one())
    return stats if stats[0] else None


def signature_key(encoder: str, signature: tuple) -> str:
    """The digest naming ``encoder``'s vectors with this :func:`stored_signature`."""
    return vector_cache.cache_key(f"stored:{encoder}", signature, None)


def load_vectors(session: Session, encoder: str, *, directory: Path | None = None,
                 signature: tuple | None = None) -> tuple[list[int], torch.Tensor]:
    """(item ids ascending, float32 matrix [n, dim]) of everything stored for ``encoder``.

    With ``directory`` (``vector_cache.index_directory`` of the store) the matrix is
    also saved there, and read from there while the encoder's rows are unchanged
    (:func:`stored_signature`; pass it when already read, in the same snapshot): a fresh
    process maps one file instead of reading a blob per item (milliseconds instead of
    minutes at a million items)."""
    if directory is None:
        return _read_vectors(session, encoder)
    stats = signature if signature is not None else stored_signature(session, encoder)
    if not stats:
        return [], torch.empty(0, 0)
    key = signature_key(encoder, stats)
    name = f"stored-{encoder}"
    found = vector_cache.load_matrix(directory, name, key)
    if found is not None:
        return found
    ids, matrix = _read_vectors(session, encoder)
    vector_cache.save_matrix(directory, name, key, ids, matrix)
    return ids, matrix


def _read_vectors(session: Session, encoder: str) -> tuple[list[int], torch.Tensor]:
    rows = session.execute(select(ItemVector.item_id, ItemVector.dtype, ItemVector.dim,
                                  ItemVector.vector).where(ItemVector.encoder == encoder)
                           .order_by(ItemVector.item_id)).all()
    if not rows:
        return [], torch.empty(0, 0)
    dim = rows[0][2]
    out = np.empty((len(rows), dim), dtype=np.float32)
    for k, (_, dtype, d, blob) in enumerate(rows):
        if d != dim:
            raise ConfigError(f"encoder '{encoder}' has vectors of widths {dim} and {d}; re-encode with --force")
        out[k] = np.frombuffer(blob, dtype=DTYPES[dtype])
    return [r[0] for r in rows], torch.from_numpy(out)
