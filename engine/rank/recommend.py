"""Serving recommendations from the trained pipeline.

A :class:`Recommender` loads the live pipeline once (the Engine keeps it in its
services) and answers requests: exact top-k over the ranker's scores, seen items
excluded, attribute filters, MMR diversity over the fused item vectors, and explanations.
The feedback stage's online blending and exploration come in as two request-time hooks
that the Engine wires in (this stage never imports a later one).
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
from sqlalchemy import func, select

from polyrec.contracts import ItemView
from polyrec.errors import ConfigError, ModelNotTrainedError, NotFoundError
from polyrec.rank.dataset import build_training_data, extend_training_data
from polyrec.rank.registry import (check_scores, good_before, live_version, ranker_label,
                                   show_model)
from polyrec.rank.retrieval import Retrieval, open_retrieval
from polyrec.rank.train import PIPELINE_ARTIFACT, build_ranker
from polyrec.rank.vector_index import IndexSettings
from polyrec.store.artifact_cache import load_cached, save_cached
from polyrec.store.artifacts import ArtifactHeader, artifact_header, from_bytes, load_artifact
from polyrec.store.catalog import external_ids, get_user_id
from polyrec.store.vector_cache import index_directory, load_arrays, save_arrays
from polyrec.store.item_lookup import ItemLookup, Titles
from polyrec.store.lifecycle import lifecycle_key
from polyrec.store.lifecycle import retired_ids as retired_ids_of
from polyrec.store.models import Interaction, Item, ItemVector, User
from polyrec.store.vectors import written_tokens

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine
    from polyrec.training_data import TrainingData

log = logging.getLogger("polyrec.models")

#: what a request does when a ranker's retrieval fails (see Recommender._plugin_failed)
SCORE_ALL = "; scoring every item instead"

#: (recommender, snapshot) pinned by the request running in this context
_PINNED: ContextVar[tuple[Any, "DataSnapshot"] | None] = ContextVar("polyrec_pinned_snapshot",
                                                                     default=None)


@dataclass(frozen=True)
class DataSnapshot:
    """What the recommender serves from, read in one database snapshot: the training
    data (positives, features), dense user index, histories, popularity and item views.
    Never changed once built (``cache`` holds values derived from it, e.g. item vectors)."""

    key: tuple
    data: "TrainingData"
    user_index: dict[int, int]
    item_index: dict[int, int]
    history: list
    popularity: torch.Tensor
    views: ItemLookup  # by dense index; read from the store when first used
    external: dict[int, str]
    titles: Mapping[int, "str | None"]
    #: internal ids of the retired items (polyrec.store.lifecycle) and their dense
    #: indices: scored like any item (their history counts), never served
    retired_ids: frozenset[int] = frozenset()
    retired: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    cache: dict[str, Any] = field(default_factory=dict)

    def live_mask(self) -> torch.Tensor | None:
        """bool [n_items]: the items that may be served (None: every item may)."""
        if not len(self.retired):
            return None
        mask = torch.ones(self.data.n_items, dtype=torch.bool)
        mask[self.retired] = False
        return mask

#: (recommender, user id, scores [n_items], online) -> blended scores.
OnlineHook = Callable[["Recommender", int, torch.Tensor, "bool | None"], torch.Tensor]
#: (recommender, user id, scores, picked indices, k, explore) -> reordered indices.
ExploreHook = Callable[["Recommender", int, torch.Tensor, list, int, "bool | None"], list]
#: (recommender, user ids, online) -> None: before a block of online hooks (batch path).
PrefetchHook = Callable[["Recommender", list, "bool | None"], None]

@dataclass
class Recommendation:
    """One recommended item: its external id, score and (when asked) why. The score is
    the click probability for a click-model pipeline (the default), else the ranker's
    score."""

    item: str
    score: float
    explanation: dict[str, Any] = field(default_factory=dict)
    title: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)



# -- serving -----------------------------------------------------------------------------
def matches(attributes: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    """True when every filter matches: equal values (case-insensitive for text), or
    membership when the attribute is a list or a space-separated token list."""
    for key, wanted in filters.items():
        if key not in attributes:
            return False
        have = attributes[key]
        options = wanted if isinstance(wanted, (list, tuple, set)) else [wanted]
        if isinstance(have, (list, tuple)):
            values = {str(v).lower() for v in have}
        else:
            values = {str(have).lower()} | set(str(have).lower().split())
        if not any(str(o).lower() in values for o in options):
            return False
    return True


ItemFilter = Callable[[ItemView], bool]


def check_filters(engine: "Engine", filters: Mapping[str, Any] | None) -> ItemFilter | None:
    """The test an item must pass for ``filters`` (None without filters), as search
    reads them: a key is an attribute field (:func:`matches`) or, when no item has that
    attribute, a query-understanding slot ('genre', 'colour', ...: the items of that
    facet). Any other key is refused with search's ValidationError (one line in the CLI,
    422 over HTTP): it would otherwise match nothing and look like an empty list."""
    if not filters:
        return None
    searcher = engine.services.searcher()
    with engine.store.snapshot() as s:
        catalog = searcher.catalog(s)
    slots = set(catalog.vocabulary.slots())
    unknown = {key: want for key, want in filters.items()
               if key not in catalog.fields and key not in slots}
    if unknown:  # the catalogue's own check names the key and the known fields
        catalog.allowed(unknown)
    on_attributes = {key: want for key, want in filters.items() if key in catalog.fields}
    on_slots = {key: want for key, want in filters.items() if key not in catalog.fields}
    in_facets = catalog.allowed(on_slots) if on_slots else None

    def passes(view: ItemView) -> bool:
        return ((not on_attributes or matches(view.attributes, on_attributes))
                and (in_facets is None or view.id in in_facets))
    return passes


def mmr(candidates: torch.Tensor, relevance: torch.Tensor, vectors: torch.Tensor, k: int,
        diversity: float) -> list[int]:
    """Maximal marginal relevance: pick ``k`` of ``candidates`` (item indices, relevance
    [c]) maximising (1 - diversity) * relevance - diversity * max similarity to those
    already picked. Relevance is min-max scaled over the candidates first."""
    if len(candidates) == 0:
        return []
    rel = relevance.float()
    span = (rel.max() - rel.min()).clamp(min=1e-12)
    rel = (rel - rel.min()) / span
    vecs = vectors[candidates].float()
    sims = vecs @ vecs.T
    chosen: list[int] = []
    max_sim = torch.full((len(candidates),), -math.inf)
    available = torch.ones(len(candidates), dtype=torch.bool)
    for _ in range(min(k, len(candidates))):
        penalty = torch.where(torch.isfinite(max_sim), max_sim, torch.zeros_like(max_sim))
        value = (1 - diversity) * rel - diversity * penalty
        value[~available] = -math.inf
        j = int(torch.argmax(value))
        chosen.append(j)
        available[j] = False
        max_sim = torch.maximum(torch.where(torch.isfinite(max_sim), max_sim,
                                            torch.full_like(max_sim, -1.0)), sims[j])
    return [int(candidates[j]) for j in chosen]


def load_ranker(engine: "Engine", version: int | None) -> tuple[Any, dict[str, Any]]:
    """(fitted ranker, {version, meta, ranker, min_rating}) of a stored pipeline version
    (the latest when None). Raises what loading raises (NotFoundError when absent)."""
    with engine.store.session() as s:
        stored = load_artifact(s, PIPELINE_ARTIFACT, version)
    return ranker_from(engine, stored)


def ranker_from(engine: "Engine", stored: Any) -> tuple[Any, dict[str, Any]]:
    """The fitted ranker of a loaded artifact (see :func:`load_ranker`)."""
    return ranker_from_payload(engine, from_bytes(stored.data), stored)


def ranker_from_payload(engine: "Engine", payload: dict[str, Any], stored: Any
                        ) -> tuple[Any, dict[str, Any]]:
    """:func:`ranker_from` for a payload already read (``stored``: its version and meta)."""
    ranker = build_ranker(engine, payload["ranker"], payload["options"])
    ranker.load_state(payload["state"])
    return ranker, {"version": stored.version, "meta": stored.meta, "ranker": payload["ranker"],
                    "min_rating": float(payload.get("min_rating", 4.0))}


class Recommender:
    """The live pipeline of one Engine, loaded once: ranker, data snapshot, item views.

    ``version`` None serves the live version (polyrec.rank.registry) and follows the live
    pointer: at most once per ``check_interval`` seconds a request compares the stored
    pointer with the one it loaded, and loads the new live version when it changed
    (``polyrec models activate``/``rollback`` or a training that went live, in any
    process).

    A ranker that fails while loading or scoring (an exception, scores of the wrong
    shape, NaN) never fails the request: the failure is logged (logger
    ``polyrec.models``) and appended to ``errors`` naming the ranker and its plugin, and
    the recommender falls back to the newest good version older than the failed one,
    else to popularity (``fallback`` says which). ``strict`` (the gate's smoke test)
    raises instead.
    """

    check_interval = 1.0
    #: How long a request for a user the data snapshot does not know yet (created after
    #: it was read) waits for a refresh that another thread is running, in seconds. Past
    #: it the user is served at once as a guest (popularity blended with what the
    #: feedback learners already know of them) while the refresh finishes in the
    #: background: under a stream of writes a new user never queues behind refreshes.
    new_user_wait = 1.0
    #: How long a request after a write through this Engine (a retire, an upsert, an
    #: event) waits for a refresh that another thread is running, in seconds, so that a
    #: process serves its own writes; past it the request is served from the previous
    #: snapshot and the refresh lands a moment later. A new user's whole wait stays
    #: within ``new_user_wait``.
    write_wait = 1.0
    #: After any write through this Engine's store a request compares the store's change
    #: keys (counts and newest ids) with the snapshot's before it is served (a process
    #: reads its own writes). Otherwise at most once per ``refresh_interval`` seconds a
    #: request has a background thread check them and serves the snapshot it has: other
    #: processes' writes show within about this delay, and no request waits for the
    #: COUNTs (tens to hundreds of milliseconds on a large store). 0: every request
    #: checks before it is served.
    refresh_interval = 0.5
    #: The most of the time the periodic checks for other processes' writes may take:
    #: the interval between them grows to ``(seconds of the last check) / check_share``
    #: when that is longer than ``refresh_interval`` (the keys' COUNTs take ~0.6 s on
    #: PostgreSQL at 10M interactions: checked every 0.5 s by each worker they kept the
    #: cores busy; with 0.1, about every 6 s).
    check_share = 0.1
    #: When a ranker's scores are inner products (``Ranker.retrieval_keys``), catalogues
    #: from ``index_settings.threshold`` items get each user's candidates from a vector
    #: index instead of scoring every item (polyrec.rank.retrieval); FAISS needed. An
    #: inverted file (IVF, inner product; an eighth of its lists scanned): on a 1M-item
    #: two-tower its recall@10 against full scoring is ~1 where HNSW's was 0.76
    #: (docs/serving.md, "Recommend at scale").
    index_settings = IndexSettings(kind="ivf")

    def __init__(self, engine: "Engine", version: int | None = None, *,
                 online_hook: OnlineHook | None = None,
                 explore_hook: ExploreHook | None = None, strict: bool = False,
                 prefetch_hook: PrefetchHook | None = None) -> None:
        self.engine = engine
        self.online_hook = online_hook
        self.explore_hook = explore_hook
        self.prefetch_hook = prefetch_hook
        self.strict = strict
        self.errors: list[dict[str, Any]] = []
        self.fallback: dict[str, Any] | None = None
        self._model_lock = threading.RLock()
        self._pinned_version = version is not None
        self.live = version if version is not None else live_version(engine)
        self._checked = time.monotonic()
        if self.live is None:
            raise ModelNotTrainedError("no trained pipeline is live in the store; run `polyrec "
                                       "train` (or Engine.train()) first, or `polyrec models "
                                       "activate VERSION` (see `polyrec models list`)")
        self._failed: set[int] = set()
        self._snap: DataSnapshot | None = None
        self._artifact_stamp: tuple | None = None  # names the loaded pipeline artifact
        self._load(self.live)
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._refresh_queued = False  # a background refresh waits behind the running one
        self._items_generation = 0  # bumped by invalidate_items(): vectors rewritten in place
        self._graph: Any = None
        self._graph_loaded = False
        self._retrieval_lock = threading.Lock()  # one index opening at a time
        self._keys_read = (-1, 0.0)  # (store writes, monotonic time) of the last key check
        self._keys_cost = 0.0  # seconds the last read of the change keys took
        self.refresh()

    # -- loading, the live pointer and fallbacks -------------------------------------------
    def _load(self, version: int, reason: str | None = None) -> None:
        """Load ``version`` as the served ranker; when that fails (not strict), fall back."""
        try:
            with self.engine.store.session() as s:
                stored = artifact_header(s, PIPELINE_ARTIFACT, version)
        except NotFoundError:
            if self.strict or self._pinned_version:
                raise
            if version == self.live and not self.errors:
                raise ModelNotTrainedError(f"the live version {version} of the pipeline is not "
                                           f"in the store; see `polyrec models list`") from None
            self._failed.add(version)
            self._fall_back(version, f"version {version} is not in the store")
            return
        try:
            ranker, info = ranker_from_payload(self.engine, self._payload(stored), stored)
        except Exception as exc:  # noqa: BLE001 - a plugin failing to load must not crash
            if self.strict:
                raise
            name = self._stored_ranker(version)
            self._record(version, name, "load", f"{ranker_label(self.engine, name)} failed to "
                                                f"load: {type(exc).__name__}: {exc}")
            self._failed.add(version)
            self._fall_back(version, self.errors[-1]["error"])
            return
        old_rating = getattr(self, "min_rating", None)
        self._artifact_stamp = (stored.name, stored.version, stored.created_at, stored.size)
        self.ranker = ranker
        self.version = info["version"]
        self.meta = info["meta"]
        self.ranker_name = info["ranker"]
        self.min_rating = info["min_rating"]
        if reason is not None:
            self.fallback = {"from": self.live, "to": self.version, "reason": reason}
        self._model_changed(old_rating)

    def _model_changed(self, old_rating: float | None) -> None:
        """Drop what was derived from the previous ranker (its item vectors); reload the
        data when the positives threshold differs."""
        if self._snap is not None:
            self._snap.cache.pop("vectors", None)
            if old_rating is not None and old_rating != self.min_rating:
                self.refresh(force=True)

    def _stored_ranker(self, version: int) -> str:
        try:
            return str(show_model(self.engine, version)["ranker"])
        except Exception:  # noqa: BLE001
            return "?"

    def _plugin_failed(self, stage: str, exc: Exception, then: str = "") -> None:
        """Record that the served ranker raised ``exc`` at ``stage`` (``then``: what the
        request does instead)."""
        self._record(self.version, self.ranker_name, stage,
                     f"{ranker_label(self.engine, self.ranker_name)} raised "
                     f"{type(exc).__name__}: {exc}{then}")

    def _record(self, version: int | None, name: str, stage: str, error: str) -> None:
        entry = {"at": time.time(), "version": version, "ranker": name, "stage": stage,
                 "error": error}
        self.errors.append(entry)
        del self.errors[:-100]  # keep the last 100
        log.error("serving pipeline v%s: %s", version, error)

    def _fall_back(self, failed: int, reason: str) -> None:
        """Serve the newest good version older than ``failed`` that has not failed here,
        else popularity."""
        target = good_before(self.engine, failed, exclude=self._failed)
        if target is not None:
            log.warning("falling back from pipeline v%s to v%s", failed, target)
            self._load(target, reason=reason)
            return
        log.warning("falling back from pipeline v%s to popularity", failed)
        old_rating = getattr(self, "min_rating", None)
        self.ranker = None
        self.ranker_name = "popular"
        self.version = failed
        self.meta = {}
        self.min_rating = old_rating if old_rating is not None else 4.0
        self.fallback = {"from": self.live, "to": "popularity", "reason": reason}
        self._model_changed(None)

    def _fail(self, stage: str, error: str, ranker: Any) -> None:
        """``ranker`` (the one this thread used) failed at ``stage``: record it and fall
        back, unless another thread already replaced it (then its fallback stands: one
        failure moves one version back, however many requests saw it)."""
        with self._model_lock:
            if self.ranker is not ranker:
                return
            self._record(self.version, self.ranker_name, stage, error)
            self._failed.add(self.version)
            self._fall_back(self.version, error)

    def check_live(self, force: bool = False) -> bool:
        """Follow the live pointer (read at most once per ``check_interval`` seconds);
        True when a new live version was loaded."""
        if self._pinned_version:
            return False
        now = time.monotonic()
        if not force and now - self._checked < self.check_interval:
            return False
        with self._model_lock:
            self._checked = now
            current = live_version(self.engine)
            if current is None or current == self.live:
                return False
            log.info("live pipeline changed: v%s -> v%s", self.live, current)
            self.live = current
            self._failed = set()
            self.fallback = None
            self._load(current)
        return True

    # -- data ----------------------------------------------------------------------------
    # Everything a request reads about the store (training data, histories, item views)
    # is one immutable DataSnapshot, read in one database snapshot and swapped in by one
    # reference assignment. A request pins the snapshot it started with (``pinned``), so
    # a refresh on another thread never shows it half-updated attributes.
    def check_every(self) -> float:
        """Seconds between the periodic checks for other processes' writes:
        ``refresh_interval``, or longer when a check costs more than ``check_share`` of
        that (a large store on a busy server)."""
        share = self.check_share
        return max(self.refresh_interval, self._keys_cost / share if share > 0 else 0.0)

    def _current_keys(self, session: Any = None) -> tuple[tuple, tuple, str | None]:
        """(interactions key, items-and-vectors key, lifecycle key): they change when the
        store does (the last one when items are retired or restored). Times itself
        (``check_every``)."""
        started = time.perf_counter()
        try:
            return self._read_keys(session)
        finally:
            self._keys_cost = time.perf_counter() - started

    def _read_keys(self, session: Any = None) -> tuple[tuple, tuple, str | None]:
        generation = self._items_generation  # read first: a bump after the snapshot's
        with ExitStack() as stack:              # first SELECT must not hide older vectors
            s = session if session is not None else stack.enter_context(
                self.engine.store.snapshot())
            inter = s.execute(select(func.count(), func.max(Interaction.id))).one()
            users = s.execute(select(func.count(), func.max(User.id)).select_from(User)).one()
            items = s.execute(select(func.count(), func.max(Item.id),
                                     func.max(Item.updated_at))).one()
            vecs = s.execute(select(func.count(), func.max(ItemVector.id))
                             .select_from(ItemVector)).one()
            written = tuple(sorted(written_tokens(s).items()))  # rewrites in place too
            lifecycle = lifecycle_key(s)
        return (tuple(inter) + tuple(users),
                tuple(items) + tuple(vecs) + (written, generation), lifecycle)

    def snapshot(self) -> "DataSnapshot":
        """The data snapshot this thread's request pinned, else the latest one."""
        pinned = _PINNED.get()
        if pinned is not None and pinned[0] is self:
            return pinned[1]
        snap = self._snap
        assert snap is not None
        return snap

    @contextmanager
    def pinned(self, snap: "DataSnapshot | None" = None) -> Iterator["DataSnapshot"]:
        """Serve from ``snap`` (default: the latest) until the block ends: every read of
        ``data``, ``history``, ``views``... on this thread (hooks included) sees it."""
        snap = snap or self.snapshot()
        token = _PINNED.set((self, snap))
        try:
            yield snap
        finally:
            _PINNED.reset(token)

    data = property(lambda self: self.snapshot().data)
    user_index = property(lambda self: self.snapshot().user_index)
    history = property(lambda self: self.snapshot().history)
    popularity = property(lambda self: self.snapshot().popularity)
    views = property(lambda self: self.snapshot().views)
    external = property(lambda self: self.snapshot().external)
    titles = property(lambda self: self.snapshot().titles)
    _data_key = property(lambda self: self._snap.key if self._snap is not None else None)

    def invalidate_items(self) -> None:
        """Reload item views and features at the next request (vectors were rewritten in
        place, which the counts in the keys do not show)."""
        self._items_generation += 1

    def refresh(self, force: bool = False, *, wait: bool = False,
                background: bool = False, timeout: float | None = None) -> "DataSnapshot":
        """Reload what changed in the store since the last request: the interactions
        (histories) and, when items or vectors changed, the item views and features.

        One refresh runs at a time. While one runs, other callers keep the previous
        snapshot (unless ``wait`` or ``force``: then they wait for it and check again),
        except after a write through this Engine: then a caller waits for it at most
        ``write_wait`` seconds (or ``timeout`` when shorter) and checks again.
        ``background``: never refresh on this thread; when this process wrote since the
        last check (or ``refresh_interval`` passed), queue one on a background thread and
        serve the current snapshot (search and similar items: no request waits for a
        refresh, and none keeps a stale snapshot for good). Returns the snapshot to
        serve from."""
        current = self._snap
        writes, now = self.engine.store.writes, time.monotonic()  # before any read
        if current is not None and not force:
            last_writes, last_at = self._keys_read
            if background:
                if writes != last_writes or now - last_at >= self.check_every():
                    self._refresh_in_background(keys_read=(writes, now))
                return current
            if not wait and writes == last_writes and self.refresh_interval > 0:
                if now - last_at >= self.check_every():  # other processes' writes
                    self._keys_read = (writes, now)
                    self._refresh_in_background()
                return current
            if self._current_keys() == current.key:
                self._keys_read = (writes, now)
                return current
            if wait:
                self._refresh_lock.acquire()
            elif writes != last_writes:  # this process wrote: wait a bounded time
                bound = self.write_wait if timeout is None else min(self.write_wait, timeout)
                if not self._refresh_lock.acquire(timeout=max(0.0, bound)):
                    return current  # the running refresh lands a moment later
            elif not self._refresh_lock.acquire(blocking=False):
                return current  # another thread is refreshing: serve the previous one
        else:
            self._refresh_lock.acquire()
        try:
            snap = self._refresh_locked(force)
        finally:
            self._refresh_lock.release()
        self._keys_read = (writes, now)  # current as of every write counted before it
        return snap

    def _refresh_locked(self, force: bool) -> "DataSnapshot":
        previous = self._snap
        with self.engine.store.snapshot() as s:  # keys and data from one database snapshot
            key = self._current_keys(s)
            if not force and previous is not None and key == previous.key:
                return previous
            items_changed = force or previous is None or key[1] != previous.key[1]
            retired_ids = (retired_ids_of(s) if key[2] is not None and (
                items_changed or key[2] != previous.key[2]) else
                previous.retired_ids if key[2] is not None else frozenset())
            if not items_changed and key[:2] == previous.key[:2]:
                # only items' retired states changed: the same data, another mask
                snap = replace(previous, key=key, retired_ids=retired_ids,
                               retired=_dense(retired_ids, previous.item_index),
                               cache=dict(previous.cache))
                self._snap = snap
                return snap
            if items_changed:
                data = build_training_data(self.engine, min_rating=self.min_rating, session=s)
                # external ids now; titles, texts and attributes when a request needs them
                external = external_ids(s)
                snap_views = ItemLookup(self.engine.store, data.item_ids, external)
                titles = Titles(snap_views)
            elif _appended_only(s, previous.key[0], key[0]):
                # only new events and users since: merge them into the previous pairs
                # instead of reading every event again
                data = extend_training_data(previous.data, s,
                                            after_interaction=previous.key[0][1] or 0,
                                            after_user=previous.key[0][3] or 0,
                                            min_rating=self.min_rating)
                snap_views, external, titles = previous.views, previous.external, previous.titles
            else:  # same items and vectors: reuse the loaded features
                data = build_training_data(self.engine, min_rating=self.min_rating,
                                           features=False, session=s)
                data.item_features = previous.data.item_features
                data.feature_encoders = previous.data.feature_encoders
                data.feature_keys = previous.data.feature_keys
                snap_views, external, titles = previous.views, previous.external, previous.titles
        item_index = data.item_index() if items_changed else previous.item_index
        snap = DataSnapshot(key=key, data=data, user_index=data.user_index(),
                            item_index=item_index,
                            history=data.user_items(), popularity=data.item_counts().float(),
                            views=snap_views, external=external, titles=titles,
                            retired_ids=retired_ids, retired=_dense(retired_ids, item_index))
        if not items_changed:  # both depend on the items only (Ranker.retrieval_keys)
            snap.cache["vectors"] = previous.cache.get("vectors")
            snap.cache["retrieval"] = previous.cache.get("retrieval")
        self._snap = snap  # the atomic swap
        return snap

    def _user_snapshot(self, user: str) -> tuple[int, "DataSnapshot"]:
        """(internal id, the snapshot to serve from). A user created after the snapshot
        was read gets a refresh: run here when none is running (read-your-writes for a
        single caller); when another thread is refreshing, waited for at most
        ``new_user_wait`` seconds, then the user is served from the snapshot as it is
        (as a guest, see ``_recommend``) and a background refresh catches up.
        NotFoundError for an unknown user."""
        deadline = time.monotonic() + self.new_user_wait
        snap = self.refresh(timeout=self.new_user_wait)
        with self.engine.store.snapshot() as s:
            user_id = get_user_id(s, str(user))
        if user_id in snap.user_index:
            return user_id, snap
        while user_id not in snap.user_index:
            left = deadline - time.monotonic()
            if left <= 0 or not self._refresh_lock.acquire(timeout=left):
                self._refresh_in_background()
                return user_id, self.snapshot()
            try:  # read from here on, so it includes the user
                snap = self._refresh_locked(force=False)
            finally:
                self._refresh_lock.release()
        return user_id, snap

    def _refresh_in_background(self, keys_read: tuple[int, float] | None = None) -> None:
        """Queue one refresh on a daemon thread: it waits for the refresh running now
        (which may have read the store before the new user existed), then refreshes
        again. At most one is queued at a time. ``keys_read``: (store writes, time) read
        before queueing; the store as of then is read, so they become the last check."""
        with self._model_lock:
            if self._refresh_queued:
                return
            self._refresh_queued = True

        def run() -> None:
            try:
                with self._refresh_lock:
                    with self._model_lock:
                        self._refresh_queued = False
                    self._refresh_locked(force=False)
                    if keys_read is not None:
                        self._keys_read = keys_read
            except Exception as exc:  # noqa: BLE001 - the next request retries
                with self._model_lock:
                    self._refresh_queued = False
                log.warning("background refresh failed: %s", exc)

        threading.Thread(target=run, name="polyrec-refresh", daemon=True).start()

    @property
    def graph(self) -> Any:
        """The stored knowledge graph (None when it has no triples), loaded on first use."""
        if not self._graph_loaded:
            from polyrec.knowledge_graph.graph import load_graph
            with self.engine.store.session() as s:
                graph = load_graph(s)
            self._graph = graph if graph.number_of_edges() else None
            self._graph_loaded = True
        return self._graph

    def vectors(self) -> torch.Tensor | None:
        """Item vectors [n_items, D] of the served ranker over the pinned snapshot (cached
        with the ranker that made them); None for the popularity fallback or when the
        ranker's ``item_vectors`` fails (recorded; MMR and online blending then go without)."""
        from polyrec.rank.explain import item_vectors
        snap = self.snapshot()
        ranker = self.ranker  # read once: another thread may swap it meanwhile
        if ranker is None:  # popularity fallback: no model vectors
            return None
        cached = snap.cache.get("vectors")
        if isinstance(cached, tuple) and cached[0] is ranker:
            return cached[1]
        # like the retrieval keys, item vectors derive from the ranker and the items only:
        # a later process for the same model and catalogue maps the saved ones
        directory, state_key = index_directory(self.engine.store.url), self._state_key(snap)
        saved = (load_arrays(directory, "itemvectors-recommend", state_key, ("matrix",))
                 if directory is not None and state_key else None)
        if saved is not None and saved["matrix"].ndim == 2 \
                and saved["matrix"].shape[0] == snap.data.n_items:
            vectors = torch.from_numpy(saved["matrix"])
        else:
            try:
                vectors = item_vectors(ranker, snap.data)
            except Exception as exc:  # noqa: BLE001 - a plugin bug must not fail the request
                if self.strict:
                    raise
                self._plugin_failed("item_vectors", exc)
                return None
            if vectors is not None and directory is not None and state_key:
                save_arrays(directory, "itemvectors-recommend", state_key,
                            {"matrix": vectors.detach().float().cpu().numpy()})
        snap.cache["vectors"] = (ranker, vectors)
        return vectors

    def _retrieval(self) -> Retrieval | None:
        """The served ranker's candidate retrieval over the pinned snapshot (opened once
        per ranker and catalogue state); None: score every item. A ranker whose
        retrieval keys fail is recorded and scored in full."""
        snap, ranker = self.snapshot(), self.ranker
        cached = snap.cache.get("retrieval")
        if isinstance(cached, tuple) and cached[0] is ranker:
            return cached[1]
        with self._retrieval_lock:
            cached = snap.cache.get("retrieval")
            if isinstance(cached, tuple) and cached[0] is ranker:
                return cached[1]
            try:
                found = open_retrieval(ranker, snap.data, name=f"recommend:v{self.version}",
                                       settings=self.index_settings,
                                       directory=index_directory(self.engine.store.url),
                                       state_key=self._state_key(snap))
            except Exception as exc:  # noqa: BLE001 - a plugin bug must not fail the request
                if self.strict:
                    raise
                self._plugin_failed("retrieval_keys", exc, SCORE_ALL)
                found = None
            snap.cache["retrieval"] = (ranker, found)
            return found

    def _payload(self, header: ArtifactHeader) -> dict[str, Any]:
        """The stored pipeline version ``header`` names: mapped from its file beside the
        store (polyrec.store.artifact_cache), else read from the store and the file
        written for the next process."""
        directory = index_directory(self.engine.store.url)
        payload = load_cached(directory, header)
        if payload is None:
            with self.engine.store.session() as s:
                data = load_artifact(s, header.name, header.version).data
            save_cached(directory, header, data)
            payload = from_bytes(data)
        return payload

    def _state_key(self, snap: "DataSnapshot") -> str | None:
        """A digest of what the served ranker's item side derives from: the stored
        pipeline version (its bytes' size and time too, so a rebuilt store never reuses
        another model's keys), the items and the stored vectors behind every feature.
        None when a feature was not read from persisted vectors (nothing to name it by)."""
        data, stamp = snap.data, self._artifact_stamp
        if stamp is None or set(data.item_features) != set(data.feature_keys):
            return None
        text = repr((stamp, snap.key[1][:-1], sorted(data.feature_keys.items())))
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def _candidate_scores(self, u: int, retrieval: Retrieval, pool: int
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scores [n_items] of user ``u``'s ``pool`` best candidates, -inf elsewhere;
        those candidates' item indices); None when the ranker's query failed (recorded;
        its retrieval is dropped)."""
        try:
            with torch.no_grad():
                query = retrieval.ranker.retrieval_queries(torch.tensor([u]), self.data)
            if not isinstance(query, torch.Tensor) or query.ndim != 2 or query.shape[0] != 1:
                raise ValueError(f"retrieval_queries gave shape "
                                 f"{tuple(getattr(query, 'shape', ()))}, not [1, D]")
            items, values = retrieval.candidates(query[0].float().cpu(), pool)
            scores = torch.full((self.data.n_items,), -math.inf)
            scores[items] = values
            return scores, items
        except Exception as exc:  # noqa: BLE001 - a plugin bug must not fail the request
            if self.strict:
                raise
            self._plugin_failed("retrieval_queries", exc, SCORE_ALL)
            self.snapshot().cache["retrieval"] = (retrieval.ranker, None)
            return None

    def _base_scores(self, u: int | None, retrieval: Retrieval | None, pool: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores [n_items], the candidates' item indices when only a candidate pool was
        scored, else None)."""
        if u is None:
            return torch.log1p(self.popularity).clone(), None
        if retrieval is not None and pool is not None:
            found = self._candidate_scores(u, retrieval, pool)
            if found is not None:
                return found
        return self.scores(torch.tensor([u]))[0], None

    def _seen(self, user_id: int) -> torch.Tensor:
        """Item indices the user has any stored interaction with (ratings below the
        positive threshold included; an impression alone does not count as seen)."""
        index = self.snapshot().item_index
        with self.engine.store.snapshot() as s:
            items = s.execute(select(Interaction.item_id).where(Interaction.user_id == user_id)
                              .where(Interaction.kind != "impression")
                              .distinct()).scalars().all()
        return torch.tensor([index[i] for i in items if i in index], dtype=torch.long)

    # -- scoring -------------------------------------------------------------------------
    def scores(self, users: torch.Tensor) -> torch.Tensor:
        """Ranker scores [b, n_items] for dense user indices; a user with no history gets
        item popularity (the only signal there is)."""
        snap = self.snapshot()  # one data snapshot for the whole call
        out = self._ranker_scores(users, snap)
        counts = torch.tensor([len(snap.history[u]) for u in users.tolist()])
        if bool((counts == 0).any()):
            out[counts == 0] = torch.log1p(snap.popularity)[None, :]
        return out

    def _ranker_scores(self, users: torch.Tensor, snap: "DataSnapshot") -> torch.Tensor:
        """The ranker's scores, checked ([b, n_items], no NaN); a failing ranker is
        replaced by its fallback (popularity at the end) and the request goes on."""
        self.check_live()
        while self.ranker is not None:
            ranker, name = self.ranker, self.ranker_name
            try:
                with torch.no_grad():
                    raw = ranker.score_users(users, snap.data)
                problem = check_scores(raw, len(users), snap.data.n_items)
            except Exception as exc:  # noqa: BLE001 - a plugin bug must not fail the request
                if self.strict:
                    raise
                problem = f"raised {type(exc).__name__}: {exc}"
            if problem is None:
                return raw.detach().float().cpu()
            message = f"{ranker_label(self.engine, name)} {problem}"
            if self.strict:
                raise ConfigError(message)
            self._fail("score_users", message, ranker)
        return torch.log1p(snap.popularity)[None, :].expand(len(users), -1).clone()

    def top_k(self, users: torch.Tensor, k: int, exclude_seen: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [b, k], item indices [b, k]) by exact top-k; training positives of each
        user excluded when ``exclude_seen`` (the batch path, for benchmarks and serving);
        retired items always (at -inf when fewer than k items are left)."""
        with self.pinned() as snap:
            scores = self.scores(users)
        scores[:, snap.retired] = -math.inf
        if exclude_seen:
            rows = torch.cat([torch.full((len(snap.history[u]),), r, dtype=torch.long)
                              for r, u in enumerate(users.tolist())])
            cols = torch.cat([snap.history[u] for u in users.tolist()])
            scores[rows, cols] = -math.inf
        return torch.topk(scores, min(k, scores.shape[1]), dim=1)

    def recommend(self, user: str, k: int = 10, *, filters: Mapping[str, Any] | None = None,
                  exclude_seen: bool = True, diversity: float = 0.0,
                  explain: bool = False, online: bool | None = None,
                  explore: bool | None = None) -> list[Recommendation]:
        """Top ``k`` items for ``user`` (external id); see Engine.recommend."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, not {k}")
        if not 0.0 <= diversity <= 1.0:
            raise ConfigError(f"diversity must be between 0 and 1, not {diversity}")
        keep = check_filters(self.engine, filters)
        self.check_live()
        user_id, snap = self._user_snapshot(str(user))
        with self.pinned(snap):  # the whole request reads one data snapshot
            return self._recommend(user_id, snap.user_index.get(user_id), k, keep=keep,
                                   exclude_seen=exclude_seen, diversity=diversity,
                                   explain=explain, online=online, explore=explore)

    def recommend_anonymous(self, k: int = 10, *, filters: Mapping[str, Any] | None = None,
                            explain: bool = False, explore: bool | None = None
                            ) -> list[Recommendation]:
        """Top ``k`` items for a visitor with no user record: item popularity, with the
        explorer's slots (new items among them) when exploration is on for serving (or
        ``explore``), so that little-seen items reach anonymous visitors too."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, not {k}")
        keep = check_filters(self.engine, filters)
        self.check_live()
        snap = self.refresh()
        with self.pinned(snap):
            return self._recommend(None, None, k, keep=keep, exclude_seen=False, diversity=0.0,
                                   explain=explain, online=False, explore=explore)

    def _recommend(self, user_id: int | None, u: int | None, k: int, *,
                   keep: ItemFilter | None, exclude_seen: bool, diversity: float,
                   explain: bool, online: bool | None, explore: bool | None
                   ) -> list[Recommendation]:
        """``u`` is the user's dense index in the pinned snapshot; None for a guest (a user
        newer than the snapshot): scored like a user with no history (popularity), then
        the online hook blends in what the feedback learners know of them already;
        ``user_id`` None too: an anonymous visitor (recommend_anonymous).
        ``keep``: the filters' item test (check_filters)."""
        seen = self._seen(user_id) if exclude_seen else torch.zeros(0, dtype=torch.long)
        # a large catalogue and a dot-product ranker: score a candidate pool from the
        # vector index, widened when seen items and filters leave fewer than k
        retrieval = self._retrieval() if u is not None and len(self.history[u]) else None
        pool = (max(10 * k, 100) + len(self.history[u]) + len(seen)
                if retrieval is not None else None)
        if pool is not None and len(self.snapshot().retired):  # as many live ones expected
            live = 1.0 - len(self.snapshot().retired) / max(self.data.n_items, 1)
            pool = int(math.ceil(pool / max(live, 1e-3)))
        while True:
            scores, candidates = self._base_scores(u, retrieval, pool)
            if self.online_hook is not None:  # the feedback learners' online user state
                scores = self.online_hook(self, user_id, scores, online)
            scores[seen] = -math.inf
            scores[self.snapshot().retired] = -math.inf  # retired items are never served
            if exclude_seen and u is not None:
                scores[self.history[u]] = -math.inf
            if keep is not None:  # only items still in the running are checked
                views = self.views
                running = (torch.isfinite(scores).nonzero().flatten() if candidates is None
                           else candidates[torch.isfinite(scores[candidates])]).tolist()
                views.prefetch_indices(running)
                drop = [i for i in running if not keep(views[i])]
                scores[drop] = -math.inf
            # a candidate pool: counted and ranked over its items only (the rest is -inf;
            # over 1M items the dense isfinite and topk cost more than the index search)
            ranked = scores if candidates is None else scores[candidates]
            finite = int(torch.isfinite(ranked).sum())
            if candidates is None or finite >= k:
                break
            assert retrieval is not None and pool is not None
            pool = pool * 8 if pool * 8 < retrieval.size // 4 else None
        if finite == 0:
            return []
        vectors = self.vectors() if diversity > 0 else None
        if vectors is not None:
            pool = torch.topk(ranked, min(max(10 * k, 100), finite))
            at = pool.indices if candidates is None else candidates[pool.indices]
            picked = mmr(at, pool.values, vectors, k, diversity)
        else:
            top = torch.topk(ranked, min(k, finite)).indices
            picked = (top if candidates is None else candidates[top]).tolist()
        if self.explore_hook is not None:  # exploration (bandit), when enabled
            picked = self.explore_hook(self, user_id, scores, picked, k, explore)
        # a click-model pipeline reports each item's click probability as its score (the
        # list keeps the ranking order: online blending, MMR and exploration may move it)
        clicks = self._click_probabilities(u, picked) if u is not None else None
        self.views.prefetch_indices(picked if not explain or u is None
                                    else [*picked, *self.history[u].tolist()])
        explainer, member_z = None, {}
        served = self.ranker  # read once: a fallback on another thread may swap it
        if explain and (served is None or u is None):  # popularity: say why
            note = ({"fallback": self.fallback} if served is None
                    else {"anonymous": "a visitor with no user record"} if user_id is None
                    else {"guest": "a new user, served before the data snapshot includes them"})
            return [Recommendation(item=self.external[self.data.item_ids[i]],
                                   score=float(scores[i]), title=self.titles.get(self.data.item_ids[i]),
                                   explanation={"text": "popular with other users", **note})
                    for i in picked]
        if explain:
            from polyrec.rank.explain import Explainer
            explainer = Explainer(served, self.data, self.titles, self.external, self.graph)
            member_z = self._member_scores(u, served)
        out = []
        for i in picked:
            ident = self.data.item_ids[i]
            score = clicks[i] if clicks is not None else float(scores[i])
            rec = Recommendation(item=self.external[ident], score=score,
                                 title=self.titles.get(ident))
            if explainer is not None:
                parts = {name: float(z[i]) for name, z in member_z.items()
                         if math.isfinite(float(z[i]))}
                if clicks is not None and i in clicks:
                    parts["click_probability"] = clicks[i]
                rec.explanation = explainer.explain(i, self.history[u].tolist(), parts or None,
                                                    user=u)
            out.append(rec)
        return out

    def _click_probabilities(self, u: int, items: list[int]) -> dict[int, float] | None:
        """The ranker's click probability of each item (None when it has no click model,
        Ranker.click_probability)."""
        if not hasattr(self.ranker, "click_probability") or not items:
            return None
        try:
            with torch.no_grad():
                probs = self.ranker.click_probability(torch.tensor([u]), torch.tensor([items]),
                                                      self.data)
            if probs is None:
                return None
            probs = probs[0]
        except Exception as exc:  # noqa: BLE001 - the scores stand; the probabilities not
            if self.strict:
                raise
            self._plugin_failed("click_probability", exc)
            return None
        return {i: float(p) for i, p in zip(items, probs)}

    def _member_scores(self, u: int, served: Any) -> dict[str, torch.Tensor]:
        """Per-user z-scores of every item by each ranker the pipeline ``served`` combines
        (ensemble members, a re-ranker's retrieval ranker and scorers), for explanations;
        a component that fails is left out (recorded)."""
        from polyrec.rank.explain import components
        out = {}
        for name, ranker in components(served):
            try:
                with torch.no_grad():
                    raw = ranker.score_users(torch.tensor([u]), self.data).float().cpu()[0]
            except Exception as exc:  # noqa: BLE001 - an explanation part, not the answer
                self._record(self.version, name, "explain", f"component '{name}' raised "
                                                            f"{type(exc).__name__}: {exc}")
                continue
            finite = torch.isfinite(raw)
            vals = raw[finite]
            z = (raw - vals.mean()) / vals.std().clamp(min=1e-12) if len(vals) > 1 else raw
            out[name] = torch.where(finite, z, torch.full_like(z, math.nan))
        return out


def recommend(engine: "Engine", user: str, k: int = 10, **options: Any) -> list[Recommendation]:
    """Recommendations for one user from the engine's live pipeline."""
    return engine.services.recommender().recommend(user, k, **options)


def _dense(ids: frozenset[int], item_index: Mapping[int, int]) -> torch.Tensor:
    """The dense indices of the items ``ids`` that ``item_index`` knows (sorted)."""
    return torch.tensor(sorted(item_index[i] for i in ids if i in item_index), dtype=torch.long)


def _appended_only(session: Any, old: tuple, new: tuple) -> bool:
    """Whether the interactions and users keys (count, max id, user count, max user id)
    moved from ``old`` to ``new`` by appends alone: every row counted since has an id
    above the old maximum (a deletion or a rewrite makes the counts disagree)."""
    count0, max0, users0, umax0 = (x or 0 for x in old)
    count1, max1, users1, umax1 = (x or 0 for x in new)
    if count1 < count0 or users1 < users0 or max1 < max0 or umax1 < umax0:
        return False
    added = session.execute(select(func.count()).select_from(Interaction)
                            .where(Interaction.id > max0)).scalar_one()
    joined = session.execute(select(func.count()).select_from(User)
                             .where(User.id > umax0)).scalar_one()
    return added == count1 - count0 and joined == users1 - users0
