"""Shoppers' words mined from the catalogue's own free text.

Item titles and descriptions are written in the words shoppers use ("tee", "tank",
"jumper", "trainers", "striped"), while the attributes use the catalogue's own labels
(`T-shirt`, `Vest top`, `Sweater`, `Sneakers`, `Stripe`). :class:`CatalogueLexicon`
counts, over the catalogue, how often each description word (and each pair of adjacent
words) occurs in items carrying each facet value, and keeps the associations that are
both frequent and specific:

- **support**: at least ``min_items`` items use the word and carry the value;
- **confidence**: the lower end of the 95% Wilson interval of ``n(w, v) / n(w)`` at
  least ``min_confidence`` (a word on few items needs nearly all of them); the
  probability reported is the smoothed ``(n(w, v) + prior * P(v)) / (n(w) + prior)``;
- **lift**: that probability over the value's share of the catalogue, at least
  ``min_lift`` (a word used everywhere tells nothing about a common value).

The result is a table from stemmed words to, per slot, the values they indicate with their
probabilities: one more source of semantic matches (``source: catalogue``), built once per
catalogue snapshot (the searcher keys it by the catalogue's signature). No list of
words is written by hand: what a word means comes from the catalogue it is used on.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from polyrec.retrieve.lexical import terms

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.retrieve.query_understanding import Facet, Vocabulary


@dataclass(frozen=True)
class Association:
    """A word's reading in one slot: the values with their probabilities, best first."""

    slot: str
    #: [(facet, smoothed P(value | word))], best first
    values: tuple[tuple["Facet", float], ...]
    #: items that use the word (its document frequency in the mined sample)
    support: int
    #: lift of the best value: P(value | word) / P(value)
    lift: float

    @property
    def confidence(self) -> float:
        return self.values[0][1] if self.values else 0.0

    @property
    def strength(self) -> float:
        """Confidence times log-lift: among readings of similar confidence the more
        specific value wins ("trainers": Sneakers rather than the group Shoes)."""
        return self.confidence * math.log(self.lift)


class CatalogueLexicon:
    """Associations between the words of item texts and facet values (see the module)."""

    def __init__(self, vocab: "Vocabulary", docs: Iterable[tuple[int, str | None, str | None]],
                 slots: Sequence[str], *, min_items: int = 4, min_confidence: float = 0.5,
                 min_lift: float = 3.0, prior: float = 2.0, max_items: int = 100_000,
                 stopwords: Iterable[str] = ()) -> None:
        """``docs``: (item id, title, text) of the catalogue; at most ``max_items`` are
        read (the first ones: bounded work on very large catalogues)."""
        stop = frozenset(stopwords)
        facets = [f for (slot, _), f in sorted(vocab.facets.items()) if slot in slots and f.items]
        of_item: dict[int, list[int]] = defaultdict(list)
        for k, f in enumerate(facets):
            for it in f.items:
                of_item[it].append(k)
        df: Counter[tuple[str, ...]] = Counter()
        joint: Counter[tuple[tuple[str, ...], int]] = Counter()
        n_items = 0
        for item_id, title, text in docs:
            if n_items >= max_items:
                break
            n_items += 1
            words = _words(title) + ["\x00"] + _words(text)
            keys = {(w,) for w in words if w != "\x00" and w not in stop and not w.isdigit()}
            keys |= {(a, b) for a, b in zip(words, words[1:])
                     if "\x00" not in (a, b) and not {a, b} & stop}
            df.update(keys)
            for key in keys:
                for k in of_item.get(item_id, ()):
                    joint[(key, k)] += 1
        self.items = n_items
        self.min_items, self.min_confidence, self.min_lift = min_items, min_confidence, min_lift
        base = [max(1, len(f.items)) / max(1, n_items) for f in facets]
        found: dict[tuple[str, ...], dict[str, list[tuple["Facet", float, float]]]] = defaultdict(
            lambda: defaultdict(list))
        for (key, k), n in joint.items():
            if n < min_items:
                continue
            p = (n + prior * base[k]) / (df[key] + prior)
            lift = p / base[k]
            if wilson_lower(n, df[key]) >= min_confidence and lift >= min_lift:
                found[key][facets[k].slot].append((facets[k], p, lift))
        #: stemmed word(s) -> slot -> Association
        self.table: dict[tuple[str, ...], dict[str, Association]] = {}
        for key, per_slot in found.items():
            self.table[key] = {}
            for slot, vals in per_slot.items():
                vals.sort(key=lambda t: (-t[1] * math.log(t[2]), t[0].value))
                self.table[key][slot] = Association(slot, tuple((f, p) for f, p, _ in vals),
                                                    df[key], vals[0][2])

    def __len__(self) -> int:
        return len(self.table)

    def lookup(self, words: Sequence[str]) -> list[Association]:
        """The readings of a span (stemmed words), most confident first; [] when the
        catalogue does not associate it with any value."""
        found = self.table.get(tuple(words))
        if not found:
            return []
        return sorted(found.values(), key=lambda a: (-a.strength, a.slot))


def wilson_lower(hits: int, n: int, z: float = 1.96) -> float:
    """The lower end of the Wilson score interval (95% by default) of a proportion
    ``hits / n``: how high it surely is, given how few items it was counted on."""
    if n <= 0:
        return 0.0
    phat = hits / n
    centre = phat + z * z / (2 * n)
    spread = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def _words(text: str | None) -> list[str]:
    return terms(text[:2000] if text else None)
