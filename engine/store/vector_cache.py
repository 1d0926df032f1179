"""Stored item vectors as one matrix file on disk, so a fresh process reads a file
instead of a million SQLite blobs.

Reading every vector of an encoder from the store decodes one row per item (20 to 25 s
for 1M items on two CPU cores); the same matrix saved as ``.npy`` and memory-mapped
opens in milliseconds (pages are read as they are used). Files are named by a digest of
the store's signature of the vectors (count, newest row, fingerprint, dimension, the
items' signature) and of the newest ``created_at`` of the encoder's rows, which a
vector rewritten in place moves (the store stamps every write), so a file is never read
for other vectors. The same mechanism (:func:`save_arrays` / :func:`load_arrays`) keeps
other derived arrays, such as a ranker's retrieval keys (polyrec.rank.retrieval).
Where the files live: ``POLYREC_INDEX_DIR``, else a folder beside a SQLite database
file (``<db>.polyrec-index/``); for other databases (in-memory SQLite, PostgreSQL)
nothing is persisted unless ``POLYREC_INDEX_DIR`` is set.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

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


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(temporary path)`` on a file beside it, then rename
    it into place: a reader never sees half a file. OSError goes to the caller."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def beyond_newest(paths: Iterable[Path], keep: int) -> list[Path]:
    """The ``paths`` that are not among the ``keep`` newest by modification time; a path
    gone meanwhile (another thread or process cleaning up the same folder) is skipped."""
    dated: list[tuple[float, Path]] = []
    for path in paths:
        try:
            dated.append((path.stat().st_mtime, path))
        except FileNotFoundError:
            continue
    dated.sort(key=lambda pair: pair[0], reverse=True)
    return [path for _, path in dated[keep:]]


def newest_write(session: Any, encoder: str) -> float | None:
    """The latest ``created_at`` of ``encoder``'s stored vectors (moves on a rewrite)."""
    return session.execute(select(func.max(ItemVector.created_at))
                           .where(ItemVector.encoder == encoder)).scalar_one()


def cache_key(encoder: str, signature: Sequence[Any], newest: float | None) -> str:
    text = f"{encoder}|{tuple(signature)!r}|{newest!r}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _safe(encoder: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in encoder)


def _path(directory: Path, stem: str, key: str, part: str) -> Path:
    return directory / f"{_safe(stem)}-{key}.{part}.npy"


def load_arrays(directory: Path, stem: str, key: str, parts: Sequence[str]
                ) -> dict[str, np.ndarray] | None:
    """The arrays saved by :func:`save_arrays` under ``stem`` and ``key``, memory-mapped
    copy-on-write (pages are read when touched, writes stay private to the process);
    None when one is absent or unreadable."""
    paths = {part: _path(directory, stem, key, part) for part in parts}
    if not all(p.exists() for p in paths.values()):
        return None
    try:
        return {part: np.load(p, mmap_mode="c") for part, p in paths.items()}
    except Exception as exc:  # noqa: BLE001 - a broken file is rebuilt by the caller
        log.warning("cached arrays %s unreadable (%s): rebuilding", paths, exc)
        return None


def save_arrays(directory: Path, stem: str, key: str, arrays: dict[str, np.ndarray],
                keep: int = KEEP) -> None:
    """Save each array as ``<stem>-<key>.<part>.npy`` atomically (temporary file, then
    rename); keep the ``keep`` newest keys of ``stem``. Failure to write (read-only
    place, full disk) is logged, never raised."""
    def npy(array: np.ndarray) -> Callable[[Path], None]:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(array))
        return write

    try:
        for part, array in arrays.items():
            write_atomically(_path(directory, stem, key, part), npy(array))
    except OSError as exc:
        log.warning("could not save %s-%s in %s: %s", stem, key, directory, exc)
        return
    first = next(iter(arrays))
    try:  # several threads or processes may clean up the same folder at once
        for stale in beyond_newest(directory.glob(f"{_safe(stem)}-*.{first}.npy"), keep):
            stale_key = stale.name[len(_safe(stem)) + 1:-len(f".{first}.npy")]
            for part in arrays:
                _path(directory, stem, stale_key, part).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove old %s files in %s: %s", stem, directory, exc)


def load_matrix(directory: Path, encoder: str, key: str) -> tuple[list[int], torch.Tensor] | None:
    """(item ids, float32 matrix) saved under ``key``; None when absent or unreadable.
    The matrix is memory-mapped (a million 384-d vectors open in milliseconds)."""
    found = load_arrays(directory, f"vectors-{encoder}", key, ("ids", "matrix"))
    if found is None:
        return None
    ids, matrix = found["ids"], found["matrix"]
    if matrix.ndim != 2 or matrix.dtype != np.float32 or len(ids) != matrix.shape[0]:
        log.warning("vector cache %s-%s has the wrong shape: reading the store", encoder, key)
        return None
    return ids.tolist(), torch.from_numpy(matrix)


def save_matrix(directory: Path, encoder: str, key: str, ids: Sequence[int],
                matrix: torch.Tensor) -> None:
    """Save atomically; keep the ``KEEP`` newest files of the encoder (see save_arrays)."""
    save_arrays(directory, f"vectors-{encoder}", key,
                {"ids": np.asarray(ids, dtype=np.int64),
                 "matrix": matrix.detach().float().cpu().numpy()})
