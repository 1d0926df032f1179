"""Hybrid search: dense (BERT), cross-modal (CLIP text tower -> image vectors) and lexical
(BM25) retrieval, merged by weighted reciprocal rank fusion, shaped by query
understanding, optionally personalised.

Scoring (see docs/search.md)::

    fused(d)  = sum over rankings r of  weight_r / (rrf_k + rank_r(d))      (ranks from 1)
    score(d)  = fused(d) + facet_boost * match_fraction(d) + intent_boost * intent(d)

``match_fraction`` is the share of recognised query facets (colour, type, genre, ...) the
item carries, so with the default ``facet_boost`` items matching everything the query
named come first, ordered by fused relevance. With a user, a ``personal`` ranking of the
candidates by the user's vector (trained model state, else a profile from the user's
history) joins the fusion.

The :class:`Searcher` of an Engine keeps immutable snapshots (catalogue facts, vector
matrices, the lexical index, query encoders). A snapshot is rebuilt when the store
changed and swapped in by one reference assignment, so concurrent requests see either
the old or the new snapshot, never a mix.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from sqlalchemy import func, select

from polyrec.store import catalog
from polyrec.contracts import EncoderContext
from polyrec.errors import (ConfigError, ModelNotTrainedError, PolyrecError,
                           ValidationError)
from polyrec.rank.vector_index import IndexSettings, IndexSlot
from polyrec.retrieve.lexical import LexicalIndex, Signature, _attributes, make_index
from polyrec.retrieve.catalogue_lexicon import CatalogueLexicon
from polyrec.retrieve.synonyms import SETTING as SYNONYMS_SETTING, Synonyms
from polyrec.retrieve.thesaurus import WordNet
from polyrec.retrieve.query_understanding import (SEMANTIC_SLOTS, STOPWORDS, IntentClassifier,
                                                  Match, SemanticMatcher, Understanding,
                                                  Vocabulary, intent_slot, slot_of)
from polyrec.store import vector_cache
from polyrec.store.lifecycle import lifecycle_key, retired_ids
from polyrec.store.models import Interaction, Item, ItemVector
from polyrec.store.settings import get_setting
from polyrec.store.pgvector import PgVectors
from polyrec.store.vector_cache import index_directory
from polyrec.store.vectors import written_token, written_tokens

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

#: Weights of the rankings fused by RRF.
DEFAULT_WEIGHTS: dict[str, float] = {"dense": 1.0, "lexical": 1.0, "clip": 0.5, "personal": 0.5}
RRF_K = 60
MAX_QUERY_CHARS = 1000
MAX_K = 1000
#: Encoders whose query tower maps text into their item space: ranking name -> encoder.
DENSE_ENCODERS: dict[str, str] = {"dense": "bert", "clip": "clip"}
#: The text encoder whose query tower embeds spans and facet values (semantic matching).
SEMANTIC_ENCODER = "bert"


@dataclass
class SearchOptions:
    """Knobs of one search; every field can be passed to ``Engine.search`` as a keyword."""

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    rrf_k: int = RRF_K
    #: how many items each retriever contributes to the candidate pool (at least 5*k).
    candidates: int = 200
    #: "boost" (matches first), "filter" (only full matches) or "off".
    understanding: str = "boost"
    #: rewrite the query with the shop's synonyms first (polyrec.retrieve.synonyms;
    #: ``polyrec synonyms import FILE``)
    synonyms: bool = True
    facet_boost: float = 1.0
    intent_boost: float = 0.02
    intent_threshold: float = 0.5
    #: match query words to facet values by the text encoder's similarity (see
    #: query_understanding.SemanticMatcher) when the words name no value exactly.
    semantic: bool = True
    #: minimum score (mean z-score of name and item-centroid similarity) of a semantic match
    semantic_threshold: float = 3.0
    #: softmax temperature turning semantic scores into value probabilities
    semantic_temperature: float = 0.5
    #: a colour name ("maroon") counts only when its best catalogue colour has at least
    #: this probability: words that are also names of other things ("velvet", "denim")
    #: sit between several colours and are left to the retrievers
    semantic_colour_min: float = 0.45
    #: read query words through what the catalogue's own texts associate them with
    #: (polyrec.retrieve.catalogue_lexicon: "tee" in the descriptions of T-shirts)
    catalogue_words: bool = True
    #: read words nothing else reads through a general English thesaurus (WordNet, when
    #: installed: polyrec.retrieve.thesaurus): "pullover" is a kind of sweater
    thesaurus: bool = True
    #: minimum share of the senses' weight behind a thesaurus reading's best value
    thesaurus_min: float = 0.5
    #: minimum encoder score (z) of a thesaurus reading's value for the word (an absolute
    #: veto; off by default: the encoder does not know rare words, "frock" -> Dress -0.11)
    thesaurus_agree: float = float("-inf")
    #: the encoder rejects a thesaurus reading it scores more than this below the word's
    #: reading it prefers ("plain": Knitwear 0.04 against Solid 2.05); a word's only
    #: reading is never rejected by comparison
    thesaurus_margin: float = 1.0
    #: use the trained intent model (artifact "intent", polyrec train-intent) when there
    #: is one for these vectors: its confident facets join as soft facets, its demand
    #: head breaks ties
    intent_model: bool = True
    #: minimum probability of a field's best value for the intent model's facet to count
    intent_model_threshold: float = 0.95
    #: use CLIP vectors even when the CLIP model has no pretrained weights (testing).
    untrained_clip: bool = False
    lexical_backend: str = "auto"

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> "SearchOptions":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown search option(s): {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
        opts = cls(**{k: v for k, v in options.items() if k != "weights"})
        if "weights" in options and options["weights"] is not None:
            bad = sorted(set(options["weights"]) - set(DEFAULT_WEIGHTS))
            if bad:
                raise ConfigError(f"unknown fusion weight(s): {', '.join(bad)} "
                                  f"(known: {', '.join(DEFAULT_WEIGHTS)})")
            opts.weights.update({k: float(v) for k, v in options["weights"].items()})
        if opts.understanding not in ("boost", "filter", "off"):
            raise ConfigError("understanding must be 'boost', 'filter' or 'off'")
        if opts.rrf_k < 1:
            raise ConfigError("rrf_k must be at least 1")
        return opts


def rrf(rankings: Mapping[str, Sequence[int]], weights: Mapping[str, float],
        k: int = RRF_K) -> dict[int, float]:
    """Weighted reciprocal rank fusion: sum_r weights[r] / (k + rank), ranks from 1.

    Rankings absent from ``weights`` get weight 1; an item missing from a ranking gets
    nothing from it."""
    fused: dict[int, float] = {}
    for name, ranking in rankings.items():
        w = float(weights.get(name, 1.0))
        if w == 0.0:
            continue
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + w / (k + rank)
    return fused


# -- results ------------------------------------------------------------------------------
@dataclass
class SearchHit:
    """One result: the item's external id, its final score and where it came from."""

    item: str
    score: float
    title: str | None = None
    #: ranking name -> 1-based rank of the item in it (dense, lexical, clip, personal).
    ranks: dict[str, int] = field(default_factory=dict)
    #: recognised slots this item satisfies.
    matched: list[str] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"item": self.item, "score": round(self.score, 6), "title": self.title,
                "ranks": self.ranks, "matched": self.matched, "attributes": self.attributes}


@dataclass
class SearchResponse:
    """Results plus what the query was understood to mean and how it was answered."""

    query: str
    results: list[SearchHit]
    understanding: Understanding
    rankings: list[str]
    personalised: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def understood(self) -> dict[str, Any]:
        return self.understanding.summary()

    def ids(self) -> list[str]:
        return [h.item for h in self.results]

    def as_dict(self) -> dict[str, Any]:
        u = self.understanding
        out = {"query": self.query, "understood": u.summary(),
               "entities": [m.as_dict() for m in u.matches], "intent": u.intent,
               "rankings": self.rankings, "personalised": self.personalised,
               "notes": self.notes, "results": [h.as_dict() for h in self.results]}
        if u.synonyms:
            out["synonyms"] = dict(u.synonyms)
        if u.corrected:
            out["corrected"] = dict(u.corrected)
        if u.intent_model is not None:
            out["intent_model"] = u.intent_model
        return out


# -- snapshots ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CatalogSnapshot:
    """Immutable facts about the catalogue used at query time."""

    signature: Signature
    external: dict[int, str]
    internal: dict[str, int]
    titles: dict[int, str | None]
    attributes: dict[int, dict[str, Any]]
    vocabulary: Vocabulary
    fields: frozenset[str] = frozenset()

    @classmethod
    def build(cls, session: Any, signature: Signature) -> "CatalogSnapshot":
        external, internal, titles, attrs = {}, {}, {}, {}
        for iid, ext, title, raw in session.execute(select(Item.id, Item.external_id, Item.title,
                                                           Item.attributes)):
            external[iid], internal[ext], titles[iid] = ext, iid, title
            attrs[iid] = _attributes(raw)
        fields = frozenset(f for a in attrs.values() for f in a)
        return cls(signature, external, internal, titles, attrs, Vocabulary.build(session), fields)

    def allowed(self, filters: Mapping[str, Any] | None) -> set[int] | None:
        """Items passing every filter (None when there are no filters).

        A filter key is an attribute field (value equal, case-insensitive; a list value
        matches when any element matches) or a query-understanding slot ('colour',
        'type', 'genre', ...). Several values for one key are OR-ed."""
        if not filters:
            return None
        fields = self.fields
        slots = set(self.vocabulary.slots())
        out: set[int] | None = None
        for key, want in filters.items():
            wanted = {str(v).lower() for v in (want if isinstance(want, (list, tuple, set)) else [want])}
            if key in fields:
                ids = {i for i, a in self.attributes.items() if _attr_matches(a.get(key), wanted)}
            elif key in slots:
                ids = set()
                for (slot, value), facet in self.vocabulary.facets.items():
                    if slot == key and value in wanted:
                        ids |= facet.items
            else:
                raise ValidationError(f"unknown filter field '{key}' (attribute fields: "
                                      f"{', '.join(sorted(fields)[:12]) or 'none'}; "
                                      f"slots: {', '.join(sorted(slots)) or 'none'})",
                                      field="filters")
            out = ids if out is None else out & ids
        return out if out is not None else set()


def _attr_matches(value: Any, wanted: set[str]) -> bool:
    if isinstance(value, (list, tuple)):
        return any(str(v).lower() in wanted for v in value)
    return value is not None and str(value).lower() in wanted


@dataclass(frozen=True)
class StoreState:
    """What a request learned about the store: items signature, vectors per encoder and
    the items' lifecycle key (polyrec.store.lifecycle: changes when items are retired or
    restored; None when none ever was)."""

    items: Signature
    vectors: dict[str, tuple[Any, ...]]
    checked: float
    lifecycle: str | None = None
    #: the searcher's vectors generation when this state was read (before any row)
    generation: int = 0


@dataclass(frozen=True)
class VectorSpace:
    """L2-normalised item vectors of one encoder or trained model: ``matrix[row[item]]``."""

    name: str
    signature: tuple[Any, ...]
    item_ids: list[int]
    matrix: torch.Tensor
    fingerprint: str | None = None
    row: dict[int, int] = field(default_factory=dict)
    #: rows with a zero vector (items a model cannot score) never match; None: all valid
    invalid: torch.Tensor | None = None
    #: the top-k index used by :meth:`search` (exact, or HNSW on large spaces)
    index: IndexSlot | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, name: str, signature: tuple[Any, ...], item_ids: Sequence[int],
           vectors: torch.Tensor, fingerprint: str | None = None, *,
           normalised: bool = False) -> "VectorSpace":
        """``normalised``: the rows are unit length (or zero) already."""
        vectors = vectors.detach().float().cpu()
        zero = vectors.norm(dim=1) == 0
        matrix = (vectors if normalised else torch.nn.functional.normalize(vectors, dim=1)
                  ).contiguous()
        ids = [int(i) for i in item_ids]
        return cls(name, signature, ids, matrix, fingerprint, {i: k for k, i in enumerate(ids)},
                   zero if bool(zero.any()) else None)

    def indexed(self, settings: IndexSettings | None = None, directory: Any = None,
                fingerprint: str | None = None) -> "VectorSpace":
        """This space with its index (see polyrec.rank.vector_index.IndexSlot):
        persisted under ``directory`` keyed by this space's name and ``fingerprint``
        (the vectors' digest when None)."""
        slot = IndexSlot(self.matrix, name=self.name, settings=settings, directory=directory,
                         fingerprint=fingerprint)
        return replace(self, index=slot)

    def search(self, query: torch.Tensor, n: int, allowed: set[int] | None = None,
               exclude: set[int] | None = None) -> list[tuple[int, float]]:
        """The ``n`` best (item id, cosine) for ``query``: through the approximate index
        when the space has one and nothing restricts the answer to ``allowed`` items
        (it is asked for enough extra rows to drop ``exclude`` and invalid rows, so that
        n are found whenever there are n others), else exactly (:meth:`top` over
        :meth:`scores`), as when the extra rows would be a quarter of the space or more
        (many retired items)."""
        slot = self.index
        extra = len(exclude or ()) + (int(self.invalid.sum()) if self.invalid is not None else 0)
        if slot is None or slot.kind == "exact" or allowed is not None \
                or 4 * (n + extra) >= len(self.item_ids):
            return self.top(self.scores(query), n, allowed, exclude)
        q = torch.nn.functional.normalize(query.detach().float().cpu().flatten(), dim=0)
        vals, rows = slot.current.search(q, n + extra)
        out = []
        for v, j in zip(vals.tolist(), rows.tolist()):
            if self.invalid is not None and bool(self.invalid[j]):
                continue
            item = self.item_ids[j]
            if exclude and item in exclude:
                continue
            out.append((item, v))
            if len(out) >= n:
                break
        return out

    def has(self, item: int) -> bool:
        """Whether the item has a (non-zero) vector here."""
        row = self.row.get(item)
        return row is not None and (self.invalid is None or not bool(self.invalid[row]))

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every item with ``query`` (one score per row)."""
        q = torch.nn.functional.normalize(query.detach().float().cpu().flatten(), dim=0)
        return self.matrix @ q

    def mask(self, allowed: set[int] | None) -> torch.Tensor | None:
        if allowed is None:
            return None
        m = torch.zeros(len(self.item_ids), dtype=torch.bool)
        rows = [self.row[i] for i in allowed if i in self.row]
        if rows:
            m[rows] = True
        return m

    def top(self, scores: torch.Tensor, n: int, allowed: set[int] | None = None,
            exclude: set[int] | None = None) -> list[tuple[int, float]]:
        """The ``n`` best (item id, score), restricted to ``allowed`` and without ``exclude``."""
        scores = scores.clone()
        if self.invalid is not None:
            scores[self.invalid] = float("-inf")
        mask = self.mask(allowed)
        if mask is not None:
            scores[~mask] = float("-inf")
        for i in exclude or ():
            if i in self.row:
                scores[self.row[i]] = float("-inf")
        n = min(n, len(self.item_ids))
        if n <= 0:
            return []
        vals, idx = torch.topk(scores, n)
        return [(self.item_ids[j], v) for v, j in zip(vals.tolist(), idx.tolist())
                if v != float("-inf")]


class LRUCache:
    """A small thread-safe least-recently-used cache (query text -> query vector)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Any, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class Searcher:
    """Per-Engine search state: snapshots swapped atomically when the store changes."""

    def __init__(self, engine: "Engine", query_cache: int = 1024) -> None:
        self.engine = engine
        self._lock = threading.RLock()
        self._catalog: CatalogSnapshot | None = None
        self._spaces: dict[str, VectorSpace] = {}
        self._intents: dict[tuple[Any, ...], IntentClassifier | None] = {}
        self._encoders: dict[str, tuple[Any, threading.Lock]] = {}
        self._lexical: dict[str, LexicalIndex] = {}
        self._query_cache = LRUCache(query_cache)
        self._state: StoreState | None = None
        #: bumped when this process wrote vectors (vectors_rewritten): part of every
        #: space's signature, since a vector rewritten in place keeps the counts
        self._vectors_generation = 0
        self._retired: tuple[str, frozenset[int]] | None = None
        self._memo: dict[Any, Any] = {}
        #: seconds a signature check stays valid (0: check the store on every request).
        self.check_interval = 0.0
        #: with a ``check_interval``, the most of the time the checks may take: the
        #: interval grows to (seconds of the last check) / check_share when longer
        #: (the items' COUNT and max(updated_at) on a store of millions of items)
        self.check_share = 0.1
        self._check_cost = 0.0
        #: how vector spaces are indexed for top-k (exact below a size threshold or
        #: without FAISS; see polyrec.rank.vector_index)
        self.index_settings = IndexSettings()
        #: dense top-k in PostgreSQL's pgvector tables (None: SQLite, no pgvector,
        #: POLYREC_PGVECTOR=off; see polyrec.store.pgvector)
        self.pgvector = PgVectors.for_store(engine.store)

    # -- snapshots -----------------------------------------------------------------------
    def state(self, session: Any) -> StoreState:
        """Signatures of the items table and of every encoder's vectors.

        Read from the database on every call, or at most every ``check_interval``
        seconds when that is set (a server sets it and calls :meth:`invalidate` after
        its own writes)."""
        now = time.monotonic()
        found = self._state
        every = self.check_interval
        if every > 0 and self.check_share > 0:
            every = max(every, self._check_cost / self.check_share)
        if found is not None and now < found.checked + every:
            return found
        # read before the first SELECT: a space loaded in this snapshot is labelled with a
        # generation no newer than the vectors it sees (vectors_rewritten bumps it after
        # the write committed)
        generation = self._vectors_generation
        vectors: dict[str, tuple[Any, ...]] = {}
        tokens = written_tokens(session)  # another process's rewrite in place shows here
        # count and newest row per encoder come from the (encoder) index alone; then the
        # newest row's fingerprint: cheap even with millions of vectors
        for encoder, count, newest in session.execute(
                select(ItemVector.encoder, func.count(ItemVector.id), func.max(ItemVector.id))
                .group_by(ItemVector.encoder)):
            fingerprint, dim = session.execute(select(ItemVector.fingerprint, ItemVector.dim)
                                               .where(ItemVector.id == newest)).one()
            vectors[encoder] = (count, newest, fingerprint, dim, written_token(tokens, encoder))
        found = StoreState(Signature.of(session), vectors, now, lifecycle_key(session),
                            generation=generation)
        self._check_cost = time.monotonic() - now
        self._state = found
        return found

    def retired(self, session: Any, state: StoreState | None = None) -> frozenset[int]:
        """Internal ids of the retired items (never served), read again only when the
        lifecycle key changed (polyrec.store.lifecycle)."""
        key = (state or self.state(session)).lifecycle
        if key is None:
            return frozenset()
        found = self._retired
        if found is not None and found[0] == key:
            return found[1]
        ids = retired_ids(session)
        self._retired = (key, ids)  # one reference assignment
        return ids

    def invalidate(self) -> None:
        """Forget the last signature check: the next request looks at the store again."""
        self._state = None

    def vectors_rewritten(self) -> None:
        """This process wrote vectors, maybe in place (an updated item re-encoded keeps
        the counts and newest id the signatures compare): every encoder's space is read
        again at its next use, and the next request looks at the store again."""
        self._vectors_generation += 1
        self._state = None

    def catalog(self, session: Any, state: StoreState | None = None) -> CatalogSnapshot:
        """The catalogue snapshot, rebuilt when the items table changed."""
        sig = (state or self.state(session)).items
        snap = self._catalog
        if snap is not None and snap.signature == sig:
            return snap
        with self._lock:
            snap = self._catalog
            if snap is None or snap.signature != sig:
                snap = CatalogSnapshot.build(session, sig)
                self._catalog = snap  # atomic swap
                self._intents = {}
            return snap

    def space(self, session: Any, encoder: str, state: StoreState | None = None) -> VectorSpace | None:
        """Stored vectors of ``encoder`` (None when there are none), cached by signature."""
        state = state or self.state(session)
        if encoder not in state.vectors:
            return None
        sig = state.vectors[encoder] + (state.items, state.generation)
        found = self._spaces.get(encoder)
        if found is not None and found.signature == sig:
            return found
        with self._lock:
            found = self._spaces.get(encoder)
            if found is None or found.signature != sig:
                found = self._load_space(session, encoder, sig)
                self._spaces = {**self._spaces, encoder: found}  # atomic swap
            return found

    def _load_space(self, session: Any, encoder: str, sig: tuple[Any, ...]) -> VectorSpace:
        """The encoder's vectors as a space: from the persisted matrix of the same
        vectors when there is one (polyrec.store.vector_cache), else read from the
        store and persisted; with its top-k index (exact or HNSW, vector_index)."""
        directory = index_directory(self.engine.store.url)
        key = None
        if directory is not None:
            # the persisted matrix is named by the stored vectors, not this process's
            # generation (the newest write time moves when a vector is rewritten)
            key = vector_cache.cache_key(encoder, sig[:-1],
                                         vector_cache.newest_write(session, encoder))
            cached = vector_cache.load_matrix(directory, encoder, key)
            if cached is not None:
                ids, matrix = cached
                return VectorSpace.of(encoder, sig, ids, matrix, fingerprint=sig[2],
                                      normalised=True).indexed(self.index_settings, directory, key)
        from polyrec.store.vectors import load_vectors
        ids, vectors = load_vectors(session, encoder)
        space = VectorSpace.of(encoder, sig, ids, vectors, fingerprint=sig[2])
        if directory is not None and key is not None and ids:
            vector_cache.save_matrix(directory, encoder, key, ids, space.matrix)
        return space.indexed(self.index_settings, directory, key)

    def model_space(self, name: str, item_ids: Sequence[int], vectors: torch.Tensor) -> VectorSpace:
        """A trained model's item vectors as a space, normalised once per model version
        and data snapshot (``vectors`` object)."""
        key = f"model:{name}"
        sig = (name, len(item_ids), id(vectors))
        found = self._spaces.get(key)
        if found is not None and found.signature == sig:
            return found
        with self._lock:
            found = self._spaces.get(key)
            if found is None or found.signature != sig:
                found = VectorSpace.of(key, sig, item_ids, vectors).indexed(
                    self.index_settings, index_directory(self.engine.store.url))
                self._spaces = {**self._spaces, key: found}
            return found

    def memo(self, key: Any, build: Any) -> Any:
        """A value derived from immutable snapshots, built once per ``key`` (which must
        name the snapshots' signatures) and kept while they live (at most 64 entries)."""
        found = self._memo.get(key)
        if found is None:
            found = build()
            with self._lock:
                memo = dict(self._memo) if len(self._memo) < 64 else {}
                memo[key] = found
                self._memo = memo
        return found

    def synonyms(self, session: Any) -> Synonyms:
        """The shop's synonyms stored in the database (polyrec.retrieve.synonyms), parsed
        once per stored version."""
        value = get_setting(session, SYNONYMS_SETTING)
        stamp = value.get("at") if isinstance(value, dict) else None
        return self.memo(("synonyms", stamp), lambda: Synonyms.from_json(value))

    def lexical(self, session: Any, backend: str = "auto") -> LexicalIndex:
        found = self._lexical.get(backend)
        if found is None:
            with self._lock:
                found = self._lexical.get(backend) or make_index(session, backend)
                self._lexical = {**self._lexical, backend: found}
        return found

    def refresh(self) -> None:
        """Drop every snapshot; the next request rebuilds what it needs."""
        with self._lock:
            self._catalog, self._spaces, self._intents = None, {}, {}
            self._encoders, self._state, self._memo = {}, None, {}
            self._retired = None
            self._query_cache.clear()

    # -- query encoders ------------------------------------------------------------------
    def query_vector(self, name: str, text: str, fingerprint: str | None) -> tuple[
            torch.Tensor | None, str | None]:
        """The query embedded by encoder ``name``; (None, reason) when it cannot be used.

        The encoder must produce the fingerprint the stored item vectors carry, or the
        query would land in another space."""
        key = (name, fingerprint, text)
        found = self._query_cache.get(key)
        if found is not None:
            return found, None
        for attempt in range(2):
            try:
                encoder, lock = self._encoder(name)
            except PolyrecError as exc:
                return None, f"{name}: {exc}"
            ctx = EncoderContext(engine=self.engine, device=self.engine.device, progress=False)
            with lock:  # tokenizers are not safe to share across threads
                current = encoder.fingerprint()
                if fingerprint is not None and current != fingerprint and attempt == 0:
                    # re-encoded with other options since: load the encoder afresh
                    with self._lock:
                        self._encoders = {n: e for n, e in self._encoders.items() if n != name}
                    continue
                vec = encoder.encode_query(text, ctx)
            break
        if vec is None:
            return None, f"{name}: the encoder cannot embed queries"
        if fingerprint is not None and current != fingerprint:
            return None, (f"{name}: stored vectors were made by {fingerprint}, the encoder is "
                          f"{current}; re-encode to use them")
        self._query_cache.put(key, vec)
        return vec, None

    def query_vectors(self, name: str, texts: Sequence[str],
                      fingerprint: str | None) -> list[torch.Tensor | None]:
        """Several short texts embedded like queries by encoder ``name``, in one batch
        where the encoder has a batched ``encode_texts`` (bert), else one by one through
        :meth:`query_vector`; cached like queries. None for each when it cannot be used."""
        out: list[torch.Tensor | None] = [self._query_cache.get((name, fingerprint, t))
                                          for t in texts]
        missing = sorted({t for t, v in zip(texts, out) if v is None})
        if not missing:
            return out
        try:
            encoder, lock = self._encoder(name)
        except PolyrecError:
            return out
        batch = getattr(encoder, "encode_texts", None)
        if batch is None or len(missing) == 1:
            found = {t: self.query_vector(name, t, fingerprint)[0] for t in missing}
        else:
            ctx = EncoderContext(engine=self.engine, device=self.engine.device, progress=False)
            with lock:
                if fingerprint is not None and encoder.fingerprint() != fingerprint:
                    found = {t: self.query_vector(name, t, fingerprint)[0] for t in missing}
                else:
                    vecs = batch(missing, ctx)
                    found = {t: vecs[k] for k, t in enumerate(missing)}
                    for t, v in found.items():
                        self._query_cache.put((name, fingerprint, t), v)
        return [v if v is not None else found.get(t) for t, v in zip(texts, out)]

    def _encoder(self, name: str) -> tuple[Any, threading.Lock]:
        found = self._encoders.get(name)
        if found is not None:
            return found
        with self._lock:
            found = self._encoders.get(name)
            if found is None:
                # An instance of our own, configured as the pipeline last encoded with:
                # the pipeline's instance may be encoding on another thread meanwhile.
                try:
                    from polyrec.encode.pipeline import stored_options
                    options = stored_options(self.engine, name) or {}
                except ImportError:  # pragma: no cover - a core without the pipeline
                    options = {}
                enc = self.engine.registry("encoders").get(name)(**options)
                enc.prepare(EncoderContext(engine=self.engine, device=self.engine.device,
                                           progress=False))
                found = (enc, threading.Lock())
                self._encoders = {**self._encoders, name: found}
            return found

    def encoder_untrained(self, name: str) -> bool:
        """True when the encoder says it runs without pretrained weights (CLIP offline)."""
        found = self._encoders.get(name)
        if found is None:
            return False
        enc = found[0]
        flag = getattr(enc, "random_weights", None)
        if isinstance(flag, bool):
            return flag
        pretrained = str(getattr(enc, "options", {}).get("pretrained", "x")).lower()
        return pretrained in ("none", "random", "")

    def intent_classifier(self, snap: CatalogSnapshot, space: VectorSpace) -> IntentClassifier | None:
        key = (snap.signature, space.signature)
        if key not in self._intents:
            slot = intent_slot(snap.vocabulary)
            clf = None
            if slot is not None:
                clf = IntentClassifier(slot, snap.vocabulary.labels(slot), space.item_ids,
                                       space.matrix)
            self._intents = {key: clf}
        return self._intents[key]

    def semantic_matcher(self, snap: CatalogSnapshot, space: VectorSpace,
                         temperature: float) -> SemanticMatcher:
        """The catalogue's facet values embedded by the text encoder (names and item
        centroids), built once per catalogue snapshot, vectors and encoder fingerprint."""
        key = ("semantic", snap.signature, space.signature, space.fingerprint, temperature)

        def build() -> SemanticMatcher:
            def embed(values: Sequence[str]) -> list[torch.Tensor | None]:
                return self.query_vectors(SEMANTIC_ENCODER, values, space.fingerprint)
            return SemanticMatcher(snap.vocabulary, embed, space.item_ids, space.matrix,
                                   temperature=temperature)
        return self.memo(key, build)

    def _semantic(self, session: Any, state: StoreState, snap: CatalogSnapshot,
                  und: Understanding, opts: SearchOptions, notes: list[str]) -> None:
        """Semantic facet matching of the words exact matching left (in place)."""
        space = self.space(session, SEMANTIC_ENCODER, state)
        if space is None:
            return
        if space.fingerprint is not None:
            try:
                current = self._encoder(SEMANTIC_ENCODER)[0].fingerprint()
            except PolyrecError as exc:
                notes.append(f"semantic matching off: {exc}")
                return
            if current != space.fingerprint:
                return  # the dense leg says why (re-encode)
        matcher = self.semantic_matcher(snap, space, opts.semantic_temperature)
        query = corrected_query(und)

        def embed(texts: Sequence[str]) -> list[torch.Tensor | None]:
            # the whole query rides in the same batch: the dense leg finds it cached
            return self.query_vectors(SEMANTIC_ENCODER, [query, *texts], space.fingerprint)[1:]
        lexicon = self.lexicon(session, snap) if opts.catalogue_words else None
        wordnet = self.memo(("thesaurus",), WordNet.find) if opts.thesaurus else None
        matcher.apply(und, embed, threshold=opts.semantic_threshold,
                      colour_min=opts.semantic_colour_min, lexicon=lexicon,
                      thesaurus=wordnet, thesaurus_min=opts.thesaurus_min,
                      thesaurus_agree=opts.thesaurus_agree,
                      thesaurus_margin=opts.thesaurus_margin)

    def lexicon(self, session: Any, snap: CatalogSnapshot) -> CatalogueLexicon:
        """The associations of the catalogue's words with its facet values, mined once
        per catalogue snapshot (polyrec.retrieve.catalogue_lexicon)."""
        def build() -> CatalogueLexicon:
            docs = session.execute(select(Item.id, Item.title, Item.text).order_by(Item.id))
            return CatalogueLexicon(snap.vocabulary, docs, SEMANTIC_SLOTS, stopwords=STOPWORDS)
        return self.memo(("lexicon", snap.signature), build)

    def intent_model(self, space: VectorSpace) -> tuple[Any, dict[int, float]] | None:
        """The trained intent model for ``space``'s vectors and its demand score per
        item, loaded once per model version and vectors; None when none is trained
        (or it was trained on other vectors)."""
        try:
            from polyrec.retrieve.intent_model import intent_status, latest_version
        except ImportError:  # pragma: no cover - a core without intent models
            return None
        version = latest_version(self.engine)
        if version is None:
            return None
        key = ("intent-model", version, space.signature)

        def build() -> tuple[Any, dict[int, float]] | None:
            loaded, _why = intent_status(self.engine, fingerprint=space.fingerprint)
            if loaded is None:
                return None
            with torch.inference_mode():
                scores = loaded.model.item_demand(space.matrix)
            return loaded, {i: float(v) for i, v in zip(space.item_ids, scores.tolist())}
        return self.memo(key, build)

    def _intent_model(self, und: Understanding, dense: tuple[VectorSpace, torch.Tensor],
                      snap: CatalogSnapshot, opts: SearchOptions) -> dict[int, float]:
        """Soft facets from the intent model's confident predictions for slots the query
        named nothing in (in place); returns the items' demand scores (tie-break)."""
        found = self.intent_model(dense[0])
        if found is None:
            return {}
        loaded, demand = found
        with torch.inference_mode():
            pred = loaded.predict(dense[1])
        named = {m.slot for m in und.matches}
        best: dict[str, tuple[float, str, list[tuple[str, float]]]] = {}
        for fld, dist in pred.facets.items():
            if not dist:
                continue
            slot = slot_of(fld)
            top_p = float(dist[0][1])
            if slot in named or top_p < opts.intent_model_threshold:
                continue
            if slot not in best or top_p > best[slot][0]:
                best[slot] = (top_p, fld, [(v, float(p)) for v, p in dist])
        vocab = snap.vocabulary
        for slot, (top_p, fld, dist) in best.items():
            member: dict[int, float] = {}
            kept = [(v, p) for v, p in dist if p >= 0.2 * top_p
                    and (slot, v.lower()) in vocab.facets]
            for v, p in kept:
                for it in vocab.facets[(slot, v.lower())].items:
                    member[it] = min(1.0, member.get(it, 0.0) + p / top_p)
            if not kept:
                continue
            facet = vocab.facets[(slot, kept[0][0].lower())]
            und.matches.append(Match(und.query, slot, facet.value, (fld,), "intent-model",
                                     round(top_p, 4),
                                     tuple((v, round(p, 4)) for v, p in kept[1:6])))
            und.soft[f"{slot}~intent"] = member
        und.intent_model = {"version": loaded.version, **pred.as_dict()}
        return demand

    # -- search --------------------------------------------------------------------------
    def search(self, query: str, k: int = 10, *, user: str | None = None,
               filters: Mapping[str, Any] | None = None, **options: Any) -> SearchResponse:
        """See :meth:`engine.engine.Engine.search`."""
        query = validate_query(query)
        k = validate_k(k)
        opts = SearchOptions.from_kwargs(options)
        notes: list[str] = []
        use_lexical = opts.weights.get("lexical", 0.0) != 0.0
        if use_lexical:  # bring the BM25 index up to date in a short write transaction of its own
            with self.engine.store.session() as s:
                self.lexical(s, opts.lexical_backend).sync(s, self.state(s).items)
        with self.engine.store.snapshot() as s:  # from here on: reads only, one snapshot
            state = self.state(s)
            snap = self.catalog(s, state)
            allowed = snap.allowed(filters)
            retired = self.retired(s, state)  # every retriever leaves them out
            # the shop's own synonyms first: every retriever reads the rewritten query
            rewritten, applied = (self.synonyms(s).rewrite(query) if opts.synonyms
                                  else (query, {}))
            und = (snap.vocabulary.understand(rewritten) if opts.understanding != "off"
                   else Understanding(rewritten))
            und.synonyms = applied
            pool = max(opts.candidates, 5 * k)
            text = corrected_query(und)  # misspelt words read as the catalogue's words
            if opts.understanding != "off" and opts.semantic:
                self._semantic(s, state, snap, und, opts, notes)
            rankings: dict[str, list[int]] = {}
            dense: tuple[VectorSpace, torch.Tensor] | None = None
            for ranking, encoder in DENSE_ENCODERS.items():
                if opts.weights.get(ranking, 0.0) == 0.0:
                    continue
                space = self.space(s, encoder, state)
                if space is None:
                    continue
                vec, why = self.query_vector(encoder, text, space.fingerprint)
                if vec is None:
                    notes.append(why or f"{encoder}: unavailable")
                    continue
                if encoder == "clip" and self.encoder_untrained("clip") and not opts.untrained_clip:
                    notes.append("clip: the CLIP model has no pretrained weights (none exist "
                                 "offline); cross-modal retrieval skipped")
                    continue
                top = (self.pgvector.search(s, encoder, state.vectors[encoder][3], vec, pool,
                                            allowed, exclude=retired)
                       if self.pgvector is not None else None)
                if top is None:  # no pgvector table in this snapshot: search in the process
                    top = space.search(vec, pool, allowed, retired)
                rankings[ranking] = [i for i, _ in top]
                if ranking == "dense":
                    dense = (space, vec)
                    if opts.understanding != "off":
                        clf = self.intent_classifier(snap, space)
                        und.intent = clf.classify(vec) if clf is not None and len(clf) else None
            demand: dict[int, float] = {}
            if dense is not None and opts.understanding != "off" and opts.intent_model:
                demand = self._intent_model(und, dense, snap, opts)
            if use_lexical:
                index = self.lexical(s, opts.lexical_backend)
                # synced above in a write transaction of its own; this snapshot only reads
                rankings["lexical"] = [i for i, _ in index.search(s, text, pool, allowed,
                                                                  state.items, sync=False,
                                                                  exclude=retired)]
            if not rankings:
                notes.append("no retriever available: no vectors and lexical search disabled")
            candidates: dict[int, None] = {}
            for r in rankings.values():
                candidates.update(dict.fromkeys(i for i in r if i not in retired))
            full = und.full_matches() - retired
            if allowed is not None:
                full &= allowed
            if full and opts.understanding != "off":  # matches of every facet join the pool
                ranked = ([i for i, _ in dense[0].search(dense[1], pool, full)] if dense is not None
                          else sorted(full)[:pool])
                if len(ranked) < pool:  # full matches without a vector
                    ranked += sorted(full - set(ranked))[:pool - len(ranked)]
                candidates.update(dict.fromkeys(ranked))
            if opts.understanding == "filter" and full:
                candidates = {i: None for i in candidates if i in full}
            elif opts.understanding == "filter" and und.matches:
                notes.append("no item matches everything the query names; showing the closest")
        # outside the read transaction: the model and the feedback learners use their own
        personal, how = self._personal(user, list(candidates), notes, state)
        if personal:
            rankings["personal"] = personal
        fused = rrf(rankings, opts.weights, opts.rrf_k)
        intent = und.intent if (und.intent and und.intent["confidence"] >= opts.intent_threshold
                                and not any(m.slot == und.intent["slot"] for m in und.matches)) else None
        intent_items = (snap.vocabulary.labels(intent["slot"]).get(intent["value"], set())
                        if intent else set())
        positions = {name: {item: r for r, item in enumerate(rk, start=1)}
                     for name, rk in rankings.items()}
        scored = []
        for item in candidates:
            score = fused.get(item, 0.0)
            if opts.understanding != "off":
                score += opts.facet_boost * und.match_fraction(item)
                if item in intent_items:
                    score += opts.intent_boost * float(intent["confidence"])  # type: ignore[index]
            scored.append((score, item))
        scored.sort(key=lambda t: (-t[0], -demand.get(t[1], 0.0), t[1]))
        hits = [SearchHit(item=snap.external[i], score=sc, title=snap.titles.get(i),
                          ranks={n: p[i] for n, p in positions.items() if i in p},
                          matched=_matched(snap.vocabulary, und, i),
                          attributes=snap.attributes.get(i, {}))
                for sc, i in scored[:k]]
        return SearchResponse(query, hits, und, list(rankings), how, notes)

    # -- cold start ----------------------------------------------------------------------
    def popular(self, k: int, filters: Mapping[str, Any] | None = None,
                exclude: set[str] | None = None) -> list[tuple[str, float]]:
        """The ``k`` live items (never a retired one) with most distinct users (ties by
        id), passing ``filters``: the answer for users nobody knows yet. (external id,
        share of users)."""
        k = validate_k(k)
        with self.engine.store.snapshot() as s:
            state = self.state(s)
            snap = self.catalog(s, state)
            retired = self.retired(s, state)
            sig = s.execute(select(func.count(Interaction.id), func.max(Interaction.id))).one()
            key = ("popular", tuple(sig))
            counts = self._memo.get(key)
            if counts is None:
                rows = s.execute(select(Interaction.item_id,
                                        func.count(func.distinct(Interaction.user_id)))
                                 .group_by(Interaction.item_id)).all()
                users = max(1, s.execute(select(func.count(func.distinct(Interaction.user_id)))).scalar_one())
                counts = sorted(((n / users, i) for i, n in rows), key=lambda t: (-t[0], t[1]))
                self.memo(key, lambda: counts)
        allowed = snap.allowed(filters)
        out: list[tuple[str, float]] = []
        for share, i in counts:
            ext = snap.external.get(i)
            if ext is None or i in retired or (allowed is not None and i not in allowed) \
                    or (exclude and ext in exclude):
                continue
            out.append((ext, share))
            if len(out) >= k:
                break
        return out

    # -- personalisation -----------------------------------------------------------------
    def _personal(self, user: str | None, candidates: list[int], notes: list[str],
                  state: StoreState) -> tuple[list[int], str | None]:
        """Candidates ranked for ``user``: by the trained pipeline's scores for the user
        (blended with the online learner's state, as recommend does) when a model is
        trained and knows the user, else by similarity to the user's history in the text
        space. ([], None) when the user is unknown or has nothing to go on."""
        if user is None or not candidates:
            return [], None
        with self.engine.store.snapshot() as s:
            uid = catalog.user_ids(s, [str(user)]).get(str(user))
        if uid is None:
            notes.append(f"unknown user '{user}': results are not personalised")
            return [], None
        model = model_scores(self.engine, uid)
        if model is not None:
            name, item_ids, scores = model
            index = self.memo(("item-index", name, len(item_ids)),
                              lambda: {it: n for n, it in enumerate(item_ids)})
            pairs = [(float(scores[index[i]]), i) for i in candidates if i in index]
            pairs = [p for p in pairs if p[0] != float("-inf")]
            pairs.sort(key=lambda t: (-t[0], t[1]))
            return [i for _, i in pairs], f"model:{name}"
        with self.engine.store.snapshot() as s:
            space = self.space(s, "bert", state)
            hist = [i for (i,) in s.execute(select(Interaction.item_id)
                                            .where(Interaction.user_id == uid))]
        rows = [space.row[i] for i in hist if space is not None and i in space.row]
        if space is None or not rows:
            notes.append(f"user '{user}' has no history to personalise with")
            return [], None
        uvec = space.matrix[rows].mean(0)
        cand = [(space.row[i], i) for i in candidates if i in space.row]
        if not cand:
            return [], None
        scores = space.matrix[[r for r, _ in cand]] @ uvec
        order = torch.argsort(scores, descending=True)
        return [cand[int(j)][1] for j in order], "history:bert"


def _matched(vocab: Vocabulary, und: Understanding, item: int) -> list[str]:
    """'slot=value' for each recognised value the item carries (for a semantic match,
    the value or one of its alternatives)."""
    out = []
    for m in und.matches:
        for value in [m.value] + [v for v, _ in m.alternatives]:
            facet = vocab.facets.get((m.slot, value.lower()))
            if facet is not None and item in facet.items:
                out.append(f"{m.slot}={value}")
                break
    return out


def corrected_query(und: Understanding) -> str:
    """The query with its misspelt words replaced by the catalogue words they were read
    as (the query itself when nothing was corrected)."""
    if not und.corrected:
        return und.query
    from polyrec.retrieve.lexical import tokens
    return " ".join(und.corrected.get(t, t) for t in tokens(und.query))


def trained_pipeline(engine: "Engine", *, current: bool = False) -> Any | None:
    """The Engine's loaded recommendation pipeline (polyrec.rank.recommend.Recommender), or None
    when no model is trained. ``current``: kept up to date as for a recommendation (the
    live version followed; the data snapshot refreshed when the store changed: new items,
    events, vectors), on a background thread so that no search or similar-items request
    waits for a refresh: they see what recommend sees within about one refresh."""
    try:
        rec = engine.services.recommender()
    except ModelNotTrainedError:
        return None
    if current:
        rec.check_live()
        rec.refresh(background=True)
    return rec


def model_scores(engine: "Engine", user_id: int) -> tuple[str, list[int], torch.Tensor] | None:
    """(model name, item ids, the user's scores over them) from the trained pipeline,
    blended with the online learner as Engine.recommend does; None when no model is
    trained or it does not know the user."""
    rec = trained_pipeline(engine, current=True)
    if rec is None:
        return None
    with rec.pinned() as snap:  # index, scores and the online blend from one snapshot
        if user_id not in snap.user_index:
            return None
        scores = rec.scores(torch.tensor([snap.user_index[user_id]]))[0]
        try:
            from polyrec.feedback import events
            scores = events.online_scores(engine, rec, user_id, scores)
        except (ImportError, AttributeError):  # pragma: no cover - no feedback learners
            pass
        return f"pipeline:v{rec.version}", list(snap.data.item_ids), scores


def model_space(engine: "Engine") -> VectorSpace | None:
    """The trained pipeline's fused item vectors (its two-tower item tower, else its
    encoder features) as a VectorSpace; None when no model is trained."""
    rec = trained_pipeline(engine, current=True)
    if rec is None:
        return None
    with rec.pinned() as snap:  # vectors and item ids from one data snapshot
        vectors = rec.vectors()
        if vectors is None or vectors.shape[0] != len(snap.data.item_ids):
            return None
        return searcher(engine).model_space(f"pipeline:v{rec.version}", snap.data.item_ids,
                                            vectors)


def validate_query(query: Any) -> str:
    """A non-empty query string of at most MAX_QUERY_CHARS characters."""
    if not isinstance(query, str):
        raise ValidationError("the query must be a string", field="query")
    query = query.strip()
    if not query:
        raise ValidationError("the query is empty", field="query")
    if len(query) > MAX_QUERY_CHARS:
        raise ValidationError(f"the query is {len(query):,} characters; at most "
                              f"{MAX_QUERY_CHARS:,} are allowed", field="query")
    return query


def validate_k(k: Any) -> int:
    """k as an int in 1..MAX_K."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValidationError("k must be an integer", field="k")
    if not 1 <= k <= MAX_K:
        raise ValidationError(f"k must be between 1 and {MAX_K}, not {k}", field="k")
    return k


def searcher(engine: "Engine") -> Searcher:
    """The Engine's Searcher (created on first use, one per Engine)."""
    return engine.services.searcher()


def search(engine: "Engine", query: str, k: int = 10, *, user: str | None = None,
           filters: Mapping[str, Any] | None = None, **options: Any) -> SearchResponse:
    """Engine.search: hybrid retrieval with query understanding (see the module doc)."""
    return searcher(engine).search(query, k, user=user, filters=filters, **options)

