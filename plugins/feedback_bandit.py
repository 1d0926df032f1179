"""Exploration: linear Thompson sampling over the candidate list.

The bandit models the click probability of a shown item as linear in a few re-ranking
features of (user, item, list): a bias, the model score standardized within the list,
the rank prior 1/log2(rank + 2), log popularity, a new-item flag (fewer than
``new_item_max_events`` events) and the cosine between the user's online state and the
item. Its posterior is Bayesian ridge regression, ``A = prior * I + sum x x^T`` and
``b = sum reward * x``: every impression adds its ``x`` to ``A`` (reward 0 until a click
on that item arrives, which adds ``x`` to ``b``). ``explore`` keeps the model's top
``k - m`` candidates and fills ``m = round(share * k)`` slots with the rest of the pool
ranked by a posterior sample, so items whose value is uncertain (new items first) get
shown and learned about.

Off by default: evaluation never calls it, and serving uses it only when the feedback
setting ``bandit.serving`` is true. State is stored in ``learner_states`` and caught up
from the event log after a restart. It uses only its
:class:`~polyrec.contracts.LearnerContext` (stored events, its state row, item counts,
the user-state learner's vectors).
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from polyrec import FeedbackLearner, LearnerContext, hookimpl, progress_bar

if TYPE_CHECKING:  # pragma: no cover
    from polyrec import Event

FEATURES = ("bias", "score", "rank", "popularity", "new_item", "affinity")
REWARD_KINDS = frozenset({"click", "cart", "purchase"})
LEARN_KINDS = ("impression", "skip", *sorted(REWARD_KINDS))


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


#: rows of x x^T summed per numpy call (bounds the memory of a large batch)
_SUM_CHUNK = 4096
#: Events read at a time when catching up from the log.
CATCH_UP_BATCH = 10_000


def _add_in_order(total: np.ndarray, xs: list[np.ndarray], *, outer: bool) -> np.ndarray:
    """``total`` plus each ``x x^T`` (``outer``) or each ``x`` of ``xs``, added one after
    the other in list order: bit for bit the sum ``total += ...`` per event would give
    (a reduction over the first axis adds whole rows in order, no pairwise summation)."""
    for start in range(0, len(xs), _SUM_CHUNK):
        x = np.asarray(xs[start:start + _SUM_CHUNK], dtype=np.float64)
        terms = x[:, :, None] * x[:, None, :] if outer else x
        total = np.add.reduce(np.concatenate([total[None], terms]), axis=0)
    return total


class _Rows:
    """Feature rows recomputed for events of one batch (item known only by its event
    count): taken one by one while learning, their popularity and new-item columns
    filled for all at once by :meth:`fill` with the same numpy operations
    :meth:`ThompsonBandit.features` applies to one row."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.x = np.zeros((max(size, 1), len(FEATURES)))
        self.counts: list[int] = []
        self.max_pop: list[int] = []

    def take(self, count: int, max_pop: int, rank_prior: float) -> np.ndarray:
        row = self.x[len(self.counts)]
        row[0] = 1.0
        row[2] = rank_prior
        self.counts.append(count)
        self.max_pop.append(max_pop)
        return row  # a view: the pending impressions and the sums read it after fill

    def fill(self, new_item_max_events: int) -> None:
        n = len(self.counts)
        if not n:
            return
        counts = np.array(self.counts, dtype=np.float64)
        self.x[:n, 3] = np.log1p(counts) / np.log1p(np.array(self.max_pop, dtype=np.float64))
        self.x[:n, 4] = (counts < new_item_max_events).astype(np.float64)


class ThompsonBandit(FeedbackLearner):
    """Linear Thompson sampling over re-ranking features; learns from impressions and clicks."""

    name = "bandit"

    def __init__(self, context: LearnerContext | None = None, *, share: float = 0.2,
                 new_item_max_events: int = 5, prior: float = 1.0, noise: float = 0.5,
                 flush_every: int = 256, seed: int | None = None, **options: Any) -> None:
        super().__init__(context, **options)
        if not 0.0 <= float(share) <= 1.0:
            raise ValueError(f"share must be in [0, 1], not {share}")
        self.share = float(share)
        self.new_item_max_events = int(new_item_max_events)
        self.prior, self.noise = float(prior), float(noise)
        self.flush_every = max(1, int(flush_every))
        self.rng = np.random.default_rng(seed)
        d = len(FEATURES)
        self.A = self.prior * np.eye(d)
        self.b = np.zeros(d)
        self.impressions = 0
        self.rewards = 0
        self.last_event_id = 0
        self._popularity: dict[int, int] | None = None
        self._max_pop = 1
        self._shown: _LRU = _LRU(200_000)    # (user, item) -> x computed by explore
        self._pending: _LRU = _LRU(200_000)  # (user, item) -> x of an impression not yet clicked
        self._loaded = not self.context.attached
        self._dirty = 0
        self._lock = threading.RLock()

    # -- persistence ---------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        row = self.context.load_state()
        if row is not None and (row[1] or {}).get("features") == list(FEATURES):
            data = np.load(io.BytesIO(row[0]))
            self.A, self.b = data["A"], data["b"]
            meta = row[1] or {}
            self.impressions = int(meta.get("impressions", 0))
            self.rewards = int(meta.get("rewards", 0))
            self.last_event_id = int(meta.get("last_event_id", 0))
        cursor = self.last_event_id
        # events stored after the last checkpoint (after a bulk ingestion of 10M events
        # minutes of reading: shown when the host shows progress)
        bar = None
        while True:
            events = self.context.events(cursor, kinds=LEARN_KINDS, limit=CATCH_UP_BATCH)
            if not events:
                break
            self._learn(events)
            cursor = events[-1].id
            if bar is None and len(events) == CATCH_UP_BATCH:  # more to come: a long read
                bar = progress_bar(desc="bandit: learning from stored events", unit="events",
                                   enabled=self.context.progress, leave=False)
            if bar is not None:
                bar.update(len(events))
        if bar is not None:
            bar.close()

    def warm_up(self) -> None:
        """Load the posterior and the popularity counts now rather than on first use."""
        with self._lock:
            self._ensure_loaded()
            self.popularity()

    def flush(self) -> None:
        """Write the posterior to ``learner_states``."""
        with self._lock:
            if not self.context.attached or not self._dirty:
                return
            buf = io.BytesIO()
            np.savez(buf, A=self.A, b=self.b)
            meta = {"features": list(FEATURES), "impressions": self.impressions,
                    "rewards": self.rewards, "last_event_id": self.last_event_id}
            self.context.save_state(buf.getvalue(), meta)
            self._dirty = 0

    # -- features ------------------------------------------------------------------------
    def popularity(self) -> dict[int, int]:
        """Events per item id (impressions and skips excluded), counted once then kept up."""
        if self._popularity is None:
            self._popularity = dict(self.context.item_counts() or {})  # our own copy
            self._max_pop = max(self._popularity.values(), default=1)
        return self._popularity

    def features(self, user_id: int | None, candidates: Sequence[int],
                 scores: Sequence[float] | None) -> np.ndarray:
        """The feature matrix [len(candidates), len(FEATURES)] of a candidate list."""
        n = len(candidates)
        x = np.zeros((n, len(FEATURES)))
        x[:, 0] = 1.0
        if scores is not None and n:
            s = np.asarray(scores, dtype=np.float64)
            finite = np.isfinite(s)
            if finite.any():
                mu, sd = s[finite].mean(), s[finite].std()
                z = (s - mu) / sd if sd > 1e-12 else np.zeros(n)
                z[~finite] = z[finite].min() if finite.any() else 0.0
                x[:, 1] = np.clip(z, -3.0, 3.0)
        x[:, 2] = 1.0 / np.log2(np.arange(n) + 2.0)
        pop = self.popularity()
        counts = np.array([pop.get(int(c), 0) for c in candidates], dtype=np.float64)
        x[:, 3] = np.log1p(counts) / np.log1p(max(self._max_pop, 1))
        x[:, 4] = (counts < self.new_item_max_events).astype(np.float64)
        x[:, 5] = self._affinity(user_id, candidates)
        return x

    def _affinity(self, user_id: int | None, candidates: Sequence[int]) -> np.ndarray:
        out = np.zeros(len(candidates))
        if user_id is None:
            return out
        space = self.context.item_space()
        state = self.context.user_vector(user_id)
        if state is None or space is None:
            return out
        u = state.numpy().astype(np.float64)
        u /= max(np.linalg.norm(u), 1e-12)
        for k, item in enumerate(candidates):
            v = space.vector(int(item))
            if v is not None and v.shape[0] == u.shape[0]:
                v = v.numpy().astype(np.float64)
                out[k] = float(u @ v / max(np.linalg.norm(v), 1e-12))
        return out

    def _x_for(self, event: "Event") -> np.ndarray:
        """The features an event's item had when shown (cached, stored in the context, or
        recomputed from the rank and score the context carries)."""
        return self._x_lazy(event, _Rows(1))

    def _x_lazy(self, event: "Event", rows: "_Rows") -> np.ndarray:
        """:meth:`_x_for`, with a recomputed row taken from ``rows`` and its popularity
        columns filled in later (:meth:`_Rows.fill`, before anything reads them): the
        same values as ``features(None, [item], None)[0]`` with the rank's column."""
        key = (event.user_id, event.item_id)
        if key in self._shown:
            return self._shown[key]
        ctx = event.context or {}
        if isinstance(ctx.get("x"), list) and len(ctx["x"]) == len(FEATURES):
            return np.asarray(ctx["x"], dtype=np.float64)
        rank = ctx.get("rank")
        prior = (1.0 / np.log2(float(rank) + 2.0)
                 if isinstance(rank, (int, float)) and rank >= 0 else 0.5)
        pop = self.popularity()
        x = rows.take(pop.get(int(event.item_id), 0), max(self._max_pop, 1), prior)
        if rows.size == 1:
            rows.fill(self.new_item_max_events)
        return x

    def feature_vector(self, user_id: int, item_id: int) -> list[float] | None:
        """The features ``explore`` computed for a shown item (to store with the impression)."""
        x = self._shown.get((user_id, item_id))
        return None if x is None else [round(float(v), 6) for v in x]

    # -- learning ------------------------------------------------------------------------
    def _learn(self, events: Sequence["Event"]) -> None:
        """Fold events into the posterior, in id order: the same state as one event at a
        time (the sums over ``x x^T`` and ``x`` are added up in event order), with the
        features of a batch computed together rather than per event."""
        pop = self.popularity()
        rows = _Rows(len(events))
        to_a: list[np.ndarray] = []  # the x of each x x^T added to A, in order
        to_b: list[np.ndarray] = []  # the x of each reward added to b, in order
        try:
            for e in events:
                if e.id <= self.last_event_id:
                    continue
                self.last_event_id = e.id
                if e.kind not in LEARN_KINDS:
                    if e.weight > 0:
                        pop[e.item_id] = pop.get(e.item_id, 0) + 1
                        self._max_pop = max(self._max_pop, pop[e.item_id])
                    continue
                key = (e.user_id, e.item_id)
                if e.kind == "impression":
                    x = self._x_lazy(e, rows)
                    to_a.append(x)
                    self.impressions += 1
                    self._pending.put(key, x)
                elif e.kind in REWARD_KINDS:
                    pop[e.item_id] = pop.get(e.item_id, 0) + 1
                    self._max_pop = max(self._max_pop, pop[e.item_id])
                    x = self._pending.pop(key, None)
                    if x is None:  # a click on something we did not see being shown
                        x = self._x_lazy(e, rows)
                        to_a.append(x)
                    to_b.append(x)
                    self.rewards += 1
                else:  # skip: an impression without reward
                    if self._pending.pop(key, None) is None:
                        to_a.append(self._x_lazy(e, rows))
                self._dirty += 1
        finally:  # the events counted so far are in the sums too, even if one failed
            rows.fill(self.new_item_max_events)
            self.A = _add_in_order(self.A, to_a, outer=True)
            self.b = _add_in_order(self.b, to_b, outer=False)

    def wanted_kinds(self) -> set[str]:
        """After a bulk ingestion: impressions, skips and rewards (popularity is re-read).
        None (an empty set) when the posterior was not loaded yet (a fresh process, as
        ``polyrec ingest``): loading it now catches up from the log, the ingested events
        included, so they are not read a second time to be handed over."""
        with self._lock:
            self._popularity = None
            if not self._loaded:
                self._ensure_loaded()
                return set()
        return set(LEARN_KINDS)

    def observe(self, events: Sequence["Event"]) -> None:
        with self._lock:
            self._ensure_loaded()
            self._learn(events)
            if self._dirty >= self.flush_every:
                self.flush()

    # -- exploring -----------------------------------------------------------------------
    def posterior(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance) of the weights."""
        self._ensure_loaded()
        cov = np.linalg.inv(self.A)
        return cov @ self.b, (self.noise ** 2) * cov

    def sample(self) -> np.ndarray:
        mean, cov = self.posterior()
        return self.rng.multivariate_normal(mean, (cov + cov.T) / 2.0, method="cholesky")

    def explore(self, candidates: list[int], scores: list[float], *, user_id: int | None = None,
                k: int | None = None) -> list[int]:
        """Keep the top ``k - m`` candidates, give ``m = round(share * k)`` slots (spread
        evenly over the list) to the best of the rest under a posterior sample."""
        with self._lock:
            self._ensure_loaded()
            n = len(candidates)
            k = n if k is None else min(int(k), n)
            m = int(round(self.share * k))  # k <= n, so the pool beyond k - m holds m items
            x = self.features(user_id, candidates, scores)
            if user_id is not None:
                for item, row in zip(candidates, x):
                    self._shown.put((user_id, int(item)), row)
            if m <= 0:
                return list(candidates)
            keep = list(candidates[:k - m])
            theta = self.sample()
            rest = np.arange(k - m, n)
            sampled = x[rest] @ theta
            picks = [candidates[i] for i in rest[np.argsort(-sampled, kind="stable")[:m]]]
            slots = sorted({min(k - 1, int(round((j + 1) * k / (m + 1)))) for j in range(m)})
            while len(slots) < m:  # collisions on tiny lists: take the last free slots
                slots = sorted(set(slots) | {max(set(range(k)) - set(slots))})
            out: list[int] = []
            pick_iter, keep_iter = iter(picks), iter(keep)
            for pos in range(k):
                out.append(next(pick_iter) if pos in slots else next(keep_iter))
            chosen = set(out)
            return out + [c for c in candidates if c not in chosen]

    def describe(self, user_id: int | None = None) -> dict[str, Any]:
        """The posterior mean per feature and how much the bandit has seen."""
        with self._lock:
            self._ensure_loaded()
            mean, _ = self.posterior()
            return {"features": dict(zip(FEATURES, [round(float(v), 4) for v in mean])),
                    "impressions": self.impressions, "rewards": self.rewards,
                    "share": self.share, "last_event_id": self.last_event_id}


@hookimpl
def register_feedback_learners(register):  # type: ignore[no-untyped-def]
    register(ThompsonBandit)
