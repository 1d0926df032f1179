"""Build the TrainingData every ranker learns from, straight from the store.

Positives are ratings of at least ``min_rating`` plus implicit events (view, click, cart,
purchase, ...) weighted by :data:`engine.catalog.DEFAULT_KIND_WEIGHTS`. Each (user, item)
pair appears once: its weight is the largest weight of its events and its time the time of
its first positive event. Users and items get dense indices over the whole store, so items
nobody interacted with (cold items) are in the index too. Item features are the stored
encoder vectors, keyed by the encoder's modality and aligned with the item index.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from sqlalchemy import and_, case, literal, or_, select
from sqlalchemy.orm import Session

from polyrec.store.catalog import DEFAULT_KIND_WEIGHTS
from polyrec.errors import ConfigError, NotFoundError
from polyrec.store.models import Interaction, Item, ItemVector, User
from polyrec.training_data import TrainingData
from polyrec.store.vector_cache import index_directory
from polyrec.store.vectors import load_vectors, signature_key, stored_signature

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

#: Kinds used when ``kinds`` is None: every known kind with a positive default weight.
DEFAULT_KINDS: tuple[str, ...] = tuple(k for k, w in DEFAULT_KIND_WEIGHTS.items() if w > 0)


def build_training_data(engine: "Engine", *, min_rating: float = 4.0,
                        kinds: Iterable[str] | None = None, features: bool = True,
                        encoders: Iterable[str] | None = None,
                        session: Session | None = None) -> TrainingData:
    """Positive interactions of the store as a :class:`TrainingData`.

    ``kinds`` limits the interaction kinds (default :data:`DEFAULT_KINDS`; a kind the
    engine does not know weighs 1.0). ``rating`` events count only when their value is
    at least ``min_rating``. With ``features`` the item vectors of every registered
    encoder that has stored vectors (or of ``encoders``) fill ``item_features`` as
    modality -> (vectors [n_items, d] float32, present [n_items] bool).

    Users, items, interactions and vectors are read in one snapshot
    (``Store.snapshot``), so users or items created by writers meanwhile never leave an
    interaction without its user or item. ``session``: read in that session instead (a
    caller's own snapshot, to read more in the same one).
    """
    weights = _kind_weights(kinds)
    with ExitStack() as stack:
        s = session if session is not None else stack.enter_context(engine.store.snapshot())
        user_ids = [int(r[0]) for r in _fetch(s, select(User.id).order_by(User.id))]
        item_ids = [int(r[0]) for r in _fetch(s, select(Item.id).order_by(Item.id))]
        events = _positive_events(s, weights, min_rating)
        feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        sources: dict[str, str] = {}
        keys: dict[str, str] = {}
        if features:
            feats, sources, keys = _item_features(engine, s, item_ids, encoders)
    users, items, w, ts = _pairs(events, user_ids, item_ids)
    return TrainingData(user_ids=user_ids, item_ids=item_ids, users=users, items=items,
                        weights=w, ts=ts, item_features=feats, feature_encoders=sources,
                        feature_keys=keys)


def _kind_weights(kinds: Iterable[str] | None) -> dict[str, float]:
    """kind -> weight of the kinds read (default :data:`DEFAULT_KINDS`; a kind the
    engine does not know weighs 1.0)."""
    chosen = tuple(DEFAULT_KINDS if kinds is None else dict.fromkeys(kinds))
    if not chosen:
        raise ConfigError("build_training_data needs at least one interaction kind")
    return {k: float(DEFAULT_KIND_WEIGHTS.get(k, 1.0)) for k in chosen}


def _fetch(session: Session, stmt) -> list[tuple]:  # type: ignore[no-untyped-def]
    """The rows of a Core ``stmt`` as plain tuples, read through the driver's cursor in
    ``session``'s transaction: SQLAlchemy's row objects cost most of a refresh (100k
    interactions: 0.8 s of rows against ~0.1 s of tuples). Bound values are our own
    constants (kinds, weights, the rating threshold), rendered as literals."""
    conn = session.connection()
    sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    cursor = conn.connection.cursor()
    try:
        cursor.execute(sql)
        return cursor.fetchall()
    finally:
        cursor.close()


def _positive_events(session: Session, weights: dict[str, float], min_rating: float,
                     after: int | None = None) -> np.ndarray:
    """(user id, item id, weight, ts) float64 [n, 4] of every event that counts as a
    positive: a kind of positive weight, a rating only from ``min_rating``; the weight of
    its kind computed by the database (``CASE kind``). ``after``: only events with a
    larger id."""
    positive = {k: w for k, w in weights.items() if w > 0}
    if not positive:
        return np.empty((0, 4))
    weight = case({k: literal(float(w)) for k, w in positive.items()}, value=Interaction.kind)
    counts = or_(Interaction.kind != "rating",
                 and_(Interaction.value.is_not(None), Interaction.value >= float(min_rating)))
    stmt = (select(Interaction.user_id, Interaction.item_id, weight, Interaction.ts)
            .where(Interaction.kind.in_(sorted(positive)), counts))
    if after is not None:
        stmt = stmt.where(Interaction.id > int(after))
    rows = _fetch(session, stmt)
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def _dense(ids: np.ndarray, known: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(dense index of each id in the sorted ``known`` ids, whether it is known)."""
    ref = np.asarray(known, dtype=np.int64)
    pos = np.searchsorted(ref, ids)
    ok = pos < len(ref)
    ok[ok] = ref[pos[ok]] == ids[ok]
    return pos, ok


def _indexed(events: np.ndarray, user_ids: list[int], item_ids: list[int]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Events as (dense user, dense item, weight float32, ts) arrays; events of users or
    items not in the ids are dropped (only without isolation: one shared in-memory
    connection)."""
    u, u_ok = _dense(events[:, 0].astype(np.int64), user_ids)
    i, i_ok = _dense(events[:, 1].astype(np.int64), item_ids)
    keep = u_ok & i_ok
    return u[keep], i[keep], events[keep, 2].astype(np.float32), events[keep, 3]


def _pairs(events: np.ndarray, user_ids: list[int], item_ids: list[int]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense (users, items, weights, ts), one row per positive (user, item) pair (its
    largest weight, its first time), sorted by user then time."""
    return _dedup(*_indexed(events, user_ids, item_ids), len(item_ids))


def _dedup(u: np.ndarray, i: np.ndarray, w: np.ndarray, t: np.ndarray, n_items: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per (user, item) pair of the rows given: the largest weight and the
    earliest time, sorted by user, then time, then item. Pairs merged with later
    events give what all the events give at once (max and min are associative)."""
    if not len(u):
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty.clone(), torch.empty(0), torch.empty(0, dtype=torch.float64)
    key = u * n_items + i
    order = np.lexsort((t, key))  # by pair, earliest event first
    key, w, t = key[order], w[order], t[order]
    first = np.r_[True, key[1:] != key[:-1]]
    starts = np.flatnonzero(first)
    pair_w = np.maximum.reduceat(w, starts)
    pair_t = t[starts]
    pair_u, pair_i = key[starts] // n_items, key[starts] % n_items
    final = np.lexsort((pair_i, pair_t, pair_u))  # by user, then time, then item
    return (torch.from_numpy(pair_u[final]), torch.from_numpy(pair_i[final]),
            torch.from_numpy(pair_w[final]), torch.from_numpy(pair_t[final]))


def extend_training_data(previous: TrainingData, session: Session, *,
                         after_interaction: int, after_user: int,
                         min_rating: float = 4.0, kinds: Iterable[str] | None = None
                         ) -> TrainingData:
    """``previous`` (built by :func:`build_training_data` with the same ``min_rating``
    and ``kinds``, up to interaction id ``after_interaction`` and user id
    ``after_user``) plus what was appended since: the users created after it (new
    dense indices at the end) and the positive events after it, merged into the pairs.
    The same data a full build gives when nothing but appends happened (no deletion, no
    new or changed item: the caller checks), without reading the older events again.
    Features and the item index are shared with ``previous``."""
    weights = _kind_weights(kinds)
    new_users = [int(r[0]) for r in _fetch(session, select(User.id).where(
        User.id > after_user).order_by(User.id))]
    user_ids = previous.user_ids + new_users if new_users else previous.user_ids
    events = _positive_events(session, weights, min_rating, after=after_interaction)
    old = (previous.users, previous.items, previous.weights, previous.ts)
    users, items, w, ts = _dedup(
        *(np.concatenate([before.numpy(), added]) for before, added in
          zip(old, _indexed(events, user_ids, previous.item_ids))),
        previous.n_items)
    return TrainingData(user_ids=user_ids, item_ids=previous.item_ids, users=users,
                        items=items, weights=w, ts=ts, item_features=previous.item_features,
                        feature_encoders=previous.feature_encoders,
                        feature_keys=previous.feature_keys)


def _item_features(engine: "Engine", session, item_ids: list[int],
                   encoders: Iterable[str] | None
                   ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, str],
                              dict[str, str]]:
    """modality -> (vectors, present) for the encoders with stored vectors (of a
    stand-in pair only the one in use), modality -> encoder name, and modality -> digest
    of the stored vectors (only where they are persisted beside the store). A second
    encoder of an already-used modality is keyed by its own name."""
    registry = engine.registry("encoders")
    stored = set(session.execute(select(ItemVector.encoder).distinct()).scalars())
    if encoders is None:  # of a stand-in pair (clip / image_cnn) only the one in use
        from polyrec.encode.selection import in_use
        names = in_use(engine, [n for n in registry.names() if n in stored])
    else:
        names = list(encoders)
        for n in names:
            if n not in registry:
                registry.get(n)  # raises NotFoundError listing the known encoders
            if n not in stored:
                raise NotFoundError(f"encoder '{n}' has no stored vectors; run `polyrec encode` first")
    directory = index_directory(engine.store.url)
    wanted = np.asarray(item_ids, dtype=np.int64)
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sources: dict[str, str] = {}
    keys: dict[str, str] = {}
    for name in names:
        signature = stored_signature(session, name)
        if signature is None:
            continue
        ids, matrix = load_vectors(session, name, directory=directory, signature=signature)
        if not ids:
            continue
        have = np.asarray(ids, dtype=np.int64)
        if len(have) == len(wanted) and np.array_equal(have, wanted):
            vectors = matrix  # every item has one, in item order: no copy (maybe mapped)
            present = torch.ones(len(item_ids), dtype=torch.bool)
        else:  # both ascending: place each stored row at its item's index
            pos = np.searchsorted(wanted, have)
            hit = (pos < len(wanted)) & (wanted[np.minimum(pos, len(wanted) - 1)] == have)
            rows = torch.from_numpy(pos[hit])
            vectors = torch.zeros(len(item_ids), matrix.shape[1], dtype=torch.float32)
            present = torch.zeros(len(item_ids), dtype=torch.bool)
            vectors[rows] = matrix if bool(hit.all()) else matrix[torch.from_numpy(hit)]
            present[rows] = True
        modality = str(getattr(registry.get(name), "modality", name))
        key = modality if modality not in feats else name
        feats[key] = (vectors, present)
        sources[key] = name
        if directory is not None:
            keys[key] = signature_key(name, signature)
    return feats, sources, keys
