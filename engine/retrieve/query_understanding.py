"""Query understanding: recognise catalogue facets and graph entities in a search query.

A :class:`Vocabulary` is built from the catalogue and the knowledge graph:

- **attribute facets**: item attribute fields whose values are short labels shared by
  several items (H&M ``colour_group_name``, ``product_type_name``, ``department_name``;
  MovieLens ``class`` genres, ...);
- **graph entities**: knowledge-graph entities with a label that items point to through a
  relation (``has_colour``, ``has_type``, ``film.film.genre``, ``directed_by``, ...).

Each field or relation is mapped to a *slot* (``colour``, ``type``, ``genre``, ``person``,
``department``, ...) by its name. :meth:`Vocabulary.understand` finds the longest phrases of
the query that name a facet value (plurals and case ignored) and returns an
:class:`Understanding`: what was recognised, which items carry it, and the rest of the
query. When the query names no product type (or genre), :class:`IntentClassifier` guesses
one from the catalogue's own labels: the label whose items' text vectors lie closest to
the query vector.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from polyrec.retrieve.lexical import _attributes, terms
from polyrec.store.models import Entity, Item, Relation, Triple

#: (slot, words that name it inside a field or relation name), checked in this order.
SLOT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("colour", ("colour", "color")),
    ("type", ("product_type", "type", "kind")),
    ("genre", ("genre", "class")),
    ("brand", ("brand", "manufacturer", "maker", "label")),
    ("person", ("director", "directed", "actor", "starring", "writer", "written", "author",
                "artist", "producer", "produced", "cinematograph", "person", "people")),
    ("pattern", ("appearance", "pattern", "print")),
    ("material", ("material", "fabric")),
    ("department", ("department",)),
    ("category", ("category", "group", "section", "index", "garment", "subject")),
    ("year", ("year",)),
)
#: When one phrase names values in several slots, the earlier slot wins.
SLOT_PRIORITY: tuple[str, ...] = tuple(s for s, _ in SLOT_RULES)
#: Slots whose labels are used to classify a query's intent, first present wins.
INTENT_SLOTS: tuple[str, ...] = ("type", "genre", "category")
#: Values that name nothing.
STOP_VALUES = frozenset({"unknown", "undefined", "other", "others", "none", "n/a", "na", "nan",
                         "null", "misc", "-", "various"})


def slot_of(name: str) -> str:
    """The slot a field or relation name stands for (the name itself when none fits)."""
    low = name.lower()
    for slot, words in SLOT_RULES:
        if any(w in low for w in words):
            return slot
    return low


def _values(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, (list, tuple)) and all(isinstance(v, str) for v in raw):
        return list(raw)
    return []


@dataclass
class Facet:
    """One recognisable value: a slot, its label, where it came from, and its items."""

    slot: str
    value: str
    fields: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)
    items: set[int] = field(default_factory=set)
    #: True when items carry several values of this field (a list: genres, tags).
    multi: bool = False


@dataclass(frozen=True)
class Match:
    """A span of the query recognised as a facet value."""

    text: str
    slot: str
    value: str
    fields: tuple[str, ...]
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "slot": self.slot, "value": self.value,
                "fields": list(self.fields), "source": self.source}


@dataclass
class Understanding:
    """What the query was understood to ask for."""

    query: str
    matches: list[Match] = field(default_factory=list)
    residual: str = ""
    intent: dict[str, Any] | None = None
    #: constraint -> items satisfying it; an item matches fully when it is in every set.
    #: One constraint per slot (values of a single-valued field are OR-ed: "black or
    #: white"), one per value for multi-valued fields (AND: "children's animation").
    slot_items: dict[str, set[int]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """slot -> value (a list when several values of a slot were named), e.g.
        ``{"colour": "Black", "type": "Dress"}``."""
        out: dict[str, list[str]] = {}
        for m in self.matches:
            vals = out.setdefault(m.slot, [])
            if m.value not in vals:
                vals.append(m.value)
        return {k: (v[0] if len(v) == 1 else v) for k, v in out.items()}

    def match_fraction(self, item_id: int) -> float:
        """Share of recognised slots the item satisfies (0 when nothing was recognised)."""
        if not self.slot_items:
            return 0.0
        hits = sum(1 for ids in self.slot_items.values() if item_id in ids)
        return hits / len(self.slot_items)

    def full_matches(self) -> set[int]:
        """Items that satisfy every recognised slot."""
        sets = list(self.slot_items.values())
        if not sets:
            return set()
        out = set(sets[0])
        for s in sets[1:]:
            out &= s
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"query": self.query, "understood": self.summary(),
                "entities": [m.as_dict() for m in self.matches], "residual": self.residual,
                "intent": self.intent}


class Vocabulary:
    """Recognisable phrases of one catalogue and graph. Immutable once built."""

    def __init__(self, facets: Iterable[Facet]) -> None:
        self.facets: dict[tuple[str, str], Facet] = {}
        self.phrases: dict[tuple[str, ...], list[Facet]] = defaultdict(list)
        for f in facets:
            key = (f.slot, f.value.lower())
            if key in self.facets:  # the same value from another field or the graph: merge
                known = self.facets[key]
                known.fields |= f.fields
                known.sources |= f.sources
                known.items |= f.items
                known.multi = known.multi or f.multi
                continue
            self.facets[key] = f
            phrase = tuple(terms(f.value))
            if phrase:
                self.phrases[phrase].append(f)
        self.max_len = max((len(p) for p in self.phrases), default=0)

    # -- building ------------------------------------------------------------------------
    @classmethod
    def build(cls, session: Session, *, max_values: int = 1000, max_ratio: float = 0.5,
              max_chars: int = 60) -> "Vocabulary":
        """Facets from item attributes and labelled graph entities of the store.

        A field is a facet field when its string values are at most ``max_values``
        distinct, at most ``max_chars`` long, and shared: distinct values / items with
        the field <= ``max_ratio`` (so names and descriptions are left out).
        """
        values: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        with_field: dict[str, int] = defaultdict(int)
        multi: set[str] = set()
        for item_id, raw in session.execute(select(Item.id, Item.attributes)):
            for name, value in _attributes(raw).items():
                vals = _values(value)
                if not vals:
                    continue
                with_field[name] += 1
                if not isinstance(value, str):
                    multi.add(name)
                for v in vals:
                    v = v.strip()
                    if v:
                        values[name][v].add(item_id)
        facets: list[Facet] = []
        for name, by_value in values.items():
            if len(by_value) > max_values or len(by_value) > max_ratio * with_field[name]:
                continue
            slot = slot_of(name)
            for v, ids in by_value.items():
                if _usable(v, max_chars):
                    facets.append(Facet(slot, v, {name}, {"attribute"}, set(ids), name in multi))
        facets += _graph_facets(session, max_chars)
        return cls(facets)

    # -- use -----------------------------------------------------------------------------
    def labels(self, slot: str) -> dict[str, set[int]]:
        """value -> items for one slot."""
        return {f.value: f.items for (s, _), f in self.facets.items() if s == slot and f.items}

    def slots(self) -> list[str]:
        return sorted({s for s, _ in self.facets}, key=_slot_rank)

    def understand(self, query: str) -> Understanding:
        """Recognise facet values in ``query``, longest phrase first, left to right."""
        qterms = terms(query)
        matches: list[Match] = []
        slot_items: dict[str, set[int]] = {}
        residual: list[str] = []
        i = 0
        while i < len(qterms):
            found = None
            for n in range(min(self.max_len, len(qterms) - i), 0, -1):
                cands = self.phrases.get(tuple(qterms[i:i + n]))
                if cands:
                    found = (n, cands)
                    break
            if found is None:
                residual.append(qterms[i])
                i += 1
                continue
            n, cands = found
            best = min(cands, key=lambda f: (_slot_rank(f.slot), -len(f.items)))
            same_slot = [f for f in cands if f.slot == best.slot]
            for f in same_slot:
                m = Match(" ".join(qterms[i:i + n]), f.slot, f.value, tuple(sorted(f.fields)),
                          "graph" if f.sources == {"graph"} else "attribute")
                if m not in matches:
                    matches.append(m)
                key = f"{f.slot}={f.value}" if f.multi else f.slot
                slot_items.setdefault(key, set()).update(f.items)
            i += n
        return Understanding(query, matches, " ".join(residual), None, slot_items)


def _slot_rank(slot: str) -> int:
    return SLOT_PRIORITY.index(slot) if slot in SLOT_PRIORITY else len(SLOT_PRIORITY)


def _usable(value: str, max_chars: int) -> bool:
    low = value.strip().lower()
    if len(low) < 2 or len(low) > max_chars or low in STOP_VALUES:
        return False
    return bool(terms(low))


def _graph_facets(session: Session, max_chars: int) -> list[Facet]:
    """Facets from triples item-entity -> relation -> labelled entity (either direction)."""
    head, tail = aliased(Entity), aliased(Entity)
    out: dict[tuple[str, str], Facet] = {}
    per_item: dict[tuple[str, int], int] = defaultdict(int)  # values per (relation, item)
    for item_side, other in ((head, tail), (tail, head)):
        query = (select(item_side.item_id, Relation.name, other.label, other.type)
                 .select_from(Triple)
                 .join(head, Triple.head_id == head.id).join(tail, Triple.tail_id == tail.id)
                 .join(Relation, Triple.relation_id == Relation.id)
                 .where(item_side.item_id.is_not(None)).where(other.item_id.is_(None))
                 .where(other.label.is_not(None)))
        for item_id, relation, label, etype in session.execute(query):
            if not _usable(label, max_chars):
                continue
            slot = slot_of(relation)
            if slot == relation.lower() and etype:
                slot = slot_of(etype)
            f = out.setdefault((slot, label.lower()), Facet(slot, label, set(), {"graph"}, set()))
            f.fields.add(relation)
            f.items.add(item_id)
            per_item[(relation, item_id)] += 1
    multi = {rel for (rel, _), n in per_item.items() if n > 1}
    for f in out.values():
        f.multi = bool(f.fields & multi)
    return list(out.values())


class IntentClassifier:
    """Nearest label centroid in an item vector space (e.g. BERT text vectors).

    For each label of an intent slot with at least ``min_items`` items, the centroid is
    the normalised mean of its items' normalised vectors; a query vector is classified by
    a softmax over cosine similarities divided by ``temperature``.
    """

    def __init__(self, slot: str, labels: Mapping[str, set[int]], item_ids: Sequence[int],
                 vectors: torch.Tensor, *, min_items: int = 3, temperature: float = 0.05) -> None:
        self.slot, self.temperature = slot, temperature
        row = {it: k for k, it in enumerate(item_ids)}
        names, cents = [], []
        for label, ids in sorted(labels.items()):
            rows = [row[i] for i in ids if i in row]
            if len(rows) >= min_items:
                names.append(label)
                cents.append(torch.nn.functional.normalize(vectors[rows].mean(0), dim=0))
        self.labels = names
        self.centroids = torch.stack(cents) if cents else torch.empty(0, vectors.shape[1])

    def __len__(self) -> int:
        return len(self.labels)

    def classify(self, query_vector: torch.Tensor, top: int = 3) -> dict[str, Any] | None:
        """{"slot", "value", "confidence", "alternatives"}; None without labels."""
        if not self.labels:
            return None
        q = torch.nn.functional.normalize(query_vector.float().flatten(), dim=0)
        probs = torch.softmax(self.centroids @ q / self.temperature, dim=0)
        conf, idx = probs.topk(min(top, len(self.labels)))
        alts = [{"value": self.labels[int(i)], "confidence": round(float(c), 4)}
                for c, i in zip(conf, idx)]
        return {"slot": self.slot, "value": alts[0]["value"], "confidence": alts[0]["confidence"],
                "alternatives": alts[1:], "source": "classifier"}


def intent_slot(vocab: Vocabulary) -> str | None:
    """The first slot of INTENT_SLOTS the catalogue has labels for."""
    present = set(vocab.slots())
    return next((s for s in INTENT_SLOTS if s in present), None)

