"""What the admin pages show that no Engine method returns: aggregates computed in SQL and
one page of rows at a time, so a page costs the same on a 1M-item catalogue (nothing
loads every item, user or interaction into Python).

Everything else comes from the Engine's public methods (stats, doctor, models, search,
recommend with explanations) and the experiments module, as the CLI and the API use them.
"""
from __future__ import annotations

import base64
import mimetypes
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import quote, unquote_to_bytes

from sqlalchemy import Integer, cast, func, select

from polyrec.ingest import images
from polyrec.ingest.interactions import MAX_TS, MIN_TS
from polyrec.store import catalog
from polyrec.store.models import Interaction, Item, User

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

#: days shown by the interactions-per-day chart (the most recent days with events)
DAYS = 365
SECONDS_PER_DAY = 86_400


def day(ts: float | None) -> str:
    """Epoch seconds as a UTC date (``2026-11-30``); '' for None, '?' for a time no date
    can show (a row stored before times were checked must not fail a page)."""
    if ts is None:
        return ""
    try:
        return datetime.fromtimestamp(float(ts), tz=timezone.utc).strftime("%Y-%m-%d")
    except (ValueError, OverflowError, OSError, TypeError):
        return "?"


def interactions_per_day(engine: "Engine", days: int = DAYS) -> list[tuple[str, int]]:
    """(UTC date, interactions) of the ``days`` most recent days that have events, oldest
    first; one GROUP BY in the database (a dataset from years ago still shows). Events
    with a time outside the accepted range (MIN_TS..MAX_TS; stored before it was
    checked) are left out."""
    with engine.store.session() as s:
        dialect = s.get_bind().dialect.name
        scaled = Interaction.ts / SECONDS_PER_DAY
        # SQLite's CAST truncates (timestamps are positive); elsewhere floor() is portable
        bucket = cast(scaled, Integer) if dialect == "sqlite" else cast(func.floor(scaled), Integer)
        rows = s.execute(select(bucket.label("d"), func.count())
                         .where(Interaction.ts >= MIN_TS, Interaction.ts < MAX_TS).group_by("d")
                         .order_by(bucket.desc()).limit(days)).all()
    return [(day(int(d) * SECONDS_PER_DAY), int(n)) for d, n in reversed(rows)]


def image_url(item: str, ref: str | None) -> str | None:
    """The admin's own URL of an item's image: local files and ``data:`` URIs are served
    by ``/admin/image``; remote URLs are not fetched (the page stays offline), None."""
    if not ref or "://" in ref:
        return None
    return f"/admin/image?item={quote(item, safe='')}"


@dataclass
class Card:
    """An item as the pages show it."""

    item: str
    title: str | None
    image: str | None  # the admin URL of its image, or None
    remote_image: str | None  # a remote image reference, shown as text
    attributes: dict[str, Any] = field(default_factory=dict)


def cards(engine: "Engine", items: Iterable[str]) -> dict[str, Card]:
    """external id -> Card for the given items (unknown ids are left out); one query."""
    wanted = list(dict.fromkeys(str(i) for i in items))
    if not wanted:
        return {}
    with engine.store.session() as s:
        ids = catalog.item_ids(s, wanted)
        views = catalog.item_views(s, list(ids.values())) if ids else []
    out = {}
    for v in views:
        remote = v.image if v.image and "://" in v.image else None
        out[v.external_id] = Card(v.external_id, v.title, image_url(v.external_id, v.image),
                                  remote, dict(v.attributes or {}))
    return out


def history(engine: "Engine", user: str, *, limit: int = 20, offset: int = 0
            ) -> tuple[int, list[dict[str, Any]]]:
    """(total, one page of the user's interactions, newest first) with each item's card
    fields and whether it is retired; uses the (user, ts) index."""
    with engine.store.session() as s:
        uid = catalog.user_ids(s, [user]).get(user)
        if uid is None:
            return 0, []
        total = s.execute(select(func.count()).select_from(Interaction)
                          .where(Interaction.user_id == uid)).scalar_one()
        rows = s.execute(select(Item.external_id, Item.title, Item.image, Interaction.kind,
                                Interaction.value, Interaction.ts, Item.retired_at)
                         .join(Item, Item.id == Interaction.item_id)
                         .where(Interaction.user_id == uid)
                         .order_by(Interaction.ts.desc(), Interaction.id.desc())
                         .limit(limit).offset(offset)).all()
    return int(total), [{"item": ext, "title": title, "image": image_url(ext, image),
                         "kind": kind, "value": value, "day": day(ts),
                         "retired": retired_at is not None}
                        for ext, title, image, kind, value, ts, retired_at in rows]


def recent_users(engine: "Engine", n: int = 12, window: int = 2000) -> list[str]:
    """Users of the newest ``window`` interactions (by id), most recent first: quick
    picks for the preview page, from an index range scan rather than a full GROUP BY."""
    with engine.store.session() as s:
        newest = s.execute(select(Interaction.user_id, Interaction.id)
                           .order_by(Interaction.id.desc()).limit(window)).all()
        order = list(dict.fromkeys(uid for uid, _ in newest))[:n]
        if not order:
            return list(s.execute(select(User.external_id).order_by(User.id).limit(n)).scalars())
        names = dict(s.execute(select(User.id, User.external_id).where(User.id.in_(order))).all())
    return [names[u] for u in order if u in names]


def image_file(engine: "Engine", item: str, root: str | None) -> tuple[bytes | str, str] | None:
    """(a local path or the bytes of a ``data:`` URI, its media type) of ``item``'s image,
    None when it has none that may be served: remote URLs are not fetched, files must be
    images by name and lie under ``root`` or, without one, under a root the store
    recorded (engine/ingest/images.py; links followed), whatever path was stored."""
    with engine.store.session() as s:
        ref = s.execute(select(Item.image).where(Item.external_id == item)).scalar()
        roots = [root] if root is not None else (images.recorded_roots(s) if ref else [])
    if not ref:
        return None
    if ref.startswith("data:"):
        head, sep, payload = ref[5:].partition(",")
        media = head.split(";")[0] or "application/octet-stream"
        if not sep or not media.startswith("image/"):
            return None
        try:
            data = base64.b64decode(payload) if head.endswith(";base64") else unquote_to_bytes(payload)
        except ValueError:
            return None
        return data, media
    if "://" in ref:
        return None
    real = images.servable_path(ref, roots)
    if real is None:
        return None
    media = mimetypes.guess_type(real)[0] or ""
    if not media.startswith("image/") or not os.path.isfile(real):
        return None
    return real, media


class Recent:
    """The value of ``make()`` kept ``ttl`` seconds (one per app; thread-safe): the
    overview's counts and per-day totals scan the interactions, which on a large store
    takes a second or more, so a reloaded page reuses them."""

    def __init__(self, make: Callable[[], Any], ttl: float = 30.0) -> None:
        self.make, self.ttl = make, ttl
        self._value: Any = None
        self._at = float("-inf")
        self._lock = threading.Lock()

    def get(self) -> tuple[Any, float]:
        """(the value, its age in seconds)."""
        with self._lock:
            if time.monotonic() - self._at > self.ttl:
                self._value, self._at = self.make(), time.monotonic()
            return self._value, time.monotonic() - self._at


class DoctorCache:
    """The doctor's report, computed on a background thread and kept ``ttl`` seconds:
    its image check opens every local image file, too slow for a page on a large
    catalogue. A page waits up to ``wait`` seconds for a fresh report, then shows the
    last one (or says the checks are running)."""

    def __init__(self, engine: "Engine", ttl: float = 300.0) -> None:
        self.engine, self.ttl = engine, ttl
        self.report: dict[str, Any] | None = None
        self.error: str | None = None
        self.done_at = 0.0
        self.started_at: float | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def get(self, wait: float = 3.0) -> dict[str, Any]:
        """{report, error, age (seconds) or None, running}. Only the request that starts
        a run waits for it (up to ``wait`` s); later ones answer at once."""
        started = False
        with self._lock:
            stale = self.report is None or time.time() - self.done_at > self.ttl
            if stale and (self._thread is None or not self._thread.is_alive()):
                self.started_at = time.time()
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="polyrec-admin-doctor")
                self._thread.start()
                started = True
            thread = self._thread
        if started and thread is not None and wait > 0:
            thread.join(wait)
        running = thread is not None and thread.is_alive()
        return {"report": self.report, "error": self.error, "running": running,
                "age": time.time() - self.done_at if self.report is not None else None}

    def _run(self) -> None:
        try:
            report = self.engine.doctor()
            self.report, self.error = report, None
        except Exception as exc:  # noqa: BLE001 - shown on the page, never a failed request
            self.error = f"{type(exc).__name__}: {exc}"
        self.done_at = time.time()
