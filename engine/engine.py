"""The Engine: one store, one plugin host and one device, shared by the API and the CLI.

Methods here stay thin: each delegates to the module that does the work, so a reader
finds ingestion in engine/ingest/files.py, encoding in engine/encode/pipeline.py, and so on.
"""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from sqlalchemy import func, select

from polyrec.store import catalog
from polyrec.device import resolve_device
from polyrec.ingest.images import check_item_images
from polyrec.ingest.records import check_records
from polyrec.plugin_host import DEFAULT_PLUGINS, PluginHost, Registry
from polyrec.services import Services
from polyrec.store import Store
from polyrec.store.lifecycle import LifecycleReport
from polyrec.store.models import (Artifact, Entity, Interaction, Item, ItemVector, Relation,
                                 Triple, User)


class Engine:
    """A polyrec engine over one database.

    >>> with Engine("sqlite:///shop.db") as eng:   # doctest: +SKIP
    ...     eng.add_items([{"external_id": "a1", "title": "Black dress"}])
    """

    def __init__(self, url: str | Path | None = None, *, device: str | torch.device = "auto",
                 entrypoints: bool = True, builtins: Iterable[str] = DEFAULT_PLUGINS,
                 plugins: Iterable[object] = (), progress: bool = True,
                 encode_on_arrival: bool = True, lock_timeout: float | None = None,
                 image_root: str | Path | None = None) -> None:
        """``lock_timeout``: seconds to keep retrying a database locked by another
        process before "database is locked" (default 30; engine/store/__init__.py).
        ``image_root``: the folder local item images written by :meth:`add_items` must
        lie under (relative paths are taken under it); None: the roots this store
        recorded before (engine/ingest/images.py)."""
        self.device = resolve_device(device)
        # plugins first: a built-in that fails to load raises before any database is opened
        self.plugins = PluginHost(builtins=builtins, entrypoints=entrypoints, extra=plugins)
        self.store = Store(url) if lock_timeout is None else Store(url, lock_timeout=lock_timeout)
        #: encode items written by add_items in the background (engine/encode/on_arrival.py)
        self.encode_on_arrival = encode_on_arrival
        #: the image root of add_items (engine/ingest/images.py)
        self.image_root = None if image_root is None else str(Path(image_root).expanduser())
        self.progress = progress
        self._encoders: dict = {}  # prepared encoders by configuration (engine/encode/pipeline.py)
        self.services = Services(self)  # recommender, feedback hub, searcher: made once, under a lock

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the background encoder, flush the feedback learners' state, then release
        the database connections."""
        self.services.close()
        self.store.close()

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def store_schema_version(self) -> int:
        from polyrec.store import SCHEMA_VERSION
        return SCHEMA_VERSION

    # -- plugins -------------------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        """The registry of 'encoders', 'fusers', 'rankers', 'feedback_learners' or 'readers'."""
        return self.plugins.registry(kind)

    # -- catalogue -----------------------------------------------------------------------
    def add_items(self, items: Sequence[Mapping[str, Any]]) -> int:
        """Insert or update items (dicts with ``external_id`` and any of title, text,
        image, attributes, active). Returns how many records were written. ``active``
        (a bool) sets the lifecycle state: False retires the item, True restores it;
        without it the state stays (:meth:`retire_items`). A local ``image``
        must lie under the image root (``image_root``; engine/ingest/images.py) and is
        stored as an absolute path; URLs and ``data:`` URIs are kept as they are.

        With ``encode_on_arrival`` (the default) the written items are then encoded in
        the background by the encoders that already have stored vectors
        (:meth:`wait_for_encoding` waits for it)."""
        items = check_records(items, "add_items", "item")
        with self.store.session() as s:
            items = check_item_images(s, items, self.image_root, "add_items")
            written = catalog.upsert_items(s, items)
            ids = (catalog.item_ids(s, (str(r["external_id"]) for r in items))
                   if self.encode_on_arrival else {})
        if any(r.get("active") is not None for r in items):
            self.services.lifecycle_changed()
        if ids:
            self.services.items_stored(ids.values())
        return written

    def retire_items(self, items: Iterable[str]) -> LifecycleReport:
        """Retire items (sold out, discontinued) by external id: kept with their vectors
        and interactions (history still trains models and describes users), never served
        again by recommend, recommend_many, search, similar or the popular fallback, in
        this process from its next request and in others within their refresh delay
        (polyrec.store.lifecycle). One NotFoundError names unknown ids; nothing changes
        then. Returns a LifecycleReport (``changed``, ``unchanged``: already retired)."""
        return self._set_retired(items, True, "retire_items")

    def restore_items(self, items: Iterable[str]) -> LifecycleReport:
        """Serve retired items again (the reverse of :meth:`retire_items`); an item that
        is live already is reported ``unchanged``. Returns a LifecycleReport."""
        return self._set_retired(items, False, "restore_items")

    def _set_retired(self, items: Iterable[str], retired: bool, source: str
                     ) -> LifecycleReport:
        from polyrec.store import lifecycle
        with self.store.session() as s:
            report = lifecycle.set_retired(s, items, retired, source=source)
        if report.changed:
            self.services.lifecycle_changed()
        return report

    def list_items(self, *, retired: bool | None = None, limit: int | None = None
                   ) -> list[dict[str, Any]]:
        """Items with their lifecycle state (``item``, ``title``, ``retired``,
        ``retired_at``): only the retired ones (``retired=True``, newest retirement
        first), only the live ones (False) or all (None); at most ``limit``."""
        from polyrec.store import lifecycle
        with self.store.session() as s:
            return lifecycle.list_items(s, retired=retired, limit=limit)

    def wait_for_encoding(self, timeout: float | None = None) -> bool:
        """Wait until the items written so far were encoded in the background; False
        when ``timeout`` seconds passed first. Errors: ``services.arrivals().status()``."""
        return self.services.wait_for_encoding(timeout)

    def add_users(self, users: Sequence[Mapping[str, Any]]) -> int:
        """Insert or update users (dicts with ``external_id`` and optional attributes)."""
        users = check_records(users, "add_users", "user")
        with self.store.session() as s:
            return catalog.upsert_users(s, users)

    def add_interactions(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Store events given as dicts with ``user``, ``item`` (external ids), ``kind``
        (default 'click'), optional ``value``, ``ts`` (epoch seconds or an ISO 8601 time,
        1970-01-01 to 2200-01-01 UTC) and ``context``; any other key is refused.
        Unknown users are created; an unknown item or a bad event is an error and
        nothing is stored. The same writer as :meth:`feedback_many` (checks, dedup rule,
        experiments, then the feedback learners; engine/ingest/interactions.py).
        Returns how many events were new."""
        from polyrec.feedback.events import hub
        return sum(e.new for e in hub(self).record(events, source="add_interactions"))

    def ingest(self, path: str | Path, kind: str, *, format: str | None = None,
               mapping: Mapping[str, str | None] | None = None, on_error: str = "fail",
               **options: Any) -> Any:
        """Ingest a file of items, users, interactions, kg triples or links (see
        engine/ingest/files.py; ``links=`` adds an item->entity file to a kg ingestion).
        Returns an IngestReport."""
        from polyrec.ingest.files import ingest
        return ingest(self, path, kind, format=format, mapping=mapping, on_error=on_error,
                      **options)

    def doctor(self, **options: Any) -> dict[str, Any]:
        """A data quality report (engine/ingest/doctor.py) and the encoders in use, with
        whether their weights are pretrained (engine/encode/selection.py)."""
        from polyrec.encode.selection import doctor_section
        from polyrec.ingest.doctor import doctor
        report = doctor(self, **options)
        doctor_section(self, report)
        return report

    # -- feedback (engine/feedback/events.py, engine/feedback/experiments.py, engine/feedback/retrain.py) ------------
    def feedback(self, user: str, item: str, kind: str = "click", value: float | None = None,
                 ts: float | str | datetime | None = None,
                 context: Mapping[str, Any] | None = None) -> Any:
        """Store one event durably (an unknown user is created, an unknown item is an
        error), then hand it to the feedback learners. ``ts``: epoch seconds or an ISO
        8601 time (default now), as for :meth:`add_interactions`. Returns the stored Event."""
        from polyrec.feedback import events
        return events.feedback(self, user, item, kind, value=value, ts=ts, context=context)

    def feedback_many(self, events: Sequence[Mapping[str, Any]]) -> list:
        """Store a batch of events in one transaction, then hand them to the learners."""
        from polyrec.feedback import events as _events
        return _events.feedback_many(self, events)

    def forget_user(self, user: str, *, tombstone: bool = True) -> dict[str, Any]:
        """Remove a user, their interactions, online state and experiment assignments in
        one transaction, drop them from the live model's serving state at once, and
        record a tombstone so re-ingesting an old file does not bring them back
        (engine/feedback/forget.py). Returns the counts removed."""
        from polyrec.feedback.forget import forget_user
        return forget_user(self, user, tombstone=tombstone)

    def user_state(self, user: str) -> torch.Tensor | None:
        """The online learner's current vector of a user (None when it has none)."""
        from polyrec.feedback import events
        return events.user_state(self, user)

    def items(self, ids: Sequence[int] | None = None) -> list:
        """ItemViews of the catalogue (all, or the given internal ids)."""
        with self.store.session() as s:
            return catalog.item_views(s, ids)

    # -- knowledge graph (knowledge_graph/) ------------------------------------------------
    def graph(self) -> Any:
        """The stored knowledge graph as a networkx MultiDiGraph (knowledge_graph/graph.py)."""
        from polyrec.knowledge_graph.graph import load_graph
        with self.store.session() as s:
            return load_graph(s)

    # -- encoding (engine/encode/pipeline.py) ---------------------------------------------------
    def encode(self, encoders: str | Sequence[str] | None = None, *, force: bool = False,
               batch_size: int | None = None, options: Mapping[str, Mapping[str, Any]] | None = None,
               dtype: str = "float16") -> Any:
        """Encode the catalogue into cached vectors (all registered encoders by default);
        only new or changed items are encoded unless ``force``. Returns an EncodeReport."""
        from polyrec.encode.pipeline import encode
        return encode(self, encoders, force=force, batch_size=batch_size, options=options,
                      dtype=dtype)

    def encoder(self, name: str) -> Any:
        """The prepared encoder ``name``, configured as it was last used to encode."""
        from polyrec.encode.pipeline import get_encoder
        return get_encoder(self, name)

    # -- search and similar items (engine/retrieve/search.py, engine/retrieve/similar.py) -------------------
    def search(self, query: str, k: int = 10, *, user: str | None = None,
               filters: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """Hybrid search (dense + cross-modal + BM25, fused by RRF) with query
        understanding; personalised when ``user`` is given. Returns a SearchResponse."""
        from polyrec.retrieve.search import search
        return search(self, query, k, user=user, filters=filters, **options)

    def synonyms(self) -> Any:
        """The shop's search synonyms stored in this database (a
        polyrec.retrieve.synonyms.Synonyms; empty when none were set)."""
        from polyrec.retrieve.synonyms import load
        with self.store.session() as s:
            return load(s)

    def set_synonyms(self, synonyms: Any, *, source: str | None = None) -> int:
        """Replace the stored search synonyms with ``synonyms``: a Synonyms, the text
        of a synonyms file (``"plaid, tartan => check"``, one rule a line) or None to
        remove them all. Searches of every process on this store use them from their
        next request. Returns the number of rules stored."""
        from polyrec.retrieve.synonyms import Synonyms, save
        if synonyms is None:
            synonyms = Synonyms()
        elif isinstance(synonyms, str):
            synonyms = Synonyms.parse(synonyms, source or "<text>")
        with self.store.session() as s:
            save(s, synonyms, source)
        return len(synonyms)

    def similar(self, item: str, k: int = 10, *, filters: Mapping[str, Any] | None = None,
                basis: str = "auto") -> Any:
        """Items most similar to ``item`` by fused (else encoder) vectors. Returns a
        SimilarResponse."""
        from polyrec.retrieve.similar import similar
        return similar(self, item, k, filters=filters, basis=basis)

    # -- training and recommendations (engine/rank/) -------------------------------
    def train(self, ranker: str | None = None, *, options: Mapping[str, Any] | None = None,
              epochs: int | None = None, seed: int | None = None, **kwargs: Any) -> Any:
        """Fit a ranker (the default pipeline when None) and store it as the next version
        of the ``pipeline`` artifact; it goes live only if it passes the gate (``force=True``
        makes it live anyway; ``gate={...}`` overrides gate settings). Returns a TrainReport
        (``activated``, ``gate``, ``metrics``; docs/models.md, "Model registry")."""
        from polyrec.rank.train import train
        return train(self, ranker, options=options, epochs=epochs, seed=seed, **kwargs)

    def recommend(self, user: str, k: int = 10, *, filters: Mapping[str, Any] | None = None,
                  exclude_seen: bool = True, diversity: float = 0.0,
                  explain: bool = False, online: bool | None = None,
                  explore: bool | None = None) -> list:
        """Top ``k`` Recommendations for ``user`` from the trained pipeline (loaded once and
        cached): attribute ``filters``, MMR ``diversity`` (0..1), explanations. ``online``
        and ``explore`` override the feedback settings online.enabled / bandit.serving."""
        from polyrec.rank.recommend import recommend
        return recommend(self, user, k, filters=filters, exclude_seen=exclude_seen,
                         diversity=diversity, explain=explain, online=online, explore=explore)

    def recommend_many(self, users: Iterable[str] | None = None, k: int = 10, *,
                       filters: Mapping[str, Any] | None = None, exclude_seen: bool = True,
                       diversity: float = 0.0, online: bool | None = None,
                       explore: bool | None = None, batch_size: int = 256,
                       progress: bool | None = None) -> Iterator[tuple[str, list]]:
        """Yield ``(user, recommendations)`` for each of ``users`` (external ids; every
        stored user when None), in order: for each user the list ``recommend`` returns
        with the same options (no explanations), scored ``batch_size`` users at a time
        from one data snapshot. Users are checked first (NotFoundError naming unknown
        ones); ``progress`` (default: the engine's setting) shows a bar."""
        from polyrec.rank.batch import recommend_many
        return recommend_many(self, users, k, filters=filters, exclude_seen=exclude_seen,
                              diversity=diversity, online=online, explore=explore,
                              batch_size=batch_size, progress=progress)

    # model registry (engine/rank/registry.py): versions of the pipeline, the live one
    def models(self) -> list[dict[str, Any]]:
        """Every stored version of the pipeline (oldest first): ranker, options, data
        sizes, holdout metrics, gate verdict, created time, bytes, ``live``."""
        from polyrec.rank import registry
        return registry.list_models(self)

    def model(self, version: int) -> dict[str, Any]:
        """One stored version of the pipeline (NotFoundError when absent)."""
        from polyrec.rank import registry
        return registry.show_model(self, version)

    def activate(self, version: int) -> dict[str, Any]:
        """Make ``version`` the live pipeline (whatever its gate verdict)."""
        from polyrec.rank import registry
        return registry.activate(self, version)

    def rollback(self) -> dict[str, Any]:
        """Make the newest good version older than the live one live: {from, to, model}."""
        from polyrec.rank import registry
        return registry.rollback(self)

    def prune_models(self, keep: int = 3) -> dict[str, Any]:
        """Delete all but the ``keep`` newest versions (never the live one)."""
        from polyrec.rank import registry
        return registry.prune(self, keep)

    # -- evaluation (engine/rank/evaluation.py) ------------------------------------------------
    def evaluate(self, models: Any = "popular,itemknn,ease", *, split: str = "random",
                 ks: Sequence[int] = (10, 20), seed: int = 0, options: Sequence[str] = (),
                 **kwargs: Any) -> Any:
        """Fit rankers on a split of the stored positives and return an EvaluationReport
        (``.table()``, ``.as_dict()``); see polyrec.rank.evaluation.run_evaluation."""
        from polyrec.rank.evaluation import run_evaluation
        return run_evaluation(self, models, split=split, ks=ks, seed=seed, options=options,
                              **kwargs)

    # -- reports -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Row counts by table (``items`` counts retired ones too; ``retired_items``:
        how many of them are retired) and interactions by kind."""
        with self.store.session() as s:
            count = lambda model: s.execute(select(func.count()).select_from(model)).scalar_one()  # noqa: E731
            by_kind = dict(s.execute(select(Interaction.kind, func.count())
                                     .group_by(Interaction.kind)).all())
            vectors = dict(s.execute(select(ItemVector.encoder, func.count())
                                     .group_by(ItemVector.encoder)).all())
            linked = s.execute(select(func.count()).select_from(Entity)
                               .where(Entity.item_id.is_not(None))).scalar_one()
            retired = s.execute(select(func.count()).select_from(Item)
                                .where(Item.retired_at.is_not(None))).scalar_one()
            return {"items": count(Item), "retired_items": retired,
                    "users": count(User), "interactions": count(Interaction),
                    "interactions_by_kind": by_kind, "entities": count(Entity),
                    "relations": count(Relation), "triples": count(Triple),
                    "linked_items": linked, "vectors_by_encoder": vectors,
                    "artifacts": count(Artifact)}
