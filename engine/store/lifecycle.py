"""Retired items: kept in the store, never served.

A shop retires an item that is sold out or discontinued (``Engine.retire_items``,
``polyrec items retire``, ``POST /items/retire``, or ``active: false`` in an items file
or record). ``items.retired_at`` says when (None: live). A retired item keeps its row,
its vectors and its interactions: its history still trains models and still describes
the users who had it. It is never *served*: not recommended (every path: model scores,
popularity, filters, exploration, batches), not found by search, not a similar item,
not among popular items. Restoring it (``restore_items``, ``active: true``) serves it
again. An upsert that does not name ``active`` leaves the state as it is, so a shop
re-uploading its whole catalogue does not bring retired items back.

Serving processes keep what they serve from in memory (the Recommender's data snapshot,
the Searcher's snapshots). They learn of a change through one cheap key, the ``meta``
row :data:`STATE_KEY`: a new token is written in the transaction of every change of an
item's state, and compared with the other change keys those processes already poll
(within ``Recommender.refresh_interval`` / the searcher's ``check_interval`` in another
process, at once in the writing one). Only then is the set of retired items read again
(through the partial index ``ix_items_retired``); a store that never retired an item has
no token and nothing more is read.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from polyrec.errors import NotFoundError, ValidationError
from polyrec.store.ids import BadId, check_id, is_missing_id, shown
from polyrec.store.models import Item, Meta
from polyrec.store.tokens import renew_token

#: the ``meta`` key whose value changes with every change of an item's retired state
STATE_KEY = "items.lifecycle"
#: ids per SQL ``IN (...)`` list (below SQLite's parameter limit)
_CHUNK = 900
ACTIONS = ("retire", "restore")


@dataclass
class LifecycleReport:
    """What one retire or restore did: the items whose state ``changed`` and those that
    were in that state already (``unchanged``), as external ids, in the order given."""

    action: str
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "changed": list(self.changed),
                "unchanged": list(self.unchanged), "at": self.at}

    def summary(self) -> str:
        """One line for the CLI."""
        done = "retired" if self.action == "retire" else "restored"
        state = "retired" if self.action == "retire" else "live"
        line = f"{len(self.changed):,} item(s) {done}"
        if self.unchanged:
            more = f" and {len(self.unchanged) - 5:,} more" if len(self.unchanged) > 5 else ""
            line += (f"; {len(self.unchanged):,} already {state}: "
                     f"{', '.join(shown(i) for i in self.unchanged[:5])}{more}")
        return line


def lifecycle_key(session: Session) -> str | None:
    """The current state token (None: no item was ever retired in this store)."""
    return session.execute(select(Meta.value).where(Meta.key == STATE_KEY)).scalar()


def mark_changed(session: Session) -> str:
    """Write a new state token in ``session``'s transaction (items were retired or
    restored); serving processes read the retired items again when they see it."""
    return renew_token(session, STATE_KEY)


def retired_ids(session: Session) -> frozenset[int]:
    """Internal ids of every retired item."""
    return frozenset(session.execute(select(Item.id).where(Item.retired_at.is_not(None)))
                     .scalars())


def retired_count(session: Session) -> int:
    """How many items are retired."""
    return session.execute(select(func.count()).select_from(Item)
                           .where(Item.retired_at.is_not(None))).scalar_one()


def check_item_ids(ids: Iterable[Any], source: str) -> list[str]:
    """``ids`` by the one id rule, in order, without repeats; a ValidationError naming
    ``source`` and the 1-based position of a bad one, or when there is none at all."""
    if isinstance(ids, (str, bytes)):
        ids = [ids]
    out: dict[str, None] = {}
    for n, raw in enumerate(ids, start=1):
        if is_missing_id(raw):
            raise ValidationError("missing item id", file=source, row=n, field="item")
        try:
            out[check_id(raw)] = None
        except BadId as exc:
            raise ValidationError(str(exc), file=source, row=n, field="item") from None
    if not out:
        raise ValidationError("no item ids given", file=source, field="item")
    return list(out)


def _states(session: Session, ids: list[str]) -> dict[str, tuple[int, float | None]]:
    """external id -> (internal id, retired_at) of the items that exist."""
    found: dict[str, tuple[int, float | None]] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start:start + _CHUNK]
        for ext, iid, at in session.execute(select(Item.external_id, Item.id, Item.retired_at)
                                            .where(Item.external_id.in_(chunk))):
            found[ext] = (iid, at)
    return found


def set_retired(session: Session, ids: Iterable[Any], retired: bool, *,
                source: str = "retire_items") -> LifecycleReport:
    """Retire (``retired``) or restore the items with these external ids in ``session``'s
    transaction. Every id must name a stored item: otherwise one NotFoundError names the
    unknown ones and nothing changes. An item already in the wanted state is reported as
    ``unchanged`` (a retired item keeps the time it was first retired)."""
    wanted = check_item_ids(ids, source)
    states = _states(session, wanted)
    missing = [i for i in wanted if i not in states]
    if missing:
        more = f" and {len(missing) - 5:,} more" if len(missing) > 5 else ""
        verb = "retired" if retired else "restored"
        raise NotFoundError(f"{len(missing):,} unknown item(s): "
                            f"{', '.join(shown(i) for i in missing[:5])}{more}; "
                            f"nothing was {verb}")
    stamp = time.time()
    report = LifecycleReport("retire" if retired else "restore", at=stamp)
    change: list[int] = []
    for ext in wanted:
        iid, at = states[ext]
        if (at is None) == retired:
            report.changed.append(ext)
            change.append(iid)
        else:
            report.unchanged.append(ext)
    for start in range(0, len(change), _CHUNK):
        chunk = change[start:start + _CHUNK]
        # updated_at stays as it is (set to itself: its onupdate would move it): the
        # item's content did not change, nothing is re-encoded, re-indexed or reloaded;
        # serving processes see the new state through the token below
        stmt = update(Item).where(Item.id.in_(chunk)).values(updated_at=Item.updated_at)
        stmt = (stmt.where(Item.retired_at.is_(None)).values(retired_at=stamp) if retired
                else stmt.where(Item.retired_at.is_not(None)).values(retired_at=None))
        session.execute(stmt.execution_options(synchronize_session=False))
    if change:
        mark_changed(session)
    return report


def list_items(session: Session, *, retired: bool | None = None, limit: int | None = None
               ) -> list[dict[str, Any]]:
    """Items with their state, ``{"item", "title", "retired", "retired_at"}``: the
    retired ones only (``retired=True``; newest retirement first), the live ones only
    (False) or all (None), by internal id otherwise; at most ``limit``."""
    query = select(Item.external_id, Item.title, Item.retired_at)
    if retired:
        query = query.where(Item.retired_at.is_not(None)).order_by(Item.retired_at.desc(),
                                                                    Item.id)
    else:
        if retired is False:
            query = query.where(Item.retired_at.is_(None))
        query = query.order_by(Item.id)
    if limit is not None:
        query = query.limit(int(limit))
    return [{"item": ext, "title": title, "retired": at is not None, "retired_at": at}
            for ext, title, at in session.execute(query)]
