"""Stored artifacts as files beside the store, so a fresh process maps a trained model
instead of copying it out of the database.

A two-tower pipeline at 1M items is a 390 MB artifact (its item-ID embeddings). Read
from SQLite it is copied twice (the blob's overflow pages, then torch's unpickler): about
3 s of a fresh process's first request on two CPU cores. The payload is already a
``torch.save`` file (polyrec.store.artifacts.to_bytes), so it is written once, as it is,
to ``<index dir>/artifact-<name>-<digest>.pt`` and later opened with
``torch.load(mmap=True)``: tensors are mapped, pages read as they are used.

The digest names the stored version exactly (name, version, creation time, size): a
version is never rewritten in place, and a rebuilt store's versions have other times,
so a file is never read for another model. The index dir is the one of
polyrec.store.vector_cache (``POLYREC_INDEX_DIR`` or ``<db>.polyrec-index/``; none for
in-memory SQLite or PostgreSQL without ``POLYREC_INDEX_DIR``): without one, nothing is
cached and the artifact is read from the store as before.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from polyrec.store.artifacts import ArtifactHeader
from polyrec.store.vector_cache import beyond_newest, write_atomically

log = logging.getLogger("polyrec.models")

#: files kept per artifact name (the newest by modification time)
KEEP = 2


def _path(directory: Path, header: ArtifactHeader) -> Path:
    text = repr((header.name, header.version, header.created_at, header.size))
    digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in header.name)
    return directory / f"artifact-{safe}-{digest}.pt"


def load_cached(directory: Path | None, header: ArtifactHeader) -> Any | None:
    """The payload of the version ``header`` names, memory-mapped from its file; None
    when there is no file (or no directory) or it cannot be read."""
    if directory is None:
        return None
    path = _path(directory, header)
    if not path.exists() or path.stat().st_size != header.size:
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - a broken file: read the store instead
        log.warning("cached artifact %s unreadable (%s): reading the store", path, exc)
        return None


def save_cached(directory: Path | None, header: ArtifactHeader, data: bytes,
                keep: int = KEEP) -> None:
    """Write ``data`` (the stored bytes of the version ``header`` names) atomically;
    keep the ``keep`` newest files of the artifact. Failure to write (read-only place,
    full disk) is logged, never raised."""
    if directory is None:
        return
    path = _path(directory, header)
    try:
        write_atomically(path, lambda tmp: tmp.write_bytes(data))
    except OSError as exc:
        log.warning("could not save artifact %s v%s in %s: %s", header.name, header.version,
                    directory, exc)
        return
    pattern = path.name[:-len("0" * 32 + ".pt")] + "?" * 32 + ".pt"  # this name's files
    try:  # several processes may clean up the same folder at once
        for stale in beyond_newest(directory.glob(pattern), keep):
            stale.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove old files of artifact %s in %s: %s", header.name,
                    directory, exc)
