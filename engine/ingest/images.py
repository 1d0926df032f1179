"""The image-root rule: item images that are local files lie under an image root.

One rule for every path that writes an item's image and for the one that serves it:

- files (``polyrec ingest items``, engine/ingest/files.py): the root is ``--image-root``,
  by default the data file's folder;
- the Python API and HTTP (``Engine.add_items``, ``PUT /items``): the root is
  ``Engine(image_root=...)`` (``polyrec serve --image-root``); without one, the roots
  this store recorded when images were written under them before;
- the admin's ``GET /admin/image``: the server's ``--image-root``, else the recorded
  roots; a stored path outside them is never served (a store written before this rule
  may hold one).

A local path (relative to the root, or absolute; symbolic links followed) that resolves
outside every allowed root is refused with an error naming the item and the field
``image``. URLs (``scheme://...``) and ``data:`` URIs are kept as they are. Accepted paths
are stored absolute, and the root they were accepted under is recorded in the store
(setting ``image_roots``) so that other processes know it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy.orm import Session

from polyrec.errors import ValidationError
from polyrec.store.ids import shown
from polyrec.store.settings import get_setting, put_setting

#: the setting holding the roots images were accepted under (a list of real paths)
ROOTS_SETTING = "image_roots"


class OutsideRoot(Exception):
    """A local image path that is not under an allowed root (the message says why)."""


def is_url(ref: str) -> bool:
    """A remote reference or an inline ``data:`` URI (not a local file)."""
    return "://" in ref or ref.startswith("data:")


def _real(path: str | Path) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def under(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` lies under ``root`` once both are resolved (links followed)."""
    real_root, real = _real(root), _real(path)
    return os.path.commonpath([real_root, real]) == real_root


def resolve_image(ref: str, root: str | Path, hint: str = "choose the root with --image-root") -> str:
    """A URL unchanged; a local path made absolute against ``root`` when relative. A
    local path must lie under ``root``: one that escapes it (``../../etc/shadow``,
    ``/etc/shadow``) raises OutsideRoot (``hint``: how to choose the root)."""
    if is_url(ref):
        return ref
    p = Path(ref).expanduser()
    resolved = os.path.abspath(p if p.is_absolute() else Path(root).expanduser() / p)
    if not under(resolved, root):
        raise OutsideRoot(f"image path {ref!r} is outside the image root {str(root)!r} ({hint})")
    return resolved


def recorded_roots(session: Session) -> list[str]:
    """The roots this store recorded (real paths), oldest first."""
    value = get_setting(session, ROOTS_SETTING)
    return [str(r) for r in value] if isinstance(value, list) else []


def record_root(session: Session, root: str | Path) -> None:
    """Add ``root`` (as a real path) to the recorded roots, in the caller's transaction."""
    real = _real(root)
    roots = recorded_roots(session)
    if real not in roots:
        put_setting(session, ROOTS_SETTING, [*roots, real])


API_HINT = "set the image root with Engine(image_root=...) or polyrec serve --image-root"


def check_item_images(session: Session, records: Sequence[Mapping[str, Any]],
                      root: str | Path | None, source: str) -> list[dict[str, Any]]:
    """``records`` (checked items of the Python API or HTTP) with each local ``image``
    made absolute under ``root`` (or, when None, under one of the recorded roots), or a
    ValidationError naming ``source``, the row, the item and the field ``image``. A root
    that accepted a local image is recorded."""
    out: list[dict[str, Any]] = []
    roots = None if root is not None else recorded_roots(session)
    used = False
    for n, rec in enumerate(records, start=1):
        ref = rec.get("image")
        if ref is None or (isinstance(ref, str) and (not ref.strip() or is_url(ref.strip()))):
            out.append(dict(rec))
            continue
        item = shown(str(rec.get("external_id")))
        if not isinstance(ref, str):
            raise ValidationError(f"item {item}: image must be text (a path or URL), not "
                                  f"{type(ref).__name__}", file=source, row=n, field="image")
        ref = ref.strip()
        try:
            if root is not None:
                image = resolve_image(ref, root, API_HINT)
                used = True
            else:
                image = _under_recorded(ref, roots or [])
        except OutsideRoot as exc:
            raise ValidationError(f"item {item}: {exc}", file=source, row=n,
                                  field="image") from None
        out.append({**rec, "image": image})
    if used and root is not None:
        record_root(session, root)
    return out


def _under_recorded(ref: str, roots: Sequence[str]) -> str:
    """An absolute ``ref`` under one of ``roots``, else OutsideRoot."""
    if not roots:
        raise OutsideRoot(f"image path {ref!r} is a local file but no image root is set "
                          f"({API_HINT}; `polyrec ingest items` records its --image-root)")
    p = Path(ref).expanduser()
    if not p.is_absolute():
        raise OutsideRoot(f"image path {ref!r} is relative and no image root is set "
                          f"({API_HINT})")
    resolved = os.path.abspath(p)
    if not any(under(resolved, r) for r in roots):
        raise OutsideRoot(f"image path {ref!r} is outside the image roots of this store "
                          f"({', '.join(repr(r) for r in roots)}; {API_HINT})")
    return resolved


def servable_path(ref: str, roots: Iterable[str | Path]) -> str | None:
    """The real path of a stored local image ``ref`` when it lies under one of ``roots``
    (a relative ``ref`` is taken under each root in turn), else None."""
    for root in roots:
        p = Path(ref).expanduser()
        real = _real(p if p.is_absolute() else Path(root).expanduser() / p)
        if under(real, root):
            return real
    return None
