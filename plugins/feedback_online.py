"""Online user state: a decayed, kind-weighted average of the item vectors a user acted on.

After each stored event the user's state moves at once:

    num <- d * num + w * v_item        den <- d * den + |w|        state = num / den

with ``w`` the event's weight (kind weights from the feedback settings; a skip weighs
less than zero and pushes away), ``d`` the per-event decay (times an optional half-life
by event time). An event delivered late (its time before one already folded in: an app
that synced offline clicks) counts as old as its time says: ``w`` times ``decay`` per later
event of the session (at least one) and the half-life from the newest time, with no decay
of the state; in the session it takes the place its time gives it. A brand-new user has a
state after their first event (cold start). The
item vectors are the trained model's fused item vectors (else the stored vectors of one
encoder), so ``Engine.recommend`` can score with the state directly or blend it into the
model's user vector (:func:`polyrec.feedback.events.user_vector`).

Durability: states are written to ``user_states`` every ``flush_every`` updates and on
``Engine.close``; what a crash loses is rebuilt from the event log, which is always
written first. A retrain "folds the state back in": the new model's space starts after
the events it trained on, so states restart from the events that came later.

Session intent: the learner also keeps each user's last ``session_size`` items and scores
every item by its similarity to them (cosine, weighted by event weight and recency
``session_decay``) in every item space there is -- the trained model's item vectors and
each encoder's stored vectors (bert text, kg) -- so a few clicks of a rare genre reach
the next recommendations even where the model's space mixes that genre with others.
The learner uses only its :class:`~polyrec.contracts.LearnerContext`.
"""
from __future__ import annotations

import bisect

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from polyrec import FeedbackLearner, LearnerContext, hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from polyrec import Event, ItemSpace


@dataclass
class _State:
    num: np.ndarray
    den: float = 0.0
    n: int = 0
    last_ts: float | None = None
    last_id: int = 0
    dirty: bool = False
    recent: list[tuple[int, float, float]] = field(default_factory=list)  # (item, weight, ts)


class OnlineUserLearner(FeedbackLearner):
    """Per-user decayed average of item vectors plus the recent items (session),
    updated on every event."""

    name = "online"

    def __init__(self, context: LearnerContext | None = None, *, decay: float = 0.9,
                 half_life_days: float | None = None, flush_every: int = 256,
                 cache_size: int = 100_000, session_size: int = 10, session_decay: float = 0.7,
                 session_weight: float = 1.0, session_spaces: str = "all",
                 session_boost: float = 20.0, **options: Any) -> None:
        super().__init__(context, **options)
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"decay must be in (0, 1], not {decay}")
        if not 0.0 < float(session_decay) <= 1.0:
            raise ValueError(f"session_decay must be in (0, 1], not {session_decay}")
        if int(session_size) < 0 or float(session_weight) < 0:
            raise ValueError("session_size and session_weight must not be negative")
        self.decay = float(decay)
        self.half_life_s = float(half_life_days) * 86400.0 if half_life_days else None
        self.flush_every = max(1, int(flush_every))
        self.cache_size = max(1, int(cache_size))
        self.session_size = int(session_size)
        self.session_decay = float(session_decay)
        self.session_weight = float(session_weight)
        self.session_boost = float(session_boost)
        spaces = str(session_spaces or "all")
        self.session_spaces = None if spaces == "all" else {x.strip() for x in spaces.split(",") if x.strip()}
        self._states: OrderedDict[int, _State] = OrderedDict()
        self._space_name: str | None = None
        self._space: "ItemSpace | None" = None
        self._vectors: np.ndarray | None = None
        self._missing: set[int] = set()  # items of events that had no vector in this space
        self._aligned: dict[str, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._dirty = 0
        self._lock = threading.RLock()

    # -- the item space ------------------------------------------------------------------
    def _current_space(self) -> "ItemSpace | None":
        space = self.context.item_space()
        if space is None:
            return None
        if space.name != self._space_name:  # a new model or encoder: rebuild lazily
            self._states.clear()
            self._dirty = 0
            self._space_name = space.name
        if space is not self._space:  # (the same space may have grown: new items)
            self._space = space
            self._vectors = space.vectors.detach().float().cpu().numpy()
            self._missing = set()
        return space

    def _vector(self, item_id: int) -> np.ndarray | None:
        assert self._space is not None and self._vectors is not None
        i = self._space.index.get(item_id)
        if i is None and item_id not in self._missing:  # added after the space was built?
            self._missing.add(item_id)
            space = self.context.item_space(refresh=True)
            if space is not None and space.name == self._space_name and item_id in space.index:
                self._space = space
                self._vectors = space.vectors.detach().float().cpu().numpy()
                i = space.index[item_id]
        return None if i is None else self._vectors[i]

    # -- state ---------------------------------------------------------------------------
    def _load(self, user_id: int, space: "ItemSpace") -> _State:
        """The user's stored state in this space, caught up with the event log."""
        return self._load_many([user_id], space)[user_id]

    def _load_many(self, user_ids: Sequence[int], space: "ItemSpace") -> dict[int, _State]:
        """Stored states of these users in this space, each caught up with the user's
        events after it; the session (recent items) is rebuilt from the events since the
        space's cutoff. Two queries however many users."""
        rows = self.context.load_user_states(list(user_ids))
        states = {}
        for user_id in user_ids:
            state = _State(num=np.zeros(space.dim, dtype=np.float64))
            state.last_id = space.cutoff
            states[user_id] = state
        for user_id, row in rows.items():
            if row["space"] == space.name and row["dim"] == space.dim and user_id in states:
                state = states[user_id]
                state.num = np.frombuffer(row["vector"], dtype=np.float32).astype(np.float64)
                state.den, state.n, state.last_ts = float(row["weight"]), int(row["n_events"]), row["last_ts"]
                state.last_id = max(int(row["last_event_id"]), space.cutoff)
        start = space.cutoff if self.session_size else min(s.last_id for s in states.values())
        for event in self.context.events(after_id=start, user_ids=list(user_ids)):
            state = states[event.user_id]
            if event.id <= state.last_id:
                self._remember(state, event)  # already folded into the stored vector
            else:
                self._apply(state, event)
        for user_id, state in states.items():
            self._states[user_id] = state
        self._evict()
        return states

    def _get(self, user_id: int, space: "ItemSpace") -> _State:
        state = self._states.get(user_id)
        if state is None:
            return self._load(user_id, space)
        self._states.move_to_end(user_id)
        return state

    def _remember(self, state: _State, event: "Event") -> None:
        """Keep the event's item among the user's recent ones (the session), in the order
        of their times: an event delivered late takes the place its time gives it (the
        oldest fall out), and an item keeps its latest time."""
        if not self.session_size or not event.weight:
            return
        ts = float(event.ts)
        if any(r[0] == event.item_id and r[2] > ts for r in state.recent):
            return  # the item was acted on later already
        state.recent = [r for r in state.recent if r[0] != event.item_id]
        bisect.insort(state.recent, (event.item_id, float(event.weight), ts), key=lambda r: r[2])
        del state.recent[:-self.session_size]

    def _apply(self, state: _State, event: "Event") -> None:
        if event.id <= state.last_id:
            return
        state.last_id = event.id
        state.dirty = True
        self._dirty += 1
        weight = float(event.weight)
        if weight == 0.0:
            return
        later = sum(1 for r in state.recent if r[2] > event.ts)  # before it joins them
        self._remember(state, event)
        vector = self._vector(event.item_id)
        if vector is None:  # no vector for this item yet (not encoded)
            return
        if state.last_ts is not None and event.ts < state.last_ts:
            # delivered late (older than an event already folded in): it counts as old as
            # its time says -- one decay per later event the session knows of (at least
            # one), and the half-life from the newest -- and the state does not decay
            w = weight * self.decay ** max(1, later)
            if self.half_life_s:
                w *= 0.5 ** ((state.last_ts - event.ts) / self.half_life_s)
            state.num = state.num + w * vector
            state.den = state.den + abs(w)
            state.n += 1
            return
        d = self.decay if state.n else 1.0
        if self.half_life_s and state.last_ts is not None:
            d *= 0.5 ** (max(0.0, event.ts - state.last_ts) / self.half_life_s)
        state.num = d * state.num + weight * vector
        state.den = d * state.den + abs(weight)
        state.n += 1
        state.last_ts = event.ts

    def _evict(self) -> None:
        while len(self._states) > self.cache_size:
            user_id, state = next(iter(self._states.items()))
            if state.dirty:
                self.flush()
            self._states.pop(user_id, None)

    # -- scoring ---------------------------------------------------------------------------
    def _aligned_matrix(self, key: str, space: "ItemSpace", item_ids: Sequence[int],
                        normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The space's vectors (L2-normalized unless ``normalize`` is False) in the order
        of ``item_ids`` (zero rows where an item has none) and which rows are real;
        cached per space and item list."""
        tag = (space.name, len(space.item_ids), len(item_ids), int(item_ids[-1]) if len(item_ids) else None)
        cached = self._aligned.get(key)
        if cached is not None and cached[0] == tag:
            return cached[1], cached[2]
        index = torch.tensor([space.index.get(int(i), -1) for i in item_ids], dtype=torch.long)
        has = index >= 0
        matrix = torch.zeros(len(item_ids), space.dim)
        rows = space.vectors[index[has]].float()
        if normalize:  # cosine around the space's centre: what the items share is no signal
            rows = torch.nn.functional.normalize(rows - self._centre(key, space), dim=1)
        matrix[has] = rows
        self._aligned[key] = (tag, matrix, has)
        return matrix, has

    def _centre(self, key: str, space: "ItemSpace") -> torch.Tensor:
        """The mean vector of a space (cached with the space)."""
        cached = self._aligned.get(key + ":centre")
        if cached is not None and cached[0] == space.name:
            return cached[1]
        centre = space.vectors.float().mean(0)
        self._aligned[key + ":centre"] = (space.name, centre, None)  # type: ignore[assignment]
        return centre

    def _session_weights(self, state: _State) -> list[tuple[int, float]]:
        """(item, weight) of the recent items: event weight times ``session_decay`` per
        later event (and the half-life by time, when set)."""
        out = []
        last = len(state.recent) - 1
        newest = state.recent[-1][2] if state.recent else 0.0
        for j, (item, weight, ts) in enumerate(state.recent):
            r = weight * self.session_decay ** (last - j)
            if self.half_life_s:
                r *= 0.5 ** (max(0.0, newest - ts) / self.half_life_s)
            out.append((item, r))
        return out

    @staticmethod
    def _standardize(x: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        if int(has.sum()) < 2:
            return out
        v = x[has]
        sd = float(v.std())
        out[has] = (v - v.mean()) / sd if sd > 1e-12 else 0.0
        return out

    def _session_vectors(self, user_id: int) -> list[tuple[str, "ItemSpace", torch.Tensor, torch.Tensor]]:
        """Per item space: (name, space, the recent items' centred unit vectors, their
        recency weights normalized to sum 1 in absolute value)."""
        with self._lock:
            space = self._current_space()
            if space is None or not self.session_size:
                return []
            recent = self._session_weights(self._get(user_id, space))
        out = []
        for name, sp in self.context.item_spaces().items():
            if self.session_spaces is not None and name not in self.session_spaces:
                continue
            rows = [(sp.index[i], r) for i, r in recent if i in sp.index and r]
            norm = sum(abs(r) for _, r in rows)
            if not rows or norm <= 0:
                continue
            vectors = torch.nn.functional.normalize(
                sp.vectors[torch.tensor([i for i, _ in rows])].float() - self._centre(name, sp), dim=1)
            out.append((name, sp, vectors, torch.tensor([r / norm for _, r in rows])))
        return out

    @staticmethod
    def _agreement(vectors: torch.Tensor, weights: torch.Tensor) -> float | None:
        """Weighted mean pairwise cosine of the recent items (centred: unrelated items
        are near 0), clipped to 0..1; None with fewer than two items."""
        if vectors.shape[0] < 2:
            return None
        w = weights.abs()
        pair = torch.outer(w, w)
        pair.fill_diagonal_(0.0)
        c = float(((vectors @ vectors.T) * pair).sum() / pair.sum().clamp(min=1e-12))
        return max(0.0, min(1.0, c))

    def session_scores(self, user_id: int, item_ids: Sequence[int]) -> torch.Tensor | None:
        """Item-to-item similarity to the user's recent items (cosine around each space's
        centre, weighted by recency) in every item space, each standardized, averaged
        with the weight of how much the recent items agree in that space (a space in
        which they are alike is the one that tells what they share); NaN where no space
        has the item; None without a session."""
        parts = self._session_vectors(user_id)
        if not parts:
            return None
        total = torch.zeros(len(item_ids))
        weight = torch.zeros(len(item_ids))
        for name, sp, vectors, weights in parts:
            matrix, has = self._aligned_matrix(name, sp, item_ids)
            agree = self._agreement(vectors, weights)
            w = 1.0 if agree is None else agree + 0.05
            total += w * self._standardize((matrix @ vectors.T) @ weights, has)
            weight += w * has.float()
        if not bool((weight > 0).any()):
            return None
        out = total / weight.clamp(min=1e-12)
        out[weight == 0] = float("nan")
        return out

    def coherence(self, user_id: int) -> float:
        """How alike the user's recent items are, 0..1: their weighted mean pairwise
        cosine (centred) in the item space where they agree most. 0 with fewer than
        two items."""
        values = [self._agreement(v, w) for _, _, v, w in self._session_vectors(user_id)]
        values = [v for v in values if v is not None]
        return max(values) if values else 0.0

    # -- the FeedbackLearner contract ----------------------------------------------------
    def observe(self, events: Sequence["Event"]) -> None:
        with self._lock:
            space = self._current_space()
            if space is None:
                return  # no item vectors yet: states are built from the log later
            missing = list({e.user_id for e in events if e.user_id not in self._states})
            for start in range(0, len(missing), 900):
                self._load_many(missing[start:start + 900], space)
            for event in events:
                if event.id <= space.cutoff:
                    continue  # the model already learned from it
                self._apply(self._get(event.user_id, space), event)
            if self._dirty >= self.flush_every:
                self.flush()

    def wanted_kinds(self) -> set[str] | None:
        """Kinds worth handing over after a bulk ingestion: none while there are no item
        vectors (states are built from the log once there are), else every weighted kind."""
        if self._current_space() is None:
            return set()
        return {k for k, w in self.context.settings["kind_weights"].items() if w}

    def user_state(self, user_id: int) -> torch.Tensor | None:
        """The user's online vector (None when they have no usable event since the model)."""
        with self._lock:
            space = self._current_space()
            if space is None:
                return None
            state = self._get(user_id, space)
            if state.den <= 1e-9:
                return None
            vector = state.num / state.den
            if not np.isfinite(vector).all() or np.linalg.norm(vector) <= 1e-9:
                return None
            return torch.from_numpy(vector.astype(np.float32))

    def prefetch(self, user_ids: Sequence[int]) -> None:
        """Load the states of these users that are not in memory, 900 per two queries
        (as many as the cache holds)."""
        with self._lock:
            space = self._current_space()
            if space is None:
                return
            missing = list(dict.fromkeys(u for u in user_ids if u not in self._states))
            missing = missing[:max(0, int(self.cache_size))]
            for start in range(0, len(missing), 900):
                self._load_many(missing[start:start + 900], space)

    def strength(self, user_id: int) -> float:
        """The user's decayed total event weight (0 without online events), raised by
        ``session_boost`` times the session's :meth:`coherence`: recent items that are
        alike are explicit interest and weigh more."""
        with self._lock:
            space = self._current_space()
            weight = 0.0 if space is None else float(self._get(user_id, space).den)
        if weight > 0 and self.session_boost > 0:
            weight *= 1.0 + self.session_boost * self.coherence(user_id)
        return weight

    def scores(self, user_id: int, item_ids: Sequence[int]) -> torch.Tensor | None:
        """The long-term state . item vectors and the session's item-to-item similarity,
        each standardized, mixed ``1 : session_weight``; NaN where neither knows the item."""
        state = self.user_state(user_id)
        parts: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        space = self._space
        if state is not None and space is not None and len(item_ids):
            matrix, has = self._aligned_matrix("__state__", space, item_ids, normalize=False)
            parts.append((self._standardize(matrix @ state, has), has, 1.0))
        if self.session_weight > 0:
            session = self.session_scores(user_id, item_ids)
            if session is not None:
                has = torch.isfinite(session)
                parts.append((torch.nan_to_num(session), has, self.session_weight))
        if not parts:
            return None
        total = torch.zeros(len(item_ids))
        weight = torch.zeros(len(item_ids))
        for values, has, w in parts:
            total += w * values * has
            weight += w * has.float()
        out = total / weight.clamp(min=1e-12)
        out[weight == 0] = float("nan")
        return out

    def describe(self, user_id: int | None) -> dict[str, Any]:
        """What the learner holds for a user (for `polyrec feedback state`)."""
        with self._lock:
            space = self._current_space()
            if space is None or user_id is None:
                return {"space": None, "events": 0, "weight": 0.0}
            state = self._get(user_id, space)
            return {"space": space.name, "events": state.n, "weight": state.den,
                    "last_event_id": state.last_id, "last_ts": state.last_ts,
                    "session": [item for item, _, _ in state.recent]}

    def flush(self) -> int:
        """Write every changed state to ``user_states``; returns how many."""
        with self._lock:
            if self._space_name is None or not self.context.attached:
                return 0
            dirty = [(u, s) for u, s in self._states.items() if s.dirty]
            if not dirty:
                return 0
            self.context.save_user_states([
                {"user_id": u, "space": self._space_name, "dim": int(s.num.shape[0]),
                 "vector": s.num.astype(np.float32).tobytes(), "weight": s.den,
                 "n_events": s.n, "last_ts": s.last_ts, "last_event_id": s.last_id}
                for u, s in dirty])
            for _, state in dirty:
                state.dirty = False
            self._dirty = 0
            return len(dirty)

    def forget(self) -> None:
        """Drop the in-memory states (they are reloaded from the store and the log)."""
        with self._lock:
            self.flush()
            self._states.clear()
            self._aligned.clear()
            self._space_name = self._space = self._vectors = None


@hookimpl
def register_feedback_learners(register):  # type: ignore[no-untyped-def]
    register(OnlineUserLearner)
