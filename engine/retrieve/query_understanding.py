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

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from polyrec.retrieve.lexical import _attributes, stem, terms, tokens
from polyrec.retrieve.word_forms import base_forms
from polyrec.store.models import Entity, Item, Relation, Triple

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.retrieve.catalogue_lexicon import CatalogueLexicon
    from polyrec.retrieve.thesaurus import WordNet

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
#: Slots of organisational units: a phrase naming one and a wider value of a later slot
#: holding WIDER_SHARE of its items means the wider value.
NARROW_SLOTS: frozenset[str] = frozenset({"department"})
WIDER_SHARE = 0.9
#: Slots whose labels are used to classify a query's intent, first present wins.
INTENT_SLOTS: tuple[str, ...] = ("type", "genre", "category")
#: Shortest (stemmed) query word a spelling correction is tried on.
MIN_CORRECT = 4
#: Function words: never corrected, never a semantic span on their own.
STOPWORDS = frozenset("""a about above after an and any are around as at be below between buy
by clothes clothing color colour for from
get go good i in into is it
its less like look looking me more my near need new nice of on or other our over some something
somebody someone than that the
their them these this those to under want wear wearing what with without you your""".split())
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
    #: 1.0 for a match by the words themselves; the value's probability for a semantic one
    confidence: float = 1.0
    #: other values of the slot the span may mean, with their probabilities (semantic)
    alternatives: tuple[tuple[str, float], ...] = ()
    #: the related words a thesaurus reading went through ("pullover" -> "sweater")
    via: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out = {"text": self.text, "slot": self.slot, "value": self.value,
               "fields": list(self.fields), "source": self.source,
               "confidence": round(self.confidence, 4)}
        if self.alternatives:
            out["alternatives"] = [{"value": v, "confidence": round(p, 4)}
                                   for v, p in self.alternatives]
        if self.via:
            out["via"] = list(self.via)
        return out


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
    #: soft constraints (semantic matches, intent-model facets): constraint -> item ->
    #: membership in [0, 1] (the summed probability of the values the item carries).
    soft: dict[str, dict[int, float]] = field(default_factory=dict)
    #: the query's word tokens, and the (start, end) token span of each match.
    tokens: list[str] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    #: misspelt words read as catalogue words: {"jaket": "jacket"}
    corrected: dict[str, str] = field(default_factory=dict)
    #: phrases the shop's synonyms rewrote before reading: {"plaid": "check"}
    synonyms: dict[str, str] = field(default_factory=dict)
    #: what a trained intent model read in the query (its facets and demand), if used
    intent_model: dict[str, Any] | None = None

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
        n = len(self.slot_items) + len(self.soft)
        if not n:
            return 0.0
        hits = sum(1 for ids in self.slot_items.values() if item_id in ids)
        hits += sum(m.get(item_id, 0.0) for m in self.soft.values())
        return hits / n

    def full_matches(self, soft_min: float = 0.5) -> set[int]:
        """Items that satisfy every recognised slot (a soft one from ``soft_min``)."""
        sets = list(self.slot_items.values()) + [
            {i for i, w in m.items() if w >= soft_min} for m in self.soft.values()]
        if not sets:
            return set()
        out = set(sets[0])
        for s in sets[1:]:
            out &= s
        return out

    def as_dict(self) -> dict[str, Any]:
        out = {"query": self.query, "understood": self.summary(),
               "entities": [m.as_dict() for m in self.matches], "residual": self.residual,
               "intent": self.intent}
        if self.corrected:
            out["corrected"] = dict(self.corrected)
        if self.intent_model is not None:
            out["intent_model"] = self.intent_model
        return out


class Vocabulary:
    """Recognisable phrases of one catalogue and graph. Immutable once built."""

    def __init__(self, facets: Iterable[Facet], words: Mapping[str, int] | None = None,
                 known: Iterable[str] = ()) -> None:
        """``words``: catalogue terms a misspelt query word may be corrected to, with
        their frequency (the words of attribute values); ``known``: further terms that
        are never corrected (titles, descriptions)."""
        self.words: dict[str, int] = {w: n for w, n in (words or {}).items()
                                      if len(w) >= 3 and w not in STOPWORDS}
        self.known: frozenset[str] = frozenset(known) | frozenset(self.words)
        self._deletes: dict[str, list[str]] = defaultdict(list)
        for w in self.words:
            if len(w) >= MIN_CORRECT - 1:
                for d in _deletes(w):
                    self._deletes[d].append(w)
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
        words: dict[str, int] = defaultdict(int)
        known: set[str] = set()
        for item_id, raw, title, text in session.execute(
                select(Item.id, Item.attributes, Item.title, Item.text)):
            known.update(terms(title))
            known.update(terms(text[:2000] if text else None))
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
                        if len(v) <= max_chars:
                            for t in terms(v):
                                words[t] += 1
        facets: list[Facet] = []
        for name, by_value in values.items():
            if len(by_value) > max_values or len(by_value) > max_ratio * with_field[name]:
                continue
            slot = slot_of(name)
            for v, ids in by_value.items():
                if _usable(v, max_chars):
                    facets.append(Facet(slot, v, {name}, {"attribute"}, set(ids), name in multi))
        facets += _graph_facets(session, max_chars)
        return cls(facets, {w: n for w, n in words.items() if not w.isdigit()}, known)

    # -- use -----------------------------------------------------------------------------
    def labels(self, slot: str) -> dict[str, set[int]]:
        """value -> items for one slot."""
        return {f.value: f.items for (s, _), f in self.facets.items() if s == slot and f.items}

    def slots(self) -> list[str]:
        return sorted({s for s, _ in self.facets}, key=_slot_rank)

    def correct(self, term: str) -> str | None:
        """The catalogue word a misspelt ``term`` (stemmed) most likely means: an unknown
        term of at least MIN_CORRECT letters within one edit (insertion, deletion,
        substitution, transposition; two from 8 letters; for the shortest words only an
        insertion) of a word of the attribute values, the most frequent first. None when the term is known or nothing is close."""
        if len(term) < MIN_CORRECT or term in self.known or term in STOPWORDS or term.isdigit():
            return None
        limit = 2 if len(term) >= 8 else 1
        cands: set[str] = set(self._deletes.get(term, ()))
        for d in _deletes(term):
            cands.update(self._deletes.get(d, ()))
            if d in self.words:
                cands.add(d)
        if len(term) == MIN_CORRECT:  # short words: only a missing letter ("blak")
            cands = {c for c in cands if len(c) == len(term) + 1}
        best = [(self.words[c], c) for c in cands if _edits(term, c) <= limit]
        return max(best)[1] if best else None

    def split(self, term: str) -> tuple[str, str] | None:
        """An unknown word that is a value's two words written together ("tshirt" ->
        ("t", "shirt") when "T-shirt" is a value); None otherwise."""
        if len(term) < MIN_CORRECT or term in self.known or term in self.words:
            return None
        for k in range(1, len(term)):
            pair = (term[:k], stem(term[k:]))
            if pair in self.phrases:
                return pair
        return None

    def understand(self, query: str) -> Understanding:
        """Recognise facet values in ``query``, longest phrase first, left to right
        (misspelt words are first corrected to catalogue words, see :meth:`correct`)."""
        qtokens = tokens(query)
        qterms = [stem(t) for t in qtokens]
        corrected: dict[str, str] = {}
        for k in range(len(qterms) - 1, -1, -1):
            t = qterms[k]
            split = self.split(t)
            if split is not None:  # "tshirt" -> "t shirt"
                corrected[qtokens[k]] = " ".join(split)
                qterms[k:k + 1] = list(split)
                qtokens[k:k + 1] = list(split)
                continue
            fixed = self.correct(t)
            if fixed is not None:
                corrected[qtokens[k]] = fixed
                qterms[k] = fixed
        matches: list[Match] = []
        spans: list[tuple[int, int]] = []
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
            if best.slot in NARROW_SLOTS:
                # a department is a unit of the shop: when the phrase also names a later
                # slot's value holding (nearly) all its items, the shopper means that
                # ("shoes": the product group Shoes, not the men's department "Shoes")
                unit = set().union(*(f.items for f in same_slot))
                wider = [f for f in cands if _slot_rank(f.slot) > _slot_rank(best.slot)
                         and len(f.items) > len(unit)
                         and len(f.items & unit) >= WIDER_SHARE * len(unit)]
                if wider:
                    best = min(wider, key=lambda f: (_slot_rank(f.slot), len(f.items)))
                    same_slot = [f for f in cands if f.slot == best.slot]
            for f in same_slot:
                m = Match(" ".join(qterms[i:i + n]), f.slot, f.value, tuple(sorted(f.fields)),
                          "graph" if f.sources == {"graph"} else "attribute")
                if m not in matches:
                    matches.append(m)
                    spans.append((i, i + n))
                key = f"{f.slot}={f.value}" if f.multi else f.slot
                slot_items.setdefault(key, set()).update(f.items)
            i += n
        return Understanding(query, matches, " ".join(residual), None, slot_items,
                             tokens=qtokens, spans=spans, corrected=corrected)


def _deletes(word: str) -> list[str]:
    return [word[:k] + word[k + 1:] for k in range(len(word))]


def _edits(a: str, b: str) -> int:
    """Optimal string alignment distance (Levenshtein plus adjacent transpositions)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


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



#: Scores that rank a span's readings above any encoder score: a word inside a value's
#: name, then a derived form of a value's word, then a colour name, then a catalogue
#: association (plus its strength), then a reading through the thesaurus (plus its confidence).
_PARTIAL, _FORM, _COLOUR, _CATALOGUE, _THESAURUS = 1e9, 1e8, 1e6, 1e3, 1e2
#: where a value name divides into units for partial matches: spaces and slashes (a
#: hyphen keeps its compound whole)
_UNIT_SPLIT = re.compile(r"[\s/]+")
#: Words that qualify a colour without naming one.
SHADE_WORDS = frozenset({"dark", "light", "medium", "bright", "dusty", "pale", "deep", "other",
                         "undefined", "mixed"})
#: Slots whose values are matched by meaning (semantic facet matching), in this order.
SEMANTIC_SLOTS: tuple[str, ...] = ("colour", "type", "genre", "pattern", "material", "category")


class ColourSpace:
    """Colour words grounded in CIELAB through a generic table of colour names
    (polyrec.retrieve.colour_names, the xkcd survey): a query's colour word ("maroon")
    is matched to the catalogue colour values nearest in colour ("Dark Red"). A value
    not in the table is the mean of its known words ("Greenish Khaki": green, khaki;
    "Other Pink": pink); values with no colour word ("Dark", "Medium Dusty") are left out.
    A value's probability for a word is a softmax of ``-distance / temperature +
    prior * log(items with the value)``: among close colours the common one is the
    likelier reading ("navy blue" is Dark Blue (131 items) rather than Dark Purple (2)).
    """

    def __init__(self, values: Sequence[tuple[str, int]], temperature: float = 6.0,
                 prior: float = 0.5) -> None:
        self.temperature, self.prior = temperature, prior
        self.values: list[str] = []
        labs, counts = [], []
        for v, n in values:
            lab = self.lab_of(v)
            if lab is not None:
                self.values.append(v)
                labs.append(lab)
                counts.append(max(1, n))
        self.labs = torch.tensor(labs, dtype=torch.float32) if labs else torch.empty(0, 3)
        self.log_prior = prior * torch.tensor(counts, dtype=torch.float32).log()

    @staticmethod
    def rgb_of(name: str) -> tuple[float, float, float] | None:
        from polyrec.retrieve.colour_names import COLOUR_NAMES
        low = " ".join(tokens(name)).replace("gray", "grey")
        if set(low.split()) <= SHADE_WORDS:  # "Dark", "Medium Dusty": a shade, no colour
            return None
        if low in COLOUR_NAMES:
            return tuple(float(c) for c in COLOUR_NAMES[low])  # type: ignore[return-value]
        parts = []
        for w in low.split():
            w = w[:-3] if w.endswith("ish") and w[:-3] in COLOUR_NAMES else w
            if w in COLOUR_NAMES and w not in SHADE_WORDS:
                parts.append(COLOUR_NAMES[w])
        if not parts:
            return None
        return tuple(sum(p[k] for p in parts) / len(parts) for k in range(3))  # type: ignore[return-value]

    @classmethod
    def lab_of(cls, name: str) -> tuple[float, float, float] | None:
        rgb = cls.rgb_of(name)
        return None if rgb is None else _lab(rgb)

    @staticmethod
    def is_colour(text: str) -> bool:
        """Whether ``text`` is a colour name of the table."""
        from polyrec.retrieve.colour_names import COLOUR_NAMES
        return " ".join(tokens(text)).replace("gray", "grey") in COLOUR_NAMES

    def distribution(self, text: str, counts: Mapping[str, int] | None = None
                     ) -> list[tuple[str, float]]:
        """[(value, probability)] best first (CIE76 colour difference, see the class);
        [] when ``text`` is no colour name. ``counts``: the items carrying each value
        among those the rest of the query selects, in place of the catalogue's counts
        (values none of them carries are left out; all counts zero: the catalogue's)."""
        if not self.values or not self.is_colour(text):
            return []
        lab = self.lab_of(text)
        if lab is None:
            return []
        diff = (self.labs - torch.tensor(lab)).norm(dim=1)
        prior = self.log_prior
        if counts is not None:
            n = torch.tensor([float(counts.get(v, 0)) for v in self.values])
            if bool((n > 0).any()):
                prior = torch.where(n > 0, self.prior * n.clamp(min=1).log(),
                                    torch.tensor(float("-inf")))
        probs = torch.softmax(-diff / self.temperature + prior, dim=0)
        top = torch.topk(probs, min(5, len(self.values)))
        return [(self.values[int(j)], float(p)) for p, j in zip(top.values, top.indices)
                if float(p) > 0.0]


def _lab(rgb: Sequence[float]) -> tuple[float, float, float]:
    """sRGB (0..255) to CIELAB (D65)."""
    def lin(c: float) -> float:
        c /= 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (lin(c) for c in rgb)
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116
    fx, fy, fz = f(x), f(y), f(z)
    return (116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz))


class SemanticMatcher:
    """Match query spans to facet values by the text encoder's similarity.

    Each value of a semantic slot is represented twice in the encoder's space: the
    embedding of its name ("Sneakers") and the centroid of its items' stored vectors
    (what the catalogue says about the items carrying it: descriptions often use the
    shopper's word, "trainers", "tee", "tank"). A span's score for a value is the mean of
    the two cosine similarities, each z-scored across the slot's values (a span is
    compared with the other values of the same slot, not with an absolute cosine); the
    value's probability is a softmax of the scores over ``temperature``. Colour names
    go through :class:`ColourSpace` instead (the encoder does not know many of them).
    Built once per catalogue snapshot, item vectors and encoder fingerprint (the caller
    keys its cache by them).
    """

    def __init__(self, vocab: Vocabulary,
                 embed: Callable[[Sequence[str]], Sequence[torch.Tensor | None]],
                 item_ids: Sequence[int], vectors: torch.Tensor, *,
                 slots: Sequence[str] = SEMANTIC_SLOTS, temperature: float = 0.5) -> None:
        self.temperature = temperature
        row = {it: k for k, it in enumerate(item_ids)}
        dim = vectors.shape[1]
        self.slots: dict[str, tuple[list[Facet], torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        per_slot = {slot: [f for key, f in sorted(vocab.facets.items()) if key[0] == slot and f.items]
                    for slot in slots}
        per_slot = {slot: fs for slot, fs in per_slot.items() if len(fs) >= 2}
        names_all = sorted({f.value for fs in per_slot.values() for f in fs})
        embedded = dict(zip(names_all, embed(names_all))) if names_all else {}
        for slot, facets in per_slot.items():
            names = torch.stack([
                torch.zeros(dim) if embedded.get(f.value) is None
                else torch.nn.functional.normalize(embedded[f.value].float().flatten(), dim=0)
                for f in facets])
            member_rows = [[row[i] for i in f.items if i in row] for f in facets]
            has = torch.tensor([bool(r) for r in member_rows])
            # centroids: every (value, item row) pair summed in one index_add
            fidx = torch.tensor([k for k, rows in enumerate(member_rows) for _ in rows],
                                dtype=torch.long)
            ridx = torch.tensor([r for rows in member_rows for r in rows], dtype=torch.long)
            cents = torch.nn.functional.normalize(
                torch.zeros(len(facets), dim).index_add_(0, fidx, vectors[ridx].float()), dim=1)
            self.slots[slot] = (facets, names, cents, has)
        #: per slot: sub-phrase (stemmed words) -> the values whose name contains it; a
        #: hyphenated compound is one unit, never split ("film" is not `Film-Noir`, "fi"
        #: not `Sci-Fi`: a piece of a compound alone means something else)
        self.parts: dict[str, dict[tuple[str, ...], list[Facet]]] = {}
        for slot, (facets, *_rest) in self.slots.items():
            parts: dict[tuple[str, ...], list[Facet]] = defaultdict(list)
            for f in facets:
                units = [u for u in (tuple(terms(x)) for x in _UNIT_SPLIT.split(f.value)) if u]
                whole = tuple(w for u in units for w in u)
                for i in range(len(units)):
                    for j in range(i + 1, len(units) + (i > 0)):
                        sub = tuple(w for u in units[i:j] for w in u)
                        if sub and sub != whole and not set(sub) <= STOPWORDS:
                            parts[sub].append(f)
            self.parts[slot] = dict(parts)
        #: per slot: a value's whole name (stemmed words) -> the values
        self.whole: dict[str, dict[tuple[str, ...], list[Facet]]] = {
            slot: _by_name(facets) for slot, (facets, *_rest) in self.slots.items()}
        #: a word of a value name, or a base form of one -> those words ("glittering"
        #: under "glitter"); query words are compared by their base forms (word_forms)
        self.forms: dict[str, set[str]] = defaultdict(set)
        for slot, (facets, *_rest) in self.slots.items():
            for f in facets:
                for w in terms(f.value):
                    if w not in STOPWORDS:
                        for b in [w, *base_forms(w)]:
                            self.forms[b].add(w)
        self.colours = (ColourSpace([(f.value, len(f.items)) for f in self.slots["colour"][0]])
                        if "colour" in self.slots else None)
        #: items carrying any value of a semantic slot (the share a reading covers)
        self.n_items = len(set().union(*(f.items for fs, *_ in self.slots.values() for f in fs)))

    def scores(self, slot: str, span_vector: torch.Tensor) -> torch.Tensor:
        """The span's score for each value of ``slot``: the mean of the z-scored
        similarities to the value names and to the values' item centroids."""
        _, names, cents, has = self.slots[slot]
        q = torch.nn.functional.normalize(span_vector.float().flatten(), dim=0)
        zn = _z(names @ q)
        if bool(has.any()):
            zc = torch.where(has, _z(cents @ q, has), zn)
            return (zn + zc) / 2
        return zn

    def match(self, span_vector: torch.Tensor) -> list[tuple[str, float, list[tuple[Facet, float]]]]:
        """Per slot: (slot, the best value's score, [(facet, probability)] best first)."""
        out = []
        for slot, (facets, *_rest) in self.slots.items():
            sc = self.scores(slot, span_vector)
            probs = torch.softmax(sc / self.temperature, dim=0)
            top = torch.topk(probs, min(5, len(facets)))
            out.append((slot, float(sc.max()),
                        [(facets[int(j)], float(p)) for p, j in zip(top.values, top.indices)]))
        return out

    def word_form(self, word: str) -> list[tuple[str, list[Facet]]]:
        """Per slot, the values a query word names through a derived form of a value
        word: "striped" -> Stripe, "dotted" -> Dot, "printed" -> Front print, Placement
        print. [] when the word names none (or names one as it is: exact or partial)."""
        out: dict[str, list[Facet]] = {}
        for b in base_forms(word):
            for w in sorted(self.forms.get(b, ())):
                if w == word:
                    continue
                for slot in self.slots:
                    for f in self.whole[slot].get((w,), []) + self.parts[slot].get((w,), []):
                        if f not in out.setdefault(slot, []):
                            out[slot].append(f)
        return [(slot, fs) for slot, fs in out.items() if fs]

    def broader(self, slot: str, values: Sequence[tuple[Facet, float]],
                min_share: float = 0.8, among: Sequence[str] | None = None
                ) -> tuple[Facet, float] | None:
        """The value of another field of ``slot`` (or of the slots ``among``) that at
        least ``min_share`` of the items of ``values`` carry and that has items beyond
        them: the coarser label the catalogue files them under (sections named "Kids
        ..." are all in the index group Baby/Children), with that share; the most
        shared, then the smallest. None when no value of another field covers them."""
        matched = {f.value for f, _ in values}
        fields = _fields(values)
        items: set[int] = set().union(*(f.items for f, _ in values))
        if not items:
            return None
        best: tuple[tuple[float, int], Facet, float] | None = None
        for g in (g for sl in (among or (slot,)) if sl in self.slots for g in self.slots[sl][0]):
            if g.value in matched or g.fields & fields:
                continue
            inside = len(items & g.items)
            share = inside / len(items)
            if share < min_share or len(g.items) <= inside:
                continue
            key = (share, -len(g.items))
            if best is None or key > best[0]:
                best = (key, g, share)
        return (best[1], best[2]) if best is not None else None

    def read_words(self, text: str, *, lexicon: "CatalogueLexicon | None" = None,
                   colour_min: float = 0.0, compounds: bool = True
                   ) -> list[tuple[str, list[tuple[Facet, float]]]]:
        """What a word (or words) means in the catalogue by its spelling alone, the
        first of: a value's whole name, words inside value names, a colour name, a
        catalogue association; per slot [(facet, probability)]. Used on the related
        words a thesaurus gives ("sweater" for "pullover"); derived forms are not tried
        (a "covering" is no `Nipple covers`). ``compounds``: the words of a hyphenated
        compound that reads nothing together read as the only one of them that reads
        alone ("solid-coloured": `Solid`)."""
        key = tuple(w for w in terms(text))
        if not key or set(key) <= STOPWORDS:
            return []
        found = [(slot, [(f, 1.0) for f in whole[key]])
                 for slot, whole in self.whole.items() if key in whole]
        if not found:
            found = [(slot, [(f, 1.0) for f in parts[key]])
                     for slot, parts in self.parts.items() if key in parts]
        if not found and (dist := self.colour(text)) and dist[0][1] >= colour_min:
            found = [("colour", dist)]
        if not found and lexicon is not None:
            found = [(a.slot, list(a.values)) for a in lexicon.lookup(key) if a.slot in self.slots]
        if not found and len(key) > 1 and compounds and "-" in text and " " not in text.strip():
            # a hyphenated compound that reads nothing as a whole reads as the one of its
            # words that reads alone ("solid-coloured": Solid), when only one does (not
            # a phrase: "solid ground" is ground)
            parts = [r for w in key if w not in STOPWORDS
                     and (r := self.read_words(w, lexicon=lexicon, colour_min=colour_min,
                                               compounds=False))]
            if len(parts) == 1:
                found = parts[0]
        return found

    def thesaurus(self, word: str, wordnet: "WordNet", *,
                  lexicon: "CatalogueLexicon | None" = None, colour_min: float = 0.0,
                  max_senses: int = 3, max_share: float = 0.25, broader: bool = True,
                  singletons: bool = True,
                  accept: Callable[[str, Sequence[tuple[Facet, float]]], bool] | None = None
                  ) -> list[tuple[str, float, list[tuple[Facet, float]], tuple[str, ...]]]:
        """A word read through a general thesaurus (polyrec.retrieve.thesaurus): for each
        of its first ``max_senses`` senses per part of speech, the sense's synonyms are
        read against the catalogue (:meth:`read_words`), or, when none reads, the words
        of the senses it is a kind of or similar to ("pullover" is a kind of "sweater,
        jumper": `Sweater`). Sense ``r`` (its evidence rank, 0 = most frequent) weighs ``1 / (1 + r)``;
        senses the catalogue cannot read at all (the navy of ships) are left out of the
        total. A related word whose reading covers more than ``max_share`` of the
        catalogue's items in all its readings together (a "garment") says nothing and
        is skipped, and so is a reading ``accept(slot, values)`` refuses (the veto, see
        :meth:`_thesaurus`): a sense left without readings is left out of the total as
        well. Senses WordNet has no usage counts for weigh alike (``Sense.evidence_rank``:
        the order of "knickers"' senses, trousers before underwear, is no frequency).
        ``broader=False``: synonyms only, and the broader words of senses that have no
        other word (``singletons``: "burgundy", the colour, is a kind of *dark red*).
        Per slot: (slot, confidence = the
        share of the sense weight that reads the slot, [(facet, weight relative to the
        best value's)] best first, the related words read); a related word naming
        several values ("kid": every `Kids ...` section) gives each its full weight."""
        weights: dict[str, dict[tuple[str, str], float]] = defaultdict(lambda: defaultdict(float))
        facets: dict[tuple[str, str], Facet] = {}
        via: dict[str, list[str]] = defaultdict(list)
        share: dict[str, float] = defaultdict(float)  # slot -> weight of the senses reading it
        total = 0.0
        for sense in wordnet.senses(word, max_senses):
            readings: list[tuple[str, str, list[tuple[Facet, float]]]] = []
            groups = [[w for w in sense.synonyms if w != word.lower()]]
            if broader or (singletons and not groups[0]):
                # a sense with no other word (burgundy, the colour: a kind of "dark red")
                # says what it is only through what it is a kind of
                groups.append(list(sense.broader))
            for group in groups:
                for related in group:
                    found = self.read_words(related, lexicon=lexicon, colour_min=colour_min)
                    if self._specific(related, found, max_share):
                        readings += [(related, slot, dist) for slot, dist in found
                                     if accept is None or accept(slot, dist)]
                if readings:
                    break
            if not readings:
                continue
            weight = 1.0 / (1 + sense.evidence_rank)
            total += weight
            per_slot: dict[str, dict[tuple[str, str], float]] = defaultdict(lambda: defaultdict(float))
            for related, slot, dist in readings:
                for f, p in dist:
                    per_slot[slot][(slot, f.value)] += p
                    facets[(slot, f.value)] = f
                if related not in via[slot]:
                    via[slot].append(related)
            for slot, vals in per_slot.items():
                top = max(vals.values())
                share[slot] += weight
                for key, p in vals.items():
                    weights[slot][key] += weight * p / top
        out = []
        for slot, vals in weights.items():
            ranked = sorted(vals.items(), key=lambda kv: (-kv[1], kv[0][1]))[:8]
            top = ranked[0][1]
            out.append((slot, share[slot] / total, [(facets[k], p / top) for k, p in ranked],
                        tuple(via[slot])))
        return sorted(out, key=lambda t: (-t[1], _slot_rank(t[0])))

    def _thesaurus(self, text: str, idx: tuple[int, ...], vec: torch.Tensor | None,
                   wordnet: "WordNet",
                   vias: dict[tuple[tuple[int, ...], str], tuple[tuple[str, ...], float]], *,
                   lexicon: "CatalogueLexicon | None", colour_min: float, minimum: float,
                   agree: float, margin: float, score: float, broader: bool,
                   singletons: bool = True, min_ratio: float = 0.2
                   ) -> list[tuple[str, float, list[tuple[Facet, float]], str]]:
        """The thesaurus readings of a span from ``minimum`` confidence that the span's
        own evidence does not veto, as candidates scored ``score`` + confidence (the
        related words read go to ``vias``). The dictionary proposes; the veto (see
        :meth:`_agrees`) refuses a sense no shopper means ("plain" as a knitting stitch:
        `Knitwear`, where its sense *unpatterned* reads `Solid`): among the readings the
        word's senses give, the encoder (:meth:`scores`) may reject one it scores more
        than ``margin`` below the one it prefers, or under ``agree``; it never rejects
        the only reading a word has by comparison (the small encoder does not know rare
        words: it scores "frock" -0.11 for `Dress`). Colours of a span the colour table
        knows are judged by the table instead (the encoder does not know colour words:
        "navy" scores `Dark Blue` 1.06): one of the best values must be among the
        table's readings of the span (within ``min_ratio`` of its best)."""
        scores: dict[str, dict[str, float]] = {}

        def encoder(slot: str, value: str) -> float:
            if slot not in scores:
                sc = self.scores(slot, vec).tolist()  # type: ignore[arg-type]
                scores[slot] = {f.value: x for f, x in zip(self.slots[slot][0], sc)}
            return scores[slot][value]
        colours = {f.value: p for f, p in self.colour(text)}
        best = float("-inf")  # the encoder's preferred reading among all the word's readings
        if vec is not None:
            for slot, dist in self.related_readings(text, wordnet, lexicon=lexicon,
                                                    colour_min=colour_min):
                if not (slot == "colour" and colours):
                    best = max(best, max(encoder(slot, f.value) for f in _tied(dist)))

        def agrees(slot: str, values: Sequence[tuple[Facet, float]]) -> bool:
            return self._agrees(slot, values, colours, encoder if vec is not None else None,
                                max(agree, best - margin), min_ratio)
        out = []
        for slot, conf, dist, related in self.thesaurus(
                text, wordnet, lexicon=lexicon, colour_min=colour_min, broader=broader,
                singletons=singletons, accept=agrees if vec is not None or colours else None):
            if conf < minimum or not agrees(slot, dist):
                continue
            # equal confidence: the value the encoder prefers ("swimming costume" is a
            # swimsuit and swimwear: Swimwear), without one the earlier slot
            tie = -1e-3 * _slot_rank(slot)
            if vec is not None:
                tie = 1e-3 * max(encoder(slot, f.value) for f in _tied(dist))
            out.append((slot, score + conf + tie, dist, "thesaurus"))
            vias[(idx, slot)] = (related, conf)
        return out

    def _specific(self, related: str, found: Sequence[tuple[str, list[tuple[Facet, float]]]],
                  max_share: float) -> bool:
        """Whether a related word's readings say something: they cover at most
        ``max_share`` of the items, or the word names one catalogue label by its whole
        name however many items carry it ("solid": Solid, 46% of H&M); a word inside
        value names or spread over values is too general ("garment")."""
        covered = set().union(*(f.items for _, dist in found for f, _ in dist))
        return (len(covered) <= max_share * max(1, self.n_items)
                or all(len(dist) == 1 and set(terms(dist[0][0].value)) <= set(terms(related))
                       for _, dist in found))

    def related_readings(self, word: str, wordnet: "WordNet", *,
                         lexicon: "CatalogueLexicon | None" = None, colour_min: float = 0.0,
                         max_senses: int = 3, max_share: float = 0.25
                         ) -> list[tuple[str, list[tuple[Facet, float]]]]:
        """Every reading (slot, [(facet, probability)]) of every related word (synonyms
        and broader words) of the word's first ``max_senses`` senses per part of speech:
        the competitors the encoder chooses among (see :meth:`_thesaurus`)."""
        out = []
        for sense in wordnet.senses(word, max_senses):
            for related in [*sense.synonyms, *sense.broader]:
                if related != word.lower():
                    found = self.read_words(related, lexicon=lexicon, colour_min=colour_min)
                    if self._specific(related, found, max_share):
                        out += found
        return out

    @staticmethod
    def _agrees(slot: str, values: Sequence[tuple[Facet, float]], colours: Mapping[str, float],
                encoder: Callable[[str, str], float] | None, floor: float,
                min_ratio: float) -> bool:
        """Whether the span's own evidence lets a thesaurus reading stand: for a colour
        reading of a colour name, one of the reading's best values is among the colour
        table's readings of the name; otherwise the encoder scores one of the best
        values (several when a related word names several: "kid" is every `Kids ...`
        section) at least ``floor``; True without evidence."""
        tied = _tied(values)
        if slot == "colour" and colours:
            top = max(colours.values())
            return any(colours.get(f.value, 0.0) >= min_ratio * top for f in tied)
        if encoder is None:
            return True
        return max(encoder(slot, f.value) for f in tied) >= floor

    def colour(self, text: str, within: set[int] | None = None) -> list[tuple[Facet, float]]:
        """The colour values a colour name means, with probabilities ([] for no name);
        ``within``: the items the rest of the query selects, whose colours are the
        likelier readings ("cream blouse": the cream-like colours blouses come in)."""
        if self.colours is None:
            return []
        facets = self.slots["colour"][0]
        counts = (None if within is None
                  else {f.value: len(f.items & within) for f in facets})
        by_value = {f.value: f for f in facets}
        return [(by_value[v], p) for v, p in self.colours.distribution(text, counts)]

    def apply(self, und: Understanding,
              embed: Callable[[Sequence[str]], Sequence[torch.Tensor | None]], *,
              threshold: float, min_ratio: float = 0.2, max_len: int = 3,
              max_words: int = 8, colour_min: float = 0.0,
              lexicon: "CatalogueLexicon | None" = None,
              consistent: bool = True, broader: float = 0.5,
              thesaurus: "WordNet | None" = None, thesaurus_min: float = 0.5,
              thesaurus_agree: float = float("-inf"),
              thesaurus_margin: float = 1.0) -> Understanding:
        """Add semantic matches for the words exact matching left over (stopwords
        aside; the first ``max_words`` of them): spans of at most ``max_len`` words,
        longest first, then best score; a
        span is accepted when its best value scores at least ``threshold`` (a colour
        name always). A span may also take an adjacent exact match of the same slot when,
        as a whole, it means another value ("tank top": Vest top, not Top; "navy blue":
        Dark Blue, not Blue). Values within ``min_ratio`` of the best one's probability
        are alternatives; an item's membership is the summed probability of the values
        it carries over the best one's, at most 1. ``lexicon``: the words the catalogue's
        own texts associate with values (polyrec.retrieve.catalogue_lexicon), read after
        partial words and colour names and before the encoder. ``consistent``: a
        reading (other than words inside value names) that no item shares with the
        rest of what the query names is dropped. ``broader``: the membership (times
        the share, see :meth:`broader`) of the items of the coarser value a word's
        values fall under, in their slot or the category slot ("men" names sections;
        they are Menswear), 0 for none.
        ``thesaurus``: a general English thesaurus (polyrec.retrieve.thesaurus), read
        after the catalogue's associations and before the encoder for words nothing
        else reads (:meth:`thesaurus`); its reading counts from ``thesaurus_min`` unless
        vetoed (:meth:`_thesaurus`: the colour table for colours, else the encoder when
        it scores the reading more than ``thesaurus_margin`` below the word's reading it
        prefers or under ``thesaurus_agree``)."""
        if not self.slots:
            return und
        words = [stem(t) for t in und.tokens]
        for raw, fixed in und.corrected.items():  # read corrected words as corrected
            if " " not in fixed and raw in und.tokens:
                words[und.tokens.index(raw)] = fixed
        covered = {i for a, b in und.spans for i in range(a, b)}
        content = [i for i in range(len(words))
                   if i not in covered and words[i] not in STOPWORDS and und.tokens[i] not in STOPWORDS]
        if not content:
            return und
        content = content[:max_words]  # long queries: the first words only (bounded work)
        # fields the words already constrain exactly, per slot: a reading of other words
        # may still constrain another field of the slot ("underwear" names the product
        # group, "for women" the section: both are categories)
        exact_fields: dict[str, set[str]] = defaultdict(set)
        for m in und.matches:
            exact_fields[m.slot] |= set(m.fields)
        spans: list[tuple[tuple[int, ...], int | None]] = []
        for n in range(min(max_len, len(content)), 0, -1):
            for k in range(len(content) - n + 1):
                spans.append((tuple(content[k:k + n]), None))
        for mi, (a, b) in enumerate(und.spans):  # a residual word next to an exact match
            for i in (a - 1, b):
                if i in content:
                    spans.append((tuple(sorted(set(range(a, b)) | {i})), mi))
        texts = [" ".join(und.tokens[i] if und.tokens[i] not in und.corrected else words[i]
                          for i in idx) for idx, _ in spans]
        vectors = embed(texts)
        cands: list[tuple[float, int, tuple[int, ...], str, list[tuple[Facet, float]],
                          int | None, str]] = []
        # thesaurus readings: (span, slot) -> (the related words read, confidence)
        vias: dict[tuple[tuple[int, ...], str], tuple[tuple[str, ...], float]] = {}
        # slots each word names on its own, inside a value name or by a derived form
        named: dict[int, set[str]] = {i: {slot for slot, parts in self.parts.items()
                                          if (words[i],) in parts}
                                      | {slot for slot, _ in self.word_form(words[i])}
                                      for i in content}
        for mi, (a, b) in enumerate(und.spans):
            for i in range(a, b):
                named.setdefault(i, set()).add(und.matches[mi].slot)
        for (idx, exact), text, vec in zip(spans, texts, vectors):
            # words inside value names first ("khaki": Greenish Khaki, Khaki green;
            # "womens": every "Womens ..." section), then colour names, then what the
            # catalogue's texts say the words mean, then the encoder
            key = tuple(words[i] for i in idx)
            found: list[tuple[str, float, list[tuple[Facet, float]], str]] = [
                (slot, _PARTIAL, [(f, 1.0) for f in parts[key]], "partial")
                for slot, parts in self.parts.items() if key in parts]
            if not found and len(key) == 1:
                found = [(slot, _FORM, [(f, 1.0) for f in fs], "word-form")
                         for slot, fs in self.word_form(key[0])]
            if not found and (dist := self.colour(text)) and dist[0][1] >= colour_min:
                # a colour name (read again among the colours of the rest of the query
                # when it is accepted, below)
                found = [("colour", _COLOUR, dist, "colour")]
            if not found and lexicon is not None:
                found = [(a.slot, _CATALOGUE + a.strength, list(a.values), "catalogue")
                         for a in lexicon.lookup(key) if a.slot in self.slots]
            # what the words are a kind of is never read in place of a word that names a
            # value itself ("polka dot" is a kind of pattern, but "dot" is `Dot`)
            kinds_allowed = exact is None and not any(named[i] for i in idx)
            if not found and thesaurus is not None:
                # synonyms: as good as the words themselves
                found = self._thesaurus(text, idx, vec, thesaurus, vias, lexicon=lexicon,
                                        colour_min=colour_min, minimum=thesaurus_min,
                                        agree=thesaurus_agree, margin=thesaurus_margin,
                                        score=_THESAURUS, broader=False,
                                        singletons=kinds_allowed, min_ratio=min_ratio)
            if vec is not None and not found:
                found += [(slot, score, dist, "semantic") for slot, score, dist in self.match(vec)]
            if (thesaurus is not None and all(score < threshold for _, score, _, _ in found)
                    and kinds_allowed):
                # what the words are a kind of: only where the encoder reads nothing, and
                # never in place of a word that names a value itself ("polka dot" is a
                # kind of pattern, but "dot" is `Dot`)
                found += self._thesaurus(text, idx, vec, thesaurus, vias, lexicon=lexicon,
                                         colour_min=colour_min, minimum=thesaurus_min,
                                         agree=thesaurus_agree, margin=thesaurus_margin,
                                         score=threshold, broader=True,
                                         min_ratio=min_ratio)
            for slot, score, dist, source in found:
                if len(idx) > 1 and source not in ("partial", "word-form") and any(
                        named[i] - {slot} for i in idx):
                    # a reading by meaning of several words may not swallow a word that
                    # names a value of another slot: "kids jeans" is not one reading
                    # (Denim) but the kids' sections and jeans
                    continue
                if len(idx) > 1 and source == "semantic" and exact is None and any(
                        dist[0][0] in self.parts[slot].get((words[i],), ()) for i in idx):
                    # nor may the encoder narrow a word inside value names of the same slot
                    # to one of them: "woolly hat" stays every hat (Hat/beanie, Hat/brim);
                    # another meaning of the words together stays ("bathing suit": Swimwear)
                    continue
                if exact is not None:
                    if slot != und.matches[exact].slot or dist[0][0].value == und.matches[exact].value:
                        continue
                elif _fields(dist) & exact_fields.get(slot, set()):
                    continue
                if score >= threshold:
                    cands.append((score, len(idx), idx, slot, dist, exact, source))
        # longest span, then partial > word form > colour > catalogue > encoder, then the
        # higher score
        cands.sort(key=lambda c: (-c[1], -c[0]))
        used: set[int] = set()
        replaced: set[int] = set()
        taken: dict[str, set[str]] = defaultdict(set)  # slot -> fields read so far
        new: list[tuple[Match, dict[int, float]]] = []
        # items of each exact match (several values of one slot share their OR-ed set)
        exact_items = [und.slot_items.get(m.slot, und.slot_items.get(f"{m.slot}={m.value}"))
                       for m in und.matches]
        accepted: list[tuple[str, set[int]]] = []  # (slot, strong items) of each reading
        text_of = dict(zip((idx for idx, _ in spans), texts))
        for score, _, idx, slot, dist, exact, source in cands:
            own = set(idx) - (set(range(*und.spans[exact])) if exact is not None else set())
            if own & used or _fields(dist) & taken[slot]:
                continue
            if source == "colour":
                # a colour name reads among the colours of the items the rest of the query
                # names as understood so far ("cream blouse": the cream-like colours
                # blouses come in); an exact match a longer reading replaced no longer
                # counts ("tank top in maroon": Vest tops, not every Top)
                rest = [s for mi, s in enumerate(exact_items) if s is not None
                        and mi not in replaced and und.matches[mi].slot != "colour"]
                rest += [s for other, s in accepted if other != "colour"]
                if rest:
                    dist = self.colour(text_of[idx], set.intersection(*rest)) or dist
            best_p = dist[0][1]
            kept = [(f, p) for f, p in dist if p >= min_ratio * best_p]
            member: dict[int, float] = {}
            for f, p in kept:
                for it in f.items:
                    member[it] = min(1.0, member.get(it, 0.0) + p / best_p)
            alts = tuple((f.value, round(p, 4)) for f, p in kept[1:6])
            if (source in ("partial", "thesaurus") and broader > 0
                    and (wider := self.broader(slot, kept, among=(slot, "category")))):
                # the coarser value these values share, in their slot or the category
                # slot ("kids" sections: Baby/Children; every Bikini top: the product
                # group Swimwear): its other items match in part
                value, share = wider
                for it in value.items:
                    member.setdefault(it, broader * share)
                alts = alts[:4] + ((value.value, round(broader * share, 4)),)
            strong = {it for it, w in member.items() if w >= 0.5}
            if consistent and source != "partial":
                # a reading no item shares with the rest of the query contradicts it
                # ("warm" read as a value only boots carry, in "warm coat"): left out
                others = [s for mi, s in enumerate(exact_items)
                          if s is not None and mi != exact and mi not in replaced]
                others += [s for _, s in accepted]
                if others and not strong.intersection(*others):
                    continue
            used |= own
            taken[slot] |= _fields(dist)
            accepted.append((slot, strong))
            if exact is not None:
                replaced.add(exact)
            top = kept[0][0]
            related, conf = vias[(idx, slot)] if source == "thesaurus" else ((), best_p)
            m = Match(" ".join(und.tokens[i] for i in idx), slot, top.value,
                      tuple(sorted(top.fields)), source, round(conf, 4), alts, related)
            new.append((m, member))
        if not new:
            return und
        for exact in sorted(replaced, reverse=True):  # the longer span's meaning wins
            m = und.matches[exact]
            key = m.slot if m.slot in und.slot_items else f"{m.slot}={m.value}"
            und.slot_items.pop(key, None)
            del und.matches[exact], und.spans[exact]
        for m, member in new:
            und.matches.append(m)
            und.soft[f"{m.slot}~{m.text}"] = member
        und.residual = " ".join(words[i] for i in range(len(words))
                                if i not in used and i not in covered)
        return und


def _tied(dist: Sequence[tuple[Facet, float]]) -> list[Facet]:
    """The values sharing a reading's best probability."""
    best = dist[0][1]
    return [f for f, p in dist if p >= best - 1e-9]


def _fields(dist: Sequence[tuple[Facet, float]]) -> set[str]:
    """The attribute fields (or relations) of a reading's values."""
    return {name for f, _ in dist for name in f.fields}


def _by_name(facets: Iterable[Facet]) -> dict[tuple[str, ...], list[Facet]]:
    out: dict[tuple[str, ...], list[Facet]] = defaultdict(list)
    for f in facets:
        out[tuple(terms(f.value))].append(f)
    return dict(out)


def _z(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x standardised by the mean and deviation of its (masked) entries."""
    ref = x if mask is None else x[mask]
    sd = float(ref.std()) if ref.numel() > 1 else 0.0
    return (x - ref.mean()) / (sd if sd > 1e-6 else 1.0)
