"""Lexical retrieval: BM25 over item title, text and attribute values.

Three backends answer the same question, "which items match these words, best first":

- :class:`Fts5Index` (SQLite): an FTS5 virtual table ``polyrec_items_fts`` in the store
  itself, ranked by FTS5's ``bm25()`` with per-column weights. It is kept in sync lazily:
  before a search the items table's signature (row count and latest ``updated_at``) is
  compared with the one recorded at the last sync; changed rows are re-indexed, and a
  row-count mismatch (deleted items) rebuilds the table.
- :class:`PostgresFtsIndex` (PostgreSQL): the server's full-text search over a generated,
  GIN-indexed ``tsvector`` column of ``items``, ranked by IDF-weighted ``ts_rank``.
- :class:`MemoryBM25Index` (any SQLAlchemy database): the same BM25F-style scoring
  computed in Python over documents loaded from the items table, rebuilt when the
  signature changes and swapped in by one reference assignment.

Both tokenise with :func:`tokens` / :func:`stem` semantics close to FTS5's
``porter unicode61`` tokenizer, so the two rank alike.
"""
from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import AbstractSet, Any, Iterable, Protocol

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from polyrec.store.models import Item, Meta

#: Column weights of BM25: a word in the title counts 3x, in an attribute value 2x.
FIELD_WEIGHTS: dict[str, float] = {"title": 3.0, "text": 1.0, "attributes": 2.0}

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_POSSESSIVE = re.compile(r"['\u2019]s\b", re.IGNORECASE)


def stem(word: str) -> str:
    """A light English suffix stemmer (plurals, -ing, -ed) applied to a lower-cased token."""
    w = word.lower()
    if len(w) <= 3 or w.isdigit():
        return w
    for suffix, repl in (("sses", "ss"), ("ies", "y"), ("xes", "x"), ("ches", "ch"),
                         ("shes", "sh")):
        if w.endswith(suffix):
            return w[: -len(suffix)] + repl
    if w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def tokens(text_: str | None) -> list[str]:
    """Lower-cased word tokens (letters and digits; punctuation splits words)."""
    if not text_:
        return []
    return [t.lower() for t in _WORD.findall(_POSSESSIVE.sub("", text_))]


def terms(text_: str | None) -> list[str]:
    """Stemmed tokens: what the in-memory index and the query understanding compare."""
    return [stem(t) for t in tokens(text_)]


def flatten_attributes(attributes: dict[str, Any] | None) -> str:
    """Attribute values as one searchable string (keys are not indexed, numbers are)."""
    parts: list[str] = []

    def walk(value: Any) -> None:
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        else:
            parts.append(str(value))

    walk(attributes or {})
    return " ".join(parts)


def _attributes(raw: Any) -> dict[str, Any]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    return raw if isinstance(raw, dict) else {}


@dataclass(frozen=True)
class Signature:
    """What identifies a state of the items table: row count and newest ``updated_at``."""

    count: int
    updated: float

    @classmethod
    def of(cls, session: Session) -> "Signature":
        count, updated = session.execute(select(func.count(Item.id), func.max(Item.updated_at))).one()
        return cls(int(count or 0), float(updated or 0.0))


class LexicalIndex(Protocol):
    """The interface both backends implement."""

    backend: str

    def sync(self, session: Session, signature: Signature | None = None) -> bool:
        """Bring the index up to date with the items table; True when it changed."""

    def search(self, session: Session, query: str, limit: int,
               allowed: set[int] | None = None,
               signature: Signature | None = None, *, sync: bool = True,
               exclude: AbstractSet[int] = frozenset()) -> list[tuple[int, float]]:
        """(item id, score) best first; higher is better. ``allowed`` restricts the ids;
        ``exclude`` leaves ids out (the retired items), still ``limit`` results when
        there are that many others; ``signature`` is the items table's current one when
        the caller already has it. ``sync=False`` searches the index as it is, never
        writing: for a read-only snapshot session (the caller synced in a write
        transaction of its own just before)."""


class Fts5Index:
    """BM25 through an SQLite FTS5 table in the store, synced lazily with ``items``."""

    backend = "sqlite-fts5"
    TABLE = "polyrec_items_fts"
    STATE_KEY = "lexical.fts5.state"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._synced: Signature | None = None

    # -- sync ----------------------------------------------------------------------------
    def _create(self, session: Session) -> None:
        session.execute(text(
            f"CREATE VIRTUAL TABLE IF NOT EXISTS {self.TABLE} USING fts5("
            "title, text, attributes, tokenize='porter unicode61 remove_diacritics 2')"))

    def _state(self, session: Session) -> tuple[Signature | None, float]:
        raw = session.execute(select(Meta.value).where(Meta.key == self.STATE_KEY)).scalar()
        if raw is None:
            return None, -1.0
        data = json.loads(raw)
        return Signature(int(data["count"]), float(data["updated"])), float(data["updated"])

    def _write_state(self, session: Session, sig: Signature) -> None:
        value = json.dumps({"count": sig.count, "updated": sig.updated})
        table = Meta.__table__
        done = session.execute(table.update().where(table.c.key == self.STATE_KEY).values(value=value))
        if not done.rowcount:
            session.execute(table.insert().values(key=self.STATE_KEY, value=value))

    def _index_rows(self, session: Session, since: float | None) -> None:
        query = select(Item.id, Item.title, Item.text, Item.attributes)
        if since is not None:
            query = query.where(Item.updated_at >= since)
        rows = session.execute(query).all()
        if since is None:
            session.execute(text(f"DELETE FROM {self.TABLE}"))
        else:
            for start in range(0, len(rows), 500):
                ids = [r[0] for r in rows[start:start + 500]]
                session.execute(text(f"DELETE FROM {self.TABLE} WHERE rowid IN "
                                     f"({','.join(str(int(i)) for i in ids)})"))
        payload = [{"id": r[0], "title": r[1] or "", "text": r[2] or "",
                    "attributes": flatten_attributes(_attributes(r[3]))} for r in rows]
        if payload:
            session.execute(text(f"INSERT INTO {self.TABLE}(rowid, title, text, attributes) "
                                 "VALUES (:id, :title, :text, :attributes)"), payload)

    def sync(self, session: Session, signature: Signature | None = None) -> bool:
        """Bring the FTS table up to date with ``items``; True when anything changed."""
        sig = signature or Signature.of(session)
        if sig == self._synced:
            return False
        with self._lock:
            self._create(session)
            stored, since = self._state(session)
            if stored == sig:
                self._synced = sig
                return False
            if stored is not None:  # incremental: rows touched since the last sync
                self._index_rows(session, since)
                n = session.execute(text(f"SELECT count(*) FROM {self.TABLE}")).scalar_one()
                if n != sig.count:  # items were deleted: start over
                    self._index_rows(session, None)
            else:
                self._index_rows(session, None)
            self._write_state(session, sig)
            self._synced = sig
            return True

    # -- search --------------------------------------------------------------------------
    @staticmethod
    def match_expression(query: str) -> str:
        """An FTS5 MATCH expression: every query word as a quoted term, OR-ed (BM25 ranks)."""
        words = dict.fromkeys(tokens(query))
        return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)

    def search(self, session: Session, query: str, limit: int,
               allowed: set[int] | None = None,
               signature: Signature | None = None, *, sync: bool = True,
               exclude: AbstractSet[int] = frozenset()) -> list[tuple[int, float]]:
        if sync:
            self.sync(session, signature)
        expr = self.match_expression(query)
        if not expr or limit <= 0:
            return []
        w = FIELD_WEIGHTS
        rank = f"bm25({self.TABLE}, {w['title']}, {w['text']}, {w['attributes']})"
        sql = f"SELECT rowid, -{rank} FROM {self.TABLE} WHERE {self.TABLE} MATCH :q ORDER BY {rank}"
        if allowed is None:  # enough rows to drop the excluded ones that are among them
            rows = session.execute(text(sql + " LIMIT :n"),
                                   {"q": expr, "n": int(limit) + len(exclude)}).all()
            return [(int(i), float(s)) for i, s in rows if i not in exclude][:limit]
        out: list[tuple[int, float]] = []
        for i, s in session.execute(text(sql), {"q": expr}):
            if i in allowed and i not in exclude:
                out.append((int(i), float(s)))
                if len(out) >= limit:
                    break
        return out


class _Postings:
    """An immutable in-memory BM25F index: built once, then only read (thread-safe)."""

    def __init__(self, docs: Iterable[tuple[int, dict[str, str]]], k1: float, b: float) -> None:
        self.k1, self.b = k1, b
        self.postings: dict[str, list[tuple[int, float]]] = {}
        lengths: dict[int, float] = {}
        for item_id, fields in docs:
            tf: Counter[str] = Counter()
            for name, weight in FIELD_WEIGHTS.items():
                for term in terms(fields.get(name)):
                    tf[term] += weight
            lengths[item_id] = sum(tf.values())
            for term, freq in tf.items():
                self.postings.setdefault(term, []).append((item_id, freq))
        self.lengths = lengths
        self.n = len(lengths)
        self.avg = (sum(lengths.values()) / self.n) if self.n else 1.0

    def search(self, query: str, limit: int, allowed: set[int] | None,
               exclude: AbstractSet[int] = frozenset()) -> list[tuple[int, float]]:
        scores: dict[int, float] = {}
        for term in dict.fromkeys(terms(query)):
            plist = self.postings.get(term)
            if not plist:
                continue
            idf = math.log(1.0 + (self.n - len(plist) + 0.5) / (len(plist) + 0.5))
            for item_id, tf in plist:
                if allowed is not None and item_id not in allowed or item_id in exclude:
                    continue
                norm = self.k1 * (1.0 - self.b + self.b * self.lengths[item_id] / self.avg)
                scores[item_id] = scores.get(item_id, 0.0) + idf * tf * (self.k1 + 1.0) / (tf + norm)
        best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
        return best[:limit]


class MemoryBM25Index:
    """Portable BM25 for any database: documents loaded through SQLAlchemy, kept in memory."""

    backend = "memory-bm25"

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._lock = threading.Lock()
        self._built: tuple[Signature, _Postings] | None = None

    def _postings(self, session: Session, signature: Signature | None = None) -> _Postings:
        sig = signature or Signature.of(session)
        built = self._built
        if built is not None and built[0] == sig:
            return built[1]
        with self._lock:
            built = self._built
            if built is not None and built[0] == sig:
                return built[1]
            rows = session.execute(select(Item.id, Item.title, Item.text, Item.attributes)).all()
            docs = ((r[0], {"title": r[1] or "", "text": r[2] or "",
                            "attributes": flatten_attributes(_attributes(r[3]))}) for r in rows)
            postings = _Postings(docs, self.k1, self.b)
            self._built = (sig, postings)  # one reference assignment: readers see old or new
            return postings

    def sync(self, session: Session, signature: Signature | None = None) -> bool:
        before = self._built
        self._postings(session, signature)
        return self._built is not before

    def search(self, session: Session, query: str, limit: int,
               allowed: set[int] | None = None,
               signature: Signature | None = None, *, sync: bool = True,
               exclude: AbstractSet[int] = frozenset()) -> list[tuple[int, float]]:
        if limit <= 0:  # in memory: building the postings writes nothing, so always in step
            return []
        return self._postings(session, signature).search(query, limit, allowed, exclude)


class PostgresFtsIndex:
    """BM25 with PostgreSQL's own full-text search. The generated ``tsvector`` column of
    ``items`` (GIN-indexed, kept in step by the server itself; polyrec.store.postgres)
    finds the items matching any query word through the index; they are then scored by
    BM25F in SQL from the column's positions and weights: a word's frequency counts each
    occurrence with its field's weight (title 3, attributes 2, text 1, as
    :data:`FIELD_WEIGHTS`), the document length likewise, with BM25's IDF from the
    words' document frequencies (counted through the index). The words are stemmed by the
    server's ``english`` configuration (Snowball) instead of :func:`stem`, so the two
    rank alike but not identically (tests/test_lexical.py compares them)."""

    backend = "postgres-fts"
    #: Items sampled (pages, repeatably) to estimate the mean document length.
    LENGTH_SAMPLE = 20_000

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._avg: tuple[Signature, float] | None = None

    def sync(self, session: Session, signature: Signature | None = None) -> bool:
        """Nothing to do: the server keeps the generated column in step with ``items``."""
        return False

    @staticmethod
    def _weight(column: str) -> str:
        w = FIELD_WEIGHTS
        return (f"CASE {column} WHEN 'A' THEN {w['title']!r} WHEN 'B' THEN {w['attributes']!r} "
                f"WHEN 'D' THEN {w['text']!r} ELSE 0.0 END")

    def _mean_length(self, session: Session, signature: Signature | None) -> float:
        from polyrec.store.postgres import FTS_COLUMN
        sig = signature or Signature.of(session)
        cached = self._avg
        if cached is not None and cached[0] == sig:
            return cached[1]
        pct = min(100.0, 100.0 * self.LENGTH_SAMPLE / max(sig.count, 1))
        avg = session.execute(text(
            f"SELECT avg(coalesce((SELECT sum({self._weight('w')}) FROM unnest(it.{FTS_COLUMN}) u, "
            f"unnest(u.weights) w), 0)) FROM items it TABLESAMPLE SYSTEM (:pct) REPEATABLE (0)"),
            {"pct": pct}).scalar()
        value = float(avg) if avg else 1.0
        self._avg = (sig, value)
        return value

    def search(self, session: Session, query: str, limit: int,
               allowed: set[int] | None = None,
               signature: Signature | None = None, *, sync: bool = True,
               exclude: AbstractSet[int] = frozenset()) -> list[tuple[int, float]]:
        from polyrec.store.postgres import FTS_COLUMN, FTS_CONFIG
        words = list(dict.fromkeys(tokens(query)))[:32]
        if not words or limit <= 0:
            return []
        params: dict[str, Any] = {f"w{i}": w for i, w in enumerate(words)}
        # each word's lexeme (none for a stop word) and its document frequency
        rows = session.execute(text(" UNION ALL ".join(
            f"SELECT lx, (SELECT count(*) FROM items WHERE {FTS_COLUMN} @@ to_tsquery("
            f"'{FTS_CONFIG}', :w{i})) FROM unnest(tsvector_to_array(to_tsvector("
            f"'{FTS_CONFIG}', :w{i}))) lx" for i in range(len(words)))), params).all()
        found = {str(lx): int(df) for lx, df in rows if df}
        if not found:
            return []
        n = max(session.execute(text("SELECT count(*) FROM items")).scalar_one(), 1)
        lexemes = list(found)
        idfs = [math.log(1.0 + (n - found[x] + 0.5) / (found[x] + 0.5)) for x in lexemes]
        k1, b = self.k1, self.b
        weight = self._weight("w")
        sql = f"""
        WITH cand AS (
            SELECT id, {FTS_COLUMN} AS doc FROM items
            WHERE {FTS_COLUMN} @@ CAST(:match AS tsquery)
            {"AND id = ANY(:allowed)" if allowed is not None else ""}
            {"AND NOT (id = ANY(:exclude))" if exclude else ""}),
        tf AS (
            SELECT c.id, u.lexeme, sum({weight}) AS tf
            FROM cand c, unnest(c.doc) u, unnest(u.weights) w
            WHERE u.lexeme = ANY(CAST(:lexemes AS text[])) GROUP BY c.id, u.lexeme),
        dl AS (
            SELECT c.id, sum({weight}) AS dl
            FROM cand c, unnest(c.doc) u, unnest(u.weights) w GROUP BY c.id)
        SELECT tf.id, sum(q.idf * tf.tf * {k1 + 1.0!r}
                          / (tf.tf + {k1!r} * (1 - {b!r} + {b!r} * dl.dl / :avg))) AS score
        FROM tf JOIN dl ON dl.id = tf.id
        JOIN unnest(CAST(:lexemes AS text[]), CAST(:idfs AS float8[])) AS q(lexeme, idf)
          ON q.lexeme = tf.lexeme
        GROUP BY tf.id ORDER BY score DESC, tf.id LIMIT :n"""
        params = {"lexemes": lexemes, "idfs": idfs, "n": int(limit),
                  "match": " | ".join(_tsquery_term(x) for x in lexemes),
                  "avg": self._mean_length(session, signature)}
        if allowed is not None:
            params["allowed"] = sorted(int(i) for i in allowed)
        if exclude:
            params["exclude"] = sorted(int(i) for i in exclude)
        return [(int(i), float(sc)) for i, sc in session.execute(text(sql), params)]


def _tsquery_term(lexeme: str) -> str:
    """A lexeme as a quoted tsquery term (taken as it is: no parsing, no stemming)."""
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


def fts5_available(session: Session) -> bool:
    """Whether the session's database is SQLite with the FTS5 extension compiled in."""
    if session.get_bind().dialect.name != "sqlite":
        return False
    try:
        options = {r[0] for r in session.execute(text("PRAGMA compile_options"))}
    except Exception:  # noqa: BLE001 - an unusual SQLite build: use the portable index
        return False
    return "ENABLE_FTS5" in options


def make_index(session: Session, backend: str = "auto") -> LexicalIndex:
    """The lexical index for this database: FTS5 on SQLite when available, PostgreSQL's
    full-text search on PostgreSQL, else memory BM25.

    ``backend`` may force ``"fts5"``, ``"postgres"`` or ``"memory"``.
    """
    dialect = session.get_bind().dialect.name
    if backend == "postgres" or (backend == "auto" and dialect == "postgresql"):
        return PostgresFtsIndex()
    if backend == "memory" or (backend == "auto" and not fts5_available(session)):
        return MemoryBM25Index()
    return Fts5Index()
