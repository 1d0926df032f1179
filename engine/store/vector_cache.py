"""Stored item vectors as one matrix file on disk, so a fresh process reads a file
instead of a million SQLite blobs.

Reading every vector of an encoder from the store decodes one row per item (20 to 25 s
for 1M items on two CPU cores); the same matrix saved as ``.npy`` loads in about a
second. Files are named by a digest of the store's signature of the vectors (count,
newest row, fingerprint, dimension, the items' signature) and of the newest
``created_at`` of the encoder's rows, which a vector rewritten in place moves (the
store stamps every write), so a file is never read for other vectors. Where the files
live: ``POLYREC_INDEX_DIR``, else a folder beside a SQLite database file
(``<db>.polyrec-index/``); for other databases (in-memory SQLite, PostgreSQL) nothing
is persisted unless ``POLYREC_INDEX_DIR`` is set.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from polyrec.store.models import ItemVector

log = logging.getLogger("polyrec.search")

#: names a folder for persisted matrices and indexes (overrides the default place)
ENV = "POLYREC_INDEX_DIR"


def index_directory(url: str) -> Path | None:
    """Where persisted matrices and indexes of the store at ``url`` live (None: nowhere)."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or \
            parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return None
    db = Path(parsed.database).expanduser()
    return db.parent / f"{db.name}.polyrec-index"

#: at most this many matrix files of one encoder are kept (older ones are removed)
KEEP = 2


def newest_write(session: Any, encoder: str) -> float | None:
    """The latest ``created_at`` of ``encoder``'s stored vectors (moves on a rewrite)."""
    return session.execute(select(func.max(ItemVector.created_at))
                           .where(ItemVector.encoder == encoder)).scalar_one()


def cache_key(encoder: str, signature: Sequence[Any], newest: float | None) -> str:
    text = f"{encoder}|{tuple(signature)!r}|{newest!r}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _safe(encoder: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in encoder)


def load_matrix(directory: Path, encoder: str, key: str) -> tuple[list[int], torch.Tensor] | None:
    """(item ids, float32 matrix) saved under ``key``; None when absent or unreadable."""
    path = directory / f"vectors-{_safe(encoder)}-{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path) as saved:
            ids, matrix = saved["ids"], saved["matrix"]
    except Exception as exc:  # noqa: BLE001 - a broken file is rebuilt from the store
        log.warning("vector cache %s unreadable (%s): reading the store", path, exc)
        return None
    return ids.tolist(), torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))


def save_matrix(directory: Path, encoder: str, key: str, ids: Sequence[int],
                matrix: torch.Tensor) -> None:
    """Save atomically (temporary file, then rename); keep the ``KEEP`` newest files of
    the encoder. Failure to write (read-only place) is logged, never raised."""
    path = directory / f"vectors-{_safe(encoder)}-{key}.npz"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, ids=np.asarray(ids, dtype=np.int64),
                     matrix=matrix.detach().float().cpu().numpy())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not save the vector cache %s: %s", path, exc)
        return
    old = sorted(directory.glob(f"vectors-{_safe(encoder)}-*.npz"),
                 key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in old[KEEP:]:
        stale.unlink(missing_ok=True)
