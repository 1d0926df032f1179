"""The Engine: one store, one plugin host and one device, shared by the API and the CLI.

Methods here stay thin: each delegates to the module that does the work, so a reader
finds ingestion in engine/ingest.py, encoding in engine/pipeline.py, and so on.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from sqlalchemy import func, select

from engine import catalog
from engine.device import resolve_device
from engine.errors import ValidationError
from engine.plugins import DEFAULT_PLUGINS, PluginHost, Registry
from engine.store import Store
from engine.store.models import (Artifact, Entity, Interaction, Item, ItemVector, Relation,
                                 Triple, User)


class Engine:
    """A polyrec engine over one database.

    >>> with Engine("sqlite:///shop.db") as eng:   # doctest: +SKIP
    ...     eng.add_items([{"external_id": "a1", "title": "Black dress"}])
    """

    def __init__(self, url: str | Path | None = None, *, device: str | torch.device = "auto",
                 entrypoints: bool = True, builtins: Iterable[str] = DEFAULT_PLUGINS,
                 plugins: Iterable[object] = (), progress: bool = True) -> None:
        self.store = Store(url)
        self.device = resolve_device(device)
        self.progress = progress
        self.plugins = PluginHost(builtins=builtins, entrypoints=entrypoints, extra=plugins)

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the database connections."""
        self.store.close()

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def store_schema_version(self) -> int:
        from engine.store import SCHEMA_VERSION
        return SCHEMA_VERSION

    # -- plugins -------------------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        """The registry of 'encoders', 'fusers', 'rankers', 'feedback_learners' or 'readers'."""
        return self.plugins.registry(kind)

    # -- catalogue -----------------------------------------------------------------------
    def add_items(self, items: Sequence[Mapping[str, Any]]) -> int:
        """Insert or update items (dicts with ``external_id`` and any of title, text,
        image, attributes). Returns how many records were written."""
        for n, rec in enumerate(items, start=1):
            if not str(rec.get("external_id") or "").strip():
                raise ValidationError("missing item id", file="add_items", row=n, field="external_id")
        with self.store.session() as s:
            return catalog.upsert_items(s, items)

    def add_users(self, users: Sequence[Mapping[str, Any]]) -> int:
        """Insert or update users (dicts with ``external_id`` and optional attributes)."""
        for n, rec in enumerate(users, start=1):
            if not str(rec.get("external_id") or "").strip():
                raise ValidationError("missing user id", file="add_users", row=n, field="external_id")
        with self.store.session() as s:
            return catalog.upsert_users(s, users)

    def add_interactions(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Store events given as dicts with ``user``, ``item`` (external ids), ``kind``
        (default 'click'), optional ``value``, ``ts`` (epoch seconds) and ``context``.
        Unknown users are created; an unknown item is an error and nothing is stored.
        Returns how many events were new."""
        with self.store.session() as s:
            items = catalog.item_ids(s, (str(e.get("item")) for e in events))
            users = catalog.ensure_users(s, (str(e.get("user")) for e in events))
            rows, seen = [], {}
            for n, e in enumerate(events, start=1):
                item = str(e.get("item"))
                if item not in items:
                    raise ValidationError(f"unknown item '{item}'", file="add_interactions",
                                          row=n, field="item")
                kind = str(e.get("kind") or "click")
                ts = float(e["ts"]) if e.get("ts") is not None else time.time()
                value = float(e["value"]) if e.get("value") is not None else None
                ident = (str(e.get("user")), item, kind, ts, value)
                seen[ident] = seen.get(ident, -1) + 1
                rows.append({"user_id": users[ident[0]], "item_id": items[item], "kind": kind,
                             "value": value, "ts": ts, "context": e.get("context"),
                             "dedup_key": catalog.interaction_key(*ident, occurrence=seen[ident])})
            return catalog.insert_interactions(s, rows)

    def items(self, ids: Sequence[int] | None = None) -> list:
        """ItemViews of the catalogue (all, or the given internal ids)."""
        with self.store.session() as s:
            return catalog.item_views(s, ids)

    # -- reports -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Row counts by table and interactions by kind."""
        with self.store.session() as s:
            count = lambda model: s.execute(select(func.count()).select_from(model)).scalar_one()  # noqa: E731
            by_kind = dict(s.execute(select(Interaction.kind, func.count())
                                     .group_by(Interaction.kind)).tuples().all())
            vectors = dict(s.execute(select(ItemVector.encoder, func.count())
                                     .group_by(ItemVector.encoder)).tuples().all())
            linked = s.execute(select(func.count()).select_from(Entity)
                               .where(Entity.item_id.is_not(None))).scalar_one()
            return {"items": count(Item), "users": count(User), "interactions": count(Interaction),
                    "interactions_by_kind": by_kind, "entities": count(Entity),
                    "relations": count(Relation), "triples": count(Triple),
                    "linked_items": linked, "vectors_by_encoder": vectors,
                    "artifacts": count(Artifact)}
