"""Online user state: a decayed, kind-weighted average of the item vectors a user acted on.

After each stored event the user's state moves at once:

    num <- d * num + w * v_item        den <- d * den + |w|        state = num / den

with ``w`` the event's weight (kind weights from the feedback settings; a skip weighs
less than zero and pushes away), ``d`` the per-event decay (times an optional half-life
by event time). A brand-new user has a state after their first event (cold start). The
item vectors are the trained model's fused item vectors (else the stored vectors of one
encoder), so ``Engine.recommend`` can score with the state directly or blend it into the
model's user vector (:func:`polyrec.feedback.events.user_vector`).

Durability: states are written to ``user_states`` every ``flush_every`` updates and on
``Engine.close``; what a crash loses is rebuilt from the event log, which is always
written first. A retrain "folds the state back in": the new model's space starts after
the events it trained on, so states restart from the events that came later.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from sqlalchemy import select

from polyrec import hookimpl
from polyrec.contracts import FeedbackLearner
from polyrec.store.models import UserState

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine
    from polyrec.feedback.events import Event, ItemSpace


@dataclass
class _State:
    num: np.ndarray
    den: float = 0.0
    n: int = 0
    last_ts: float | None = None
    last_id: int = 0
    dirty: bool = False


class OnlineUserLearner(FeedbackLearner):
    """Per-user decayed average of item vectors, updated on every event."""

    name = "online"

    def __init__(self, engine: "Engine | None" = None, *, decay: float = 0.9,
                 half_life_days: float | None = None, flush_every: int = 256,
                 cache_size: int = 100_000, **options: Any) -> None:
        super().__init__(**options)
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"decay must be in (0, 1], not {decay}")
        self.engine = engine
        self.decay = float(decay)
        self.half_life_s = float(half_life_days) * 86400.0 if half_life_days else None
        self.flush_every = max(1, int(flush_every))
        self.cache_size = max(1, int(cache_size))
        self._states: OrderedDict[int, _State] = OrderedDict()
        self._space_name: str | None = None
        self._space: "ItemSpace | None" = None
        self._vectors: np.ndarray | None = None
        self._missing: set[int] = set()  # items of events that had no vector in this space
        self._dirty = 0
        self._lock = threading.RLock()

    # -- the item space ------------------------------------------------------------------
    def _current_space(self) -> "ItemSpace | None":
        from polyrec.feedback.events import hub
        if self.engine is None:
            return None
        space = hub(self.engine).item_space()
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
            from polyrec.feedback.events import hub
            space = hub(self.engine).item_space(refresh=True)  # type: ignore[arg-type]
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
        """Stored states of these users (900 at most) in this space, each caught up with
        the user's events after it: two queries however many users."""
        from polyrec.feedback.events import stored_events
        assert self.engine is not None
        with self.engine.store.session() as s:
            rows = s.execute(select(UserState).where(UserState.user_id.in_(list(user_ids)))
                             .where(UserState.learner == self.name)).scalars().all()
        states = {}
        for user_id in user_ids:
            state = _State(num=np.zeros(space.dim, dtype=np.float64))
            state.last_id = space.cutoff
            states[user_id] = state
        for row in rows:
            if row.space == space.name and row.dim == space.dim:
                state = states[row.user_id]
                state.num = np.frombuffer(row.vector, dtype=np.float32).astype(np.float64)
                state.den, state.n, state.last_ts = float(row.weight), int(row.n_events), row.last_ts
                state.last_id = max(int(row.last_event_id), space.cutoff)
        start = min(state.last_id for state in states.values())
        for event in stored_events(self.engine, after_id=start, user_ids=list(user_ids)):
            self._apply(states[event.user_id], event)  # skips what the state already holds
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

    def _apply(self, state: _State, event: "Event") -> None:
        if event.id <= state.last_id:
            return
        state.last_id = event.id
        state.dirty = True
        self._dirty += 1
        weight = float(event.weight)
        if weight == 0.0:
            return
        vector = self._vector(event.item_id)
        if vector is None:  # no vector for this item yet (not encoded)
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
        from polyrec.feedback.events import hub
        if self.engine is None or self._current_space() is None:
            return set()
        return {k for k, w in hub(self.engine).config["kind_weights"].items() if w}

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

    def strength(self, user_id: int) -> float:
        """The user's decayed total event weight (0 without online events)."""
        with self._lock:
            space = self._current_space()
            return 0.0 if space is None else float(self._get(user_id, space).den)

    def describe(self, user_id: int) -> dict[str, Any]:
        """What the learner holds for a user (for `polyrec feedback state`)."""
        with self._lock:
            space = self._current_space()
            if space is None:
                return {"space": None, "events": 0, "weight": 0.0}
            state = self._get(user_id, space)
            return {"space": space.name, "events": state.n, "weight": state.den,
                    "last_event_id": state.last_id, "last_ts": state.last_ts}

    def flush(self) -> int:
        """Write every changed state to ``user_states``; returns how many."""
        from polyrec.store.catalog import _insert
        with self._lock:
            if self.engine is None or self._space_name is None:
                return 0
            dirty = [(u, s) for u, s in self._states.items() if s.dirty]
            if not dirty:
                return 0
            stamp = time.time()
            rows = [{"user_id": u, "learner": self.name, "space": self._space_name,
                     "dim": int(s.num.shape[0]), "vector": s.num.astype(np.float32).tobytes(),
                     "weight": s.den, "n_events": s.n, "last_ts": s.last_ts,
                     "last_event_id": s.last_id, "updated_at": stamp} for u, s in dirty]
            with self.engine.store.session() as sess:
                stmt = _insert(sess, UserState.__table__)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["user_id", "learner"],
                    set_={c: stmt.excluded[c] for c in ("space", "dim", "vector", "weight",
                                                        "n_events", "last_ts", "last_event_id",
                                                        "updated_at")})
                sess.execute(stmt, rows)
            for _, state in dirty:
                state.dirty = False
            self._dirty = 0
            return len(rows)

    def forget(self) -> None:
        """Drop the in-memory states (they are reloaded from the store and the log)."""
        with self._lock:
            self.flush()
            self._states.clear()
            self._space_name = self._space = self._vectors = None


@hookimpl
def register_feedback_learners(register):  # type: ignore[no-untyped-def]
    register(OnlineUserLearner)
