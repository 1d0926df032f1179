"""The per-process services of one Engine, each created once under a lock.

An Engine owns one :class:`Services`: the loaded recommendation pipeline, the feedback
hub (learners, item space, settings), the searcher and the background encoder of newly
stored items (encode on arrival). Stages reach them through
``engine.services`` instead of keeping private entries on the Engine, so two threads
asking at once get the same instance, and a new model replaces the old one in one place.
This module sits above every stage: it is the only place that wires a later stage
(feedback) into an earlier one (the recommender's request-time hooks).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.encode.on_arrival import ArrivalEncoder
    from polyrec.engine import Engine
    from polyrec.feedback.events import FeedbackHub
    from polyrec.rank.recommend import Recommender
    from polyrec.retrieve.search import Searcher

T = TypeVar("T")


class Services:
    """Lazily created, lock-guarded services of one Engine."""

    def __init__(self, engine: "Engine") -> None:
        self._engine = engine
        self._lock = threading.RLock()
        self._made: dict[str, Any] = {}
        self._closed = False

    def _get(self, name: str, make: Callable[[], T]) -> T:
        found = self._made.get(name)
        if found is not None:
            return found
        with self._lock:  # double-checked: only one thread builds it
            found = self._made.get(name)
            if found is None:
                found = self._made[name] = make()
            return found

    def started(self, name: str) -> Any | None:
        """The service ``name`` if it was created, else None (never creates it)."""
        return self._made.get(name)

    # -- the recommendation pipeline -----------------------------------------------------
    def recommender(self) -> "Recommender":
        """The live pipeline, loaded on first use (ModelNotTrainedError when none)."""
        return self._get("recommender", self._make_recommender)

    def _make_recommender(self) -> "Recommender":
        from polyrec.feedback import events
        from polyrec.rank.recommend import Recommender
        engine = self._engine

        def online(rec: Any, user_id: int, scores: Any, enabled: bool | None) -> Any:
            return events.online_scores(engine, rec, user_id, scores, online=enabled)

        def explore(rec: Any, user_id: int, scores: Any, picked: list, k: int,
                    enabled: bool | None) -> list:
            return events.explore_indices(engine, rec, user_id, scores, picked, k, explore=enabled)

        def prefetch(rec: Any, user_ids: list, enabled: bool | None) -> None:
            events.prefetch_users(engine, rec, user_ids, online=enabled)

        return Recommender(engine, online_hook=online, explore_hook=explore,
                           prefetch_hook=prefetch)

    def reset_recommender(self) -> None:
        """Drop the loaded pipeline: the next request loads the live version again."""
        with self._lock:
            self._made.pop("recommender", None)

    # -- feedback ------------------------------------------------------------------------
    def feedback(self) -> "FeedbackHub":
        """The feedback hub: settings, learners and the item space they work in."""
        from polyrec.feedback.events import FeedbackHub
        return self._get("feedback", lambda: FeedbackHub(self._engine))

    def interactions_stored(self, after_id: int, total: int | None = None) -> int:
        """Hand interactions stored by another writer (ids > ``after_id``; ``total`` of
        them, when known, for the progress display) to the learners."""
        return self.feedback().handoff(after_id, total=total)

    # -- search --------------------------------------------------------------------------
    def searcher(self) -> "Searcher":
        from polyrec.retrieve.search import Searcher
        return self._get("searcher", lambda: Searcher(self._engine))

    # -- encode on arrival ---------------------------------------------------------------
    def arrivals(self) -> "ArrivalEncoder":
        """The background worker encoding newly stored items (engine/encode/on_arrival.py);
        its thread starts with the first submission."""
        from polyrec.encode.on_arrival import ArrivalEncoder
        return self._get("arrivals", lambda: ArrivalEncoder(self._engine,
                                                            on_encoded=self.vectors_changed))

    def items_stored(self, item_ids: Iterable[int]) -> None:
        """Items were inserted or updated: encode them in the background (when the
        engine's ``encode_on_arrival`` is on)."""
        if getattr(self._engine, "encode_on_arrival", True):
            with self._lock:
                if self._closed:
                    return
            self.arrivals().submit(item_ids)

    def wait_for_encoding(self, timeout: float | None = None) -> bool:
        """True once every item handed to the background encoder was handled."""
        worker = self.started("arrivals")
        return True if worker is None else worker.wait(timeout)

    def vectors_changed(self, _report: Any = None) -> None:
        """Vectors were written by this process: the recommender and the searcher look
        at the store again at their next request (a vector rewritten in place keeps the
        counts their keys compare, so they are told)."""
        rec = self.started("recommender")
        if rec is not None:
            rec.invalidate_items()
        srch = self.started("searcher")
        if srch is not None:
            srch.vectors_rewritten()

    def lifecycle_changed(self) -> None:
        """Items were retired or restored by this process: the searcher looks at the
        store again at its next request, whatever its ``check_interval`` (the
        recommender checks its keys after every write of this process anyway)."""
        srch = self.started("searcher")
        if srch is not None:
            srch.invalidate()

    def close(self) -> None:
        """Stop the background encoder, then flush what the services hold (the
        learners' state)."""
        with self._lock:
            self._closed = True
        worker = self._made.get("arrivals")
        if worker is not None:
            worker.close()
        hub = self._made.get("feedback")
        if hub is not None:
            hub.close()
