"""A shop's own synonyms: shoppers' words that no model or dictionary here links to the
catalogue's words, rewritten before search reads the query.

Query understanding reads a shopper's word by its spelling, the catalogue's own texts,
the colour table, WordNet and the text encoder (polyrec.retrieve.query_understanding);
some words none of them links to the catalogue's labels ("plaid" for the pattern
`Check`, "toddler" for the baby sizes). A shop knows its own vocabulary: it declares
such words in a synonyms file, in the explicit-mapping syntax of Solr and Elasticsearch,
one rule a line::

    # comment
    plaid, tartan => check
    clothes to sleep in => nightwear

Each phrase on the left (one or more words) is replaced by the words on the right in
the query every retriever reads (BM25, the dense encoder, query understanding), longest
phrase first, left to right, each word rewritten at most once. The rules are stored in
the database (setting ``search.synonyms``, see :func:`save`), so every process serving
the store uses them from its next search; ``polyrec synonyms import FILE`` loads a file.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from polyrec.errors import ConfigError
from polyrec.retrieve.lexical import tokens

#: the settings key the rules are stored under
SETTING = "search.synonyms"
#: the longest phrase a rule may rewrite, in words
MAX_WORDS = 6


@dataclass(frozen=True)
class Rule:
    """Phrases (tuples of lower-case words) rewritten to ``replacement``."""

    phrases: tuple[tuple[str, ...], ...]
    replacement: str

    def as_text(self) -> str:
        return ", ".join(" ".join(p) for p in self.phrases) + " => " + self.replacement


class Synonyms:
    """A set of rewrite rules; :meth:`rewrite` applies them to a query."""

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules = list(rules)
        self._by_phrase: dict[tuple[str, ...], str] = {}
        for rule in self.rules:
            for phrase in rule.phrases:
                if phrase in self._by_phrase and self._by_phrase[phrase] != rule.replacement:
                    raise ConfigError(f"synonyms: '{' '.join(phrase)}' is rewritten to both "
                                      f"'{self._by_phrase[phrase]}' and '{rule.replacement}'")
                self._by_phrase[phrase] = rule.replacement
        self._longest = max((len(p) for p in self._by_phrase), default=0)

    def __len__(self) -> int:
        return len(self.rules)

    @classmethod
    def parse(cls, text: str, source: str = "<text>") -> "Synonyms":
        """Rules from the file format above; a bad line raises one ConfigError naming
        ``source`` and the line."""
        rules: list[Rule] = []
        first: dict[tuple[str, ...], tuple[str, int]] = {}  # phrase -> (replacement, line)
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            left, arrow, right = line.partition("=>")
            where = f"{source}, line {number}"
            if not arrow:
                raise ConfigError(f"{where}: expected 'words[, more words] => replacement', "
                                  f"not '{raw.strip()}'")
            phrases = tuple(tuple(tokens(p)) for p in left.split(","))
            replacement = " ".join(tokens(right))
            if not replacement:
                raise ConfigError(f"{where}: nothing to rewrite to after '=>'")
            if not phrases or any(not p for p in phrases):
                raise ConfigError(f"{where}: an empty phrase before '=>'")
            if any(len(p) > MAX_WORDS for p in phrases):
                raise ConfigError(f"{where}: a phrase of more than {MAX_WORDS} words")
            for phrase in phrases:
                before = first.setdefault(phrase, (replacement, number))
                if before[0] != replacement:
                    raise ConfigError(f"{where}: '{' '.join(phrase)}' is rewritten to "
                                      f"'{before[0]}' on line {before[1]} already")
            rules.append(Rule(phrases, replacement))
        return cls(rules)

    @classmethod
    def read(cls, path: str | Path) -> "Synonyms":
        """Rules from a UTF-8 file (:meth:`parse`)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such synonyms file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        return cls.parse(text, str(path))

    def rewrite(self, query: str) -> tuple[str, dict[str, str]]:
        """(the query with every declared phrase replaced, {phrase: replacement}); the
        query itself and {} when no rule applies."""
        if not self._by_phrase:
            return query, {}
        words = tokens(query)
        out: list[str] = []
        applied: dict[str, str] = {}
        i = 0
        while i < len(words):
            for n in range(min(self._longest, len(words) - i), 0, -1):
                replacement = self._by_phrase.get(tuple(words[i:i + n]))
                if replacement is not None:
                    applied[" ".join(words[i:i + n])] = replacement
                    out.append(replacement)
                    i += n
                    break
            else:
                out.append(words[i])
                i += 1
        return (" ".join(out), applied) if applied else (query, {})

    def as_json(self) -> dict[str, Any]:
        return {"rules": [{"phrases": [" ".join(p) for p in r.phrases],
                           "replacement": r.replacement} for r in self.rules]}

    @classmethod
    def from_json(cls, value: Any) -> "Synonyms":
        rules = [Rule(tuple(tuple(tokens(p)) for p in r["phrases"]), r["replacement"])
                 for r in (value or {}).get("rules", [])]
        return cls(rules)


def load(session: Any) -> Synonyms:
    """The rules stored in the database (none: an empty set)."""
    from polyrec.store.settings import get_setting
    return Synonyms.from_json(get_setting(session, SETTING))


def save(session: Any, synonyms: Synonyms, source: str | None = None) -> None:
    """Store ``synonyms`` in place of the stored rules (in the caller's transaction)."""
    from polyrec.store.settings import put_setting
    put_setting(session, SETTING, {**synonyms.as_json(), "source": source, "at": time.time()})
