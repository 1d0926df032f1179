"""Search quality on a labelled query set: P@k, NDCG@k and MRR of several search runs.

A query file is JSON Lines, one query per line::

    {"query": "black dress", "relevant": {"product_type_name": "Dress", "colour_group_name": "Black"}}
    {"query": "pajamas", "relevant": {"product_type_name": ["Pyjama set", "Pyjama bottom"]}}
    {"query": "beach", "relevant": [{"product_group_name": "Swimwear"}, {"product_type_name": "Sandals"}]}
    {"query": "that one", "relevant_ids": ["573378003", "855834001"]}

``relevant`` is an attribute predicate: every field must hold (AND); a list of values is
an OR; ``{"contains": "boy"}`` matches a substring; values compare case-insensitively and
a list-valued attribute matches when any element does. A list of predicates is an OR of
them. ``relevant_ids`` lists external item ids instead. Other keys (``kind``, notes) are
kept and reported. Bad lines raise one :class:`ValidationError` naming the file, the line
and the field.

Metrics, with R the relevant items and the top ``k`` results:

- ``P@k``   = relevant results in the top k / min(k, |R|)  (1.0 is reachable when |R| < k)
- ``NDCG@k``  binary gains, ideal DCG over min(k, |R|) relevant results
- ``MRR``   = 1 / rank of the first relevant result within the top k (0 when none)

Each query is run through :meth:`Engine.search` once per *run*: by default ``default``
(the engine's search with its defaults plus any options given), ``bm25`` (lexical only,
understanding off) and ``dense`` (the BERT dense leg only, understanding off).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from polyrec.errors import ValidationError

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

#: Baselines run next to the default search: name -> Engine.search options.
BASELINES: dict[str, dict[str, Any]] = {
    "bm25": {"weights": {"dense": 0.0, "clip": 0.0, "personal": 0.0, "lexical": 1.0},
             "understanding": "off"},
    "dense": {"weights": {"dense": 1.0, "clip": 0.0, "personal": 0.0, "lexical": 0.0},
              "understanding": "off"},
}
METRICS: tuple[str, ...] = ("p", "ndcg", "mrr")


def _bad(path: Any, line: int, fld: str, message: str) -> ValidationError:
    err = ValidationError(f"{path}, line {line}, field '{fld}': {message}")
    err.file, err.row, err.field, err.reason = str(path), line, fld, message
    return err


@dataclass(frozen=True)
class LabelledQuery:
    """One query and how to tell its relevant items."""

    query: str
    line: int
    #: OR of predicates; each maps field -> list of accepted values or {"contains": s}
    predicates: tuple[dict[str, Any], ...] = ()
    ids: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def matches(self, attributes: Mapping[str, Any]) -> bool:
        """Whether an item with these attributes satisfies one of the predicates."""
        return any(all(_holds(attributes.get(f), want) for f, want in p.items())
                   for p in self.predicates)


def _holds(value: Any, want: Any) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    texts = [str(v).lower() for v in values if v is not None]
    if isinstance(want, dict):
        needle = want["contains"].lower()
        return any(needle in t for t in texts)
    return any(t in want for t in texts)


def _predicate(raw: Any, path: Any, line: int, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or not raw:
        raise _bad(path, line, where, "expected a non-empty object of field -> value(s)")
    out: dict[str, Any] = {}
    for name, want in raw.items():
        here = f"{where}.{name}"
        if isinstance(want, str) and want.strip():
            out[name] = frozenset({want.strip().lower()})
        elif (isinstance(want, list) and want
              and all(isinstance(v, str) and v.strip() for v in want)):
            out[name] = frozenset(v.strip().lower() for v in want)
        elif (isinstance(want, dict) and set(want) == {"contains"}
              and isinstance(want["contains"], str) and want["contains"].strip()):
            out[name] = {"contains": want["contains"].strip()}
        else:
            raise _bad(path, line, here, "expected a string, a list of strings or "
                       '{"contains": "text"}, got ' + json.dumps(want)[:60])
    return out


def parse_queries(lines: Iterable[str], path: Any = "<queries>") -> list[LabelledQuery]:
    """Labelled queries from JSON Lines (blank lines and lines starting with # skipped)."""
    out: list[LabelledQuery] = []
    for n, text in enumerate(lines, start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _bad(path, n, "-", f"not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(row, dict):
            raise _bad(path, n, "-", "each line must be a JSON object")
        query = row.get("query")
        if not isinstance(query, str) or not query.strip():
            raise _bad(path, n, "query", "missing or not a non-empty string")
        has_rel, has_ids = "relevant" in row, "relevant_ids" in row
        if has_rel == has_ids:
            raise _bad(path, n, "relevant", "give exactly one of 'relevant' (an attribute "
                       "predicate) and 'relevant_ids' (a list of item ids)")
        preds: tuple[dict[str, Any], ...] = ()
        ids: tuple[str, ...] = ()
        if has_rel:
            rel = row["relevant"]
            if isinstance(rel, list):
                if not rel:
                    raise _bad(path, n, "relevant", "an empty list")
                preds = tuple(_predicate(p, path, n, f"relevant[{i}]") for i, p in enumerate(rel))
            else:
                preds = (_predicate(rel, path, n, "relevant"),)
        else:
            raw = row["relevant_ids"]
            if (not isinstance(raw, list) or not raw
                    or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in raw)):
                raise _bad(path, n, "relevant_ids", "expected a non-empty list of item ids")
            ids = tuple(str(v) for v in raw)
        extra = {k: v for k, v in row.items() if k not in ("query", "relevant", "relevant_ids")}
        out.append(LabelledQuery(query.strip(), n, preds, ids, extra))
    if not out:
        raise ValidationError(f"{path}: no queries in the file", file=str(path))
    return out


def load_queries(path: str | Path) -> list[LabelledQuery]:
    """:func:`parse_queries` of a file (a missing file is a ValidationError)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"{p}: cannot read the query file ({exc.strerror})", file=str(p)) from None
    return parse_queries(text.splitlines(), p)


def relevant_sets(engine: "Engine", queries: Sequence[LabelledQuery],
                  path: Any = "<queries>") -> list[set[str]]:
    """External ids of each query's relevant items in the engine's catalogue. A field
    no item has, an unknown id or a predicate nothing satisfies is a ValidationError."""
    from polyrec.retrieve.search import searcher
    with engine.store.snapshot() as s:
        snap = searcher(engine).catalog(s)
    fields = snap.fields
    out = []
    for q in queries:
        if q.ids:
            unknown = [i for i in q.ids if i not in snap.internal]
            if unknown:
                raise _bad(path, q.line, "relevant_ids", f"unknown item id(s): {', '.join(unknown[:5])}")
            out.append(set(q.ids))
            continue
        for k, p in enumerate(q.predicates):
            missing = sorted(set(p) - fields)
            if missing:
                where = "relevant" if len(q.predicates) == 1 else f"relevant[{k}]"
                raise _bad(path, q.line, f"{where}.{missing[0]}",
                           f"no item has this attribute (fields: {', '.join(sorted(fields)[:12])}...)")
        rel = {snap.external[i] for i, a in snap.attributes.items() if q.matches(a)}
        if not rel:
            raise _bad(path, q.line, "relevant", "no item of the catalogue satisfies it")
        out.append(rel)
    return out


def metrics(ranked: Sequence[str], relevant: set[str], k: int) -> dict[str, float]:
    """P@k (over min(k, |relevant|)), NDCG@k and MRR of one ranked list."""
    top = list(ranked)[:k]
    gains = [1.0 if i in relevant else 0.0 for i in top]
    ideal = min(k, len(relevant))
    dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
    idcg = sum(1.0 / math.log2(r + 2) for r in range(ideal))
    first = next((r for r, g in enumerate(gains, start=1) if g), None)
    return {"p": sum(gains) / ideal if ideal else 0.0, "ndcg": dcg / idcg if idcg else 0.0,
            "mrr": 1.0 / first if first else 0.0}


@dataclass
class SearchEvaluation:
    """Per-query and mean metrics of each run."""

    k: int
    runs: dict[str, dict[str, Any]]
    queries: list[dict[str, Any]]
    means: dict[str, dict[str, float]]
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "k": self.k, "runs": self.runs, "means": self.means,
                "queries": self.queries}


def evaluate_search(engine: "Engine", queries: str | Path | Sequence[LabelledQuery], *,
                    k: int = 10, options: Mapping[str, Any] | None = None,
                    runs: Mapping[str, Mapping[str, Any]] | None = None,
                    baselines: bool = True) -> SearchEvaluation:
    """Run every query through each run and score it.

    ``options`` are Engine.search keywords for the ``default`` run; ``runs`` adds named
    runs (name -> options); ``baselines`` adds the ``bm25`` and ``dense`` runs."""
    source = ""
    if isinstance(queries, (str, Path)):
        source = str(queries)
        queries = load_queries(queries)
    plan: dict[str, dict[str, Any]] = {"default": dict(options or {})}
    plan.update({n: dict(o) for n, o in (runs or {}).items()})
    if baselines:
        plan.update({n: dict(o) for n, o in BASELINES.items() if n not in plan})
    rel = relevant_sets(engine, queries, source or "<queries>")
    rows: list[dict[str, Any]] = []
    for q, relevant in zip(queries, rel):
        row: dict[str, Any] = {"query": q.query, "line": q.line, "relevant": len(relevant),
                               **q.extra, "runs": {}}
        for name, opts in plan.items():
            response = engine.search(q.query, k, **opts)
            ids = response.ids()
            entry: dict[str, Any] = {m: round(v, 4) for m, v in metrics(ids, relevant, k).items()}
            entry["top"] = ids
            if name == "default":
                row["understood"] = response.as_dict()["entities"]
            row["runs"][name] = entry
        rows.append(row)
    means = {name: {m: round(sum(r["runs"][name][m] for r in rows) / len(rows), 4)
                    for m in METRICS} for name in plan}
    return SearchEvaluation(k, plan, rows, means, source)
