"""Trained models in the store: versioned blobs by name (table ``artifacts``).

``save_artifact`` appends a new version; ``load_artifact`` returns the latest (or a given)
version. ``to_bytes``/``from_bytes`` turn any torch-serialisable object (state dicts,
tensors, plain containers) into the payload and back.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from polyrec.errors import NotFoundError
from polyrec.store.models import Artifact


@dataclass
class StoredArtifact:
    """One version of an artifact as read back from the store."""

    name: str
    kind: str
    version: int
    data: bytes
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0


@dataclass(frozen=True)
class ArtifactHeader:
    """One stored version without its bytes (``size``: how many there are)."""

    name: str
    kind: str
    version: int
    size: int
    meta: dict[str, Any]
    created_at: float


def artifact_header(session: Session, name: str, version: int | None = None) -> ArtifactHeader:
    """The header of the given version of ``name`` (the latest when None), its bytes
    left in the store; NotFoundError if absent."""
    query = select(Artifact.name, Artifact.kind, Artifact.version, func.length(Artifact.data),
                   Artifact.meta, Artifact.created_at).where(Artifact.name == name)
    query = (query.where(Artifact.version == version) if version is not None
             else query.order_by(Artifact.version.desc()).limit(1))
    row = session.execute(query).first()
    if row is None:
        which = f"version {version} of " if version is not None else ""
        raise NotFoundError(f"no {which}artifact named '{name}' in the store")
    n, kind, v, size, meta, created = row
    return ArtifactHeader(n, kind, int(v), int(size or 0), dict(meta or {}), float(created or 0.0))


def save_artifact(session: Session, name: str, kind: str, payload: bytes,
                  meta: dict[str, Any] | None = None) -> int:
    """Store ``payload`` as the next version of artifact ``name``; returns that version."""
    latest = session.execute(select(func.max(Artifact.version))
                             .where(Artifact.name == name)).scalar_one()
    version = int(latest or 0) + 1
    session.add(Artifact(name=name, kind=kind, version=version, data=bytes(payload),
                         meta=dict(meta or {})))
    session.flush()
    return version


def load_artifact(session: Session, name: str, version: int | None = None) -> StoredArtifact:
    """The given version of artifact ``name`` (the latest when None); NotFoundError if absent."""
    query = select(Artifact).where(Artifact.name == name)
    query = (query.where(Artifact.version == version) if version is not None
             else query.order_by(Artifact.version.desc()).limit(1))
    row = session.execute(query).scalars().first()
    if row is None:
        which = f"version {version} of " if version is not None else ""
        raise NotFoundError(f"no {which}artifact named '{name}' in the store")
    return StoredArtifact(row.name, row.kind, row.version, bytes(row.data), dict(row.meta or {}),
                          float(row.created_at or 0.0))


def list_artifacts(session: Session, name: str | None = None) -> list[dict[str, Any]]:
    """name, kind, version, size, meta and created_at of the stored artifacts (oldest first)."""
    query = select(Artifact.name, Artifact.kind, Artifact.version, func.length(Artifact.data),
                   Artifact.meta, Artifact.created_at).order_by(Artifact.name, Artifact.version)
    if name is not None:
        query = query.where(Artifact.name == name)
    return [{"name": n, "kind": k, "version": v, "bytes": int(size or 0), "meta": m or {},
             "created_at": c} for n, k, v, size, m, c in session.execute(query)]


def prune_artifacts(session: Session, name: str, keep: int = 3) -> int:
    """Delete all but the ``keep`` newest versions of ``name``; returns how many went."""
    versions = list(session.execute(select(Artifact.version).where(Artifact.name == name)
                                    .order_by(Artifact.version.desc())).scalars())
    old = versions[keep:]
    if old:
        session.execute(delete(Artifact).where(Artifact.name == name)
                        .where(Artifact.version.in_(old)))
    return len(old)


def to_bytes(obj: Any) -> bytes:
    """torch.save ``obj`` into bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(payload: bytes, map_location: str | torch.device = "cpu") -> Any:
    """torch.load what :func:`to_bytes` wrote (plain containers, tensors, numbers, strings)."""
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
