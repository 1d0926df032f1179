"""Recommendations for many users at once: ``Engine.recommend_many``, ``polyrec recommend
--all | --users FILE``.

The same answer as ``Engine.recommend`` for each user (the same cold-user and guest
fallback, online blending, seen-item exclusion, retired items left out, attribute
filters, MMR diversity, exploration and click probabilities), computed a block of users
at a time: one ``Ranker.score_users`` call, one query for the block's seen items, one
``Ranker.click_probability`` call per block. The whole run serves from one data
snapshot. :func:`recommend_block` is the core a distributed runner calls per shard.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch
from sqlalchemy import select

from polyrec.errors import ConfigError, NotFoundError
from polyrec.progress import progress_bar
from polyrec.rank.recommend import Recommendation, check_filters, mmr
from polyrec.store.models import Interaction, User

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine
    from polyrec.rank.recommend import DataSnapshot, Recommender

#: Users scored per block by default.
BATCH_SIZE = 256
#: At most this many score cells (users x items) per block: a large catalogue gets
#: smaller blocks (1M items: 32 users), so a block's score matrices stay ~128 MB each.
MAX_BLOCK_CELLS = 1 << 25
#: Ids per SQL ``IN (...)`` list (below SQLite's parameter limit).
_IN_CHUNK = 900


@dataclass(frozen=True)
class BatchOptions:
    """The request options shared by every user of a batch (see Engine.recommend)."""

    k: int = 10
    filters: Mapping[str, Any] | None = None
    exclude_seen: bool = True
    diversity: float = 0.0
    online: bool | None = None
    explore: bool | None = None

    def check(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, not {self.k}")
        if not 0.0 <= self.diversity <= 1.0:
            raise ConfigError(f"diversity must be between 0 and 1, not {self.diversity}")


def resolve_users(engine: "Engine", users: Iterable[str] | None) -> list[tuple[str, int]]:
    """(external id, internal id) of each user, in the given order; every stored user (by
    internal id) when ``users`` is None. One NotFoundError naming the unknown ones."""
    with engine.store.snapshot() as s:
        if users is None:
            return [(str(e), int(i)) for i, e in
                    s.execute(select(User.id, User.external_id).order_by(User.id))]
        wanted = [str(u) for u in users]
        found: dict[str, int] = {}
        distinct = list(dict.fromkeys(wanted))
        for start in range(0, len(distinct), _IN_CHUNK):
            chunk = distinct[start:start + _IN_CHUNK]
            found.update((str(e), int(i)) for i, e in s.execute(
                select(User.id, User.external_id).where(User.external_id.in_(chunk))))
    missing = [u for u in distinct if u not in found]
    if missing:
        shown = ", ".join(repr(u) for u in missing[:5])
        more = f" and {len(missing) - 5:,} more" if len(missing) > 5 else ""
        raise NotFoundError(f"{len(missing):,} unknown user(s): {shown}{more}")
    return [(u, found[u]) for u in wanted]


def _seen(engine: "Engine", user_ids: Sequence[int], item_index: Mapping[int, int]
          ) -> dict[int, list[int]]:
    """Dense item indices each user has any stored interaction with (impressions alone
    do not count), as Recommender._seen reads them, for a block of users in one query."""
    out: dict[int, list[int]] = defaultdict(list)
    distinct = list(dict.fromkeys(user_ids))
    with engine.store.snapshot() as s:
        for start in range(0, len(distinct), _IN_CHUNK):
            rows = s.execute(select(Interaction.user_id, Interaction.item_id)
                             .where(Interaction.user_id.in_(distinct[start:start + _IN_CHUNK]))
                             .where(Interaction.kind != "impression").distinct())
            for uid, iid in rows:
                j = item_index.get(iid)
                if j is not None:
                    out[uid].append(j)
    return out


def _click_probabilities(rec: "Recommender", dense: list[int | None], picked: list[list[int]]
                         ) -> list[dict[int, float] | None]:
    """Per row, the ranker's click probability of each picked item (None for a guest, an
    empty pick or a ranker without a click model); rows with as many picks are asked in
    one ``click_probability`` call."""
    out: list[dict[int, float] | None] = [None] * len(dense)
    ranker = rec.ranker  # read once: a fallback on another thread may swap it
    if ranker is None or not hasattr(ranker, "click_probability"):
        return out
    groups: dict[int, list[int]] = defaultdict(list)
    for r, (u, items) in enumerate(zip(dense, picked)):
        if u is not None and items:
            groups[len(items)].append(r)
    for rows in groups.values():
        try:
            with torch.no_grad():
                probs = ranker.click_probability(torch.tensor([dense[r] for r in rows]),
                                                 torch.tensor([picked[r] for r in rows]),
                                                 rec.data)
        except Exception as exc:  # noqa: BLE001 - the scores stand; the probabilities not
            if rec.strict:
                raise
            rec._plugin_failed("click_probability", exc)
            return out
        if probs is None:
            return out
        probs = probs.detach().float().cpu()
        for row, r in enumerate(rows):
            out[r] = {i: float(p) for i, p in zip(picked[r], probs[row])}
    return out


def keep_mask(engine: "Engine", snap: "DataSnapshot", filters: Mapping[str, Any] | None
              ) -> torch.Tensor | None:
    """bool [n_items] of ``snap``: the items that may be served, live (not retired,
    polyrec.store.lifecycle) and passing ``filters`` (check_filters); None when every
    item may (no filters, nothing retired)."""
    live = snap.live_mask()
    passes = check_filters(engine, filters)
    if passes is None:
        return live
    views = snap.views
    if live is not None:  # a retired item's attributes need not be read
        views.prefetch_indices(live.nonzero().flatten().tolist())
        return torch.tensor([bool(ok) and passes(views[i]) for i, ok in enumerate(live.tolist())],
                            dtype=torch.bool)
    return torch.tensor([passes(v) for v in views], dtype=torch.bool)


def recommend_block(rec: "Recommender", snap: "DataSnapshot", users: Sequence[tuple[str, int]],
                    options: BatchOptions, *, keep: torch.Tensor | None = None,
                    item_index: Mapping[int, int] | None = None) -> list[list[Recommendation]]:
    """Recommendations for a block of users ((external id, internal id) pairs) from
    ``snap``, one list per user in order, equal to what ``rec.recommend`` returns for
    each. ``keep`` (bool [n_items]: items passing the filters) and ``item_index`` may be
    passed in to compute them once per run."""
    engine = rec.engine
    if item_index is None:
        item_index = snap.data.item_index()
    if keep is None:
        keep = keep_mask(engine, snap, options.filters)
    with rec.pinned(snap):  # every read below (hooks included) sees this snapshot
        dense = [snap.user_index.get(uid) for _, uid in users]
        known = [r for r, u in enumerate(dense) if u is not None]
        n_items = snap.data.n_items
        scores = torch.log1p(snap.popularity).expand(len(users), n_items).clone()
        if known:  # guests (newer than the snapshot) keep popularity
            scores[known] = rec.scores(torch.tensor([dense[r] for r in known]))
        if rec.online_hook is not None:  # per user: the learners' state of each one,
            if rec.prefetch_hook is not None:  # loaded for the whole block first
                rec.prefetch_hook(rec, [uid for _, uid in users], options.online)
            for r, (_, uid) in enumerate(users):
                scores[r] = rec.online_hook(rec, uid, scores[r], options.online)
        if options.exclude_seen:
            seen = _seen(engine, [uid for _, uid in users], item_index)
            rows: list[int] = []
            cols: list[int] = []
            for r, ((_, uid), u) in enumerate(zip(users, dense)):
                items = list(seen.get(uid, ()))
                if u is not None:
                    items += snap.history[u].tolist()
                rows += [r] * len(items)
                cols += items
            if cols:
                scores[torch.tensor(rows), torch.tensor(cols)] = -math.inf
        if keep is not None:
            scores[:, ~keep] = -math.inf
        finite = torch.isfinite(scores).sum(dim=1).tolist()
        vectors = rec.vectors() if options.diversity > 0 else None
        picked: list[list[int]] = []
        for r in range(len(users)):
            n_ok = int(finite[r])
            if n_ok == 0:
                picked.append([])
            elif vectors is not None:
                pool = torch.topk(scores[r], min(max(10 * options.k, 100), n_ok))
                picked.append(mmr(pool.indices, pool.values, vectors, options.k,
                                  options.diversity))
            else:
                picked.append(torch.topk(scores[r], min(options.k, n_ok)).indices.tolist())
        if rec.explore_hook is not None:  # exploration (bandit), when enabled
            picked = [rec.explore_hook(rec, uid, scores[r], picked[r], options.k,
                                       options.explore) if picked[r] else picked[r]
                      for r, (_, uid) in enumerate(users)]
        clicks = _click_probabilities(rec, dense, picked)
        item_ids, external, titles = snap.data.item_ids, snap.external, snap.titles
        snap.views.prefetch_indices(i for row in picked for i in row)  # one read, not k * users
        out = []
        for r in range(len(users)):
            probs = clicks[r]
            out.append([Recommendation(item=external[item_ids[i]],
                                       score=probs[i] if probs is not None else float(scores[r, i]),
                                       title=titles.get(item_ids[i]))
                        for i in picked[r]])
    return out


def recommend_many(engine: "Engine", users: Iterable[str] | None = None, k: int = 10, *,
                   filters: Mapping[str, Any] | None = None, exclude_seen: bool = True,
                   diversity: float = 0.0, online: bool | None = None,
                   explore: bool | None = None, batch_size: int = BATCH_SIZE,
                   progress: bool | None = None
                   ) -> Iterator[tuple[str, list[Recommendation]]]:
    """(user, recommendations) for each of ``users`` (external ids; every stored user when
    None), in order, computed ``batch_size`` users at a time (see Engine.recommend_many).
    Arguments and users are checked before the first block is scored: an unknown user is
    one NotFoundError naming it."""
    options = BatchOptions(k=int(k), filters=filters or None, exclude_seen=exclude_seen,
                           diversity=float(diversity), online=online, explore=explore)
    options.check()
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    check_filters(engine, options.filters)  # before anything is scored
    rec = engine.services.recommender()
    rec.check_live()
    snap = rec.refresh()
    pairs = resolve_users(engine, users)
    show = bool(getattr(engine, "progress", False)) if progress is None else progress
    return _blocks(rec, snap, pairs, options, batch_size, show)


def _blocks(rec: "Recommender", snap: "DataSnapshot", pairs: list[tuple[str, int]],
            options: BatchOptions, batch_size: int, progress: bool
            ) -> Iterator[tuple[str, list[Recommendation]]]:
    item_index = snap.data.item_index()
    keep = keep_mask(rec.engine, snap, options.filters)
    batch_size = max(1, min(batch_size, MAX_BLOCK_CELLS // max(snap.data.n_items, 1)))
    with progress_bar(total=len(pairs), desc="recommend", unit="users", enabled=progress) as bar:
        for start in range(0, len(pairs), batch_size):
            block = pairs[start:start + batch_size]
            recs = recommend_block(rec, snap, block, options, keep=keep, item_index=item_index)
            bar.update(len(block))
            for (user, _), user_recs in zip(block, recs):
                yield user, user_recs
