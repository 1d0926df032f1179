"""Dense top-k inside PostgreSQL with pgvector, when the server has it.

On PostgreSQL with the ``vector`` extension available, the stored item vectors of an
encoder (``item_vectors``, one blob per item) are also kept in a pgvector table, one per
(encoder, width): ``polyrec_vec_<n>(item_id, embedding halfvec(dim))`` with an HNSW index
over cosine distance. The tables are listed in ``polyrec_vector_tables`` and built ahead
of the first search (:func:`build_tables`): by ``polyrec migrate`` for every encoder with
stored vectors, and by ``encode`` for the encoders it ran; a search that still finds none
(a database from before, vectors written another way) builds it then
(:meth:`PgVectors.table`). A build copies the encoder's stored vectors in (decoded in
the client, one binary COPY per range of ids) and builds the index in one transaction that holds writers of ``item_vectors`` off meanwhile, with
progress lines (``polyrec.progress``) for the copy and the index. From then on a trigger
on ``item_vectors`` keeps every table in step inside the writing transaction itself
(insert, re-encode, delete, an item's deletion cascading), the way the generated
full-text column keeps lexical search in step: no process can see a vector in one place
and not the other.

``halfvec`` holds float16 values: exactly what the store keeps by default (``encode
--dtype float16``); float32 vectors are rounded to float16 there. The query is rounded
to float16 too, so scores differ from the in-process ones in the fourth decimal or so.
Vectors that halfvec cannot hold (zero, NaN, beyond +-65504) are left out: in process a
zero vector never matches either.

Searches (:meth:`PgVectors.search`) are ``ORDER BY embedding <=> :q LIMIT k`` through the
HNSW index with ``hnsw.ef_search`` at least k; with a filter (a set of allowed items)
through pgvector 0.8's iterative index scan (``hnsw.iterative_scan = relaxed_order``,
re-sorted here), or an exact scan of the allowed rows when they are few (below
``exact_below`` items, or too few for the index scan to find k within its budget).

Nothing of this exists on SQLite, on a server without pgvector, or with the environment
variable ``POLYREC_PGVECTOR=off`` (``0``, ``false``, ``no``): search then stays in the
process, as before. A table that could not be created (no privilege to create the
extension) is logged once and searches stay in the process.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import Integer, Text

from polyrec.progress import progress_bar, stage
from polyrec.store.postgres import has_pgvector, lock_named

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.orm import Session

    from polyrec.store import Store

log = logging.getLogger("polyrec.search")

#: environment switch: "off" (or 0/false/no) keeps dense search in the process
ENV = "POLYREC_PGVECTOR"
#: the registry of pgvector tables: (encoder, dim) -> table name
REGISTRY = "polyrec_vector_tables"
TRIGGER = "polyrec_vector_tables_sync"
#: widest vector halfvec's HNSW index takes
MAX_DIM = 4000
#: largest magnitude float16 holds
HALF_MAX = 65504
#: pgvector's iterative index scan visits at most this many tuples (hnsw.max_scan_tuples)
MAX_SCAN_TUPLES = 20_000
#: vectors copied into a new table per statement (one progress step)
COPY_CHUNK = 20_000
#: seconds between two looks at the index build's progress
WATCH_INTERVAL = 10.0

_SETUP = [
    # float16 / float32 little-endian blobs (polyrec.store.vectors) -> real[]
    """CREATE OR REPLACE FUNCTION polyrec_f16_values(b bytea) RETURNS real[]
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
      SELECT array_agg(CASE WHEN e = 0 THEN m * 5.9604644775390625e-08::float8
                            WHEN e = 31 THEN 'NaN'::float8
                            ELSE (1024 + m) * power(2::float8, e - 25) END
                       * (1 - 2 * s) ORDER BY i)::real[]
      FROM (SELECT i, h >> 15 AS s, (h >> 10) & 31 AS e, h & 1023 AS m
            FROM (SELECT i, get_byte(b, 2 * i) | (get_byte(b, 2 * i + 1) << 8) AS h
                  FROM generate_series(0, length(b) / 2 - 1) AS i) AS raw) AS parts
    $$""",
    """CREATE OR REPLACE FUNCTION polyrec_f32_values(b bytea) RETURNS real[]
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
      SELECT array_agg(CASE WHEN e = 0 THEN m * power(2::float8, -149)
                            WHEN e = 255 THEN 'NaN'::float8
                            ELSE (8388608 + m) * power(2::float8, e - 150) END
                       * (1 - 2 * s) ORDER BY i)::real[]
      FROM (SELECT i, h >> 31 AS s, (h >> 23) & 255 AS e, h & 8388607 AS m
            FROM (SELECT i, get_byte(b, 4 * i)::bigint
                            | (get_byte(b, 4 * i + 1)::bigint << 8)
                            | (get_byte(b, 4 * i + 2)::bigint << 16)
                            | (get_byte(b, 4 * i + 3)::bigint << 24) AS h
                  FROM generate_series(0, length(b) / 4 - 1) AS i) AS raw) AS parts
    $$""",
    """CREATE OR REPLACE FUNCTION polyrec_vector_values(b bytea, dtype text) RETURNS real[]
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
      SELECT CASE dtype WHEN 'float16' THEN polyrec_f16_values(b)
                        WHEN 'float32' THEN polyrec_f32_values(b) END
    $$""",
    # what halfvec can hold and cosine distance can use: finite, in range, not all zero
    f"""CREATE OR REPLACE FUNCTION polyrec_vector_ok(a real[]) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
      SELECT a IS NOT NULL
         AND NOT EXISTS (SELECT 1 FROM unnest(a) AS x WHERE x = 'NaN' OR abs(x) > {HALF_MAX})
         AND EXISTS (SELECT 1 FROM unnest(a) AS x WHERE x <> 0)
    $$""",
    f"""CREATE TABLE IF NOT EXISTS {REGISTRY} (
      id serial PRIMARY KEY, encoder varchar(128) NOT NULL, dim integer NOT NULL,
      table_name text NOT NULL, created_at double precision NOT NULL,
      UNIQUE (encoder, dim))""",
    # keeps every registered table in step with item_vectors, in the writing transaction
    f"""CREATE OR REPLACE FUNCTION {TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
      t record;
      vals real[];
    BEGIN
      IF TG_OP IN ('UPDATE', 'DELETE') THEN
        FOR t IN SELECT table_name, dim FROM {REGISTRY} WHERE encoder = OLD.encoder LOOP
          EXECUTE format('DELETE FROM %I WHERE item_id = $1', t.table_name) USING OLD.item_id;
        END LOOP;
      END IF;
      IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT table_name INTO t FROM {REGISTRY} WHERE encoder = NEW.encoder AND dim = NEW.dim;
        IF FOUND THEN
          vals := polyrec_vector_values(NEW.vector, NEW.dtype);
          IF polyrec_vector_ok(vals) THEN
            EXECUTE format('INSERT INTO %I (item_id, embedding) VALUES ($1, $2::halfvec) '
                           'ON CONFLICT (item_id) DO UPDATE SET embedding = EXCLUDED.embedding',
                           t.table_name) USING NEW.item_id, vals;
          END IF;
        END IF;
      END IF;
      RETURN NULL;
    END
    $$""",
]


def disabled_by_env() -> bool:
    """Whether ``POLYREC_PGVECTOR`` switches pgvector off."""
    return os.environ.get(ENV, "").strip().lower() in ("off", "0", "false", "no")


def vector_literal(query: torch.Tensor) -> str:
    """A query vector as pgvector's text form ``[x1,x2,...]``."""
    values = query.detach().float().cpu().flatten().tolist()
    return "[" + ",".join(repr(float(v)) for v in values) + "]"


class PgVectors:
    """Dense top-k in one PostgreSQL store's pgvector tables (one object per Engine).

    ``ef_search``: HNSW search breadth (at least k is used); ``m``, ``ef_construction``:
    the graph built for a new table; ``exact_below``: a filter allowing at most this
    many items is answered by an exact scan of their rows; ``build_memory``: the
    ``maintenance_work_mem`` of the index build (the graph is built in memory while it
    fits)."""

    def __init__(self, store: "Store", *, ef_search: int = 100, m: int = 16,
                 ef_construction: int = 64, exact_below: int = 5_000,
                 build_memory: str = "256MB") -> None:
        self.store = store
        self.ef_search = int(ef_search)
        self.m = int(m)
        self.ef_construction = int(ef_construction)
        self.exact_below = int(exact_below)
        self.build_memory = build_memory
        #: SQL searches answered here (how a caller or test can tell this path ran)
        self.queries = 0
        self._available: bool | None = None
        self._tables: dict[tuple[str, int], str] = {}
        self._failed: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    @classmethod
    def for_store(cls, store: "Store", **options: Any) -> "PgVectors | None":
        """A PgVectors for a PostgreSQL store (None on SQLite or when switched off by
        ``POLYREC_PGVECTOR``); whether the server has pgvector is checked on first use."""
        if store.is_sqlite or disabled_by_env():
            return None
        return cls(store, **options)

    # -- tables ----------------------------------------------------------------------------
    def available(self) -> bool:
        """Whether the server offers pgvector (asked once)."""
        if self._available is None:
            with self.store.engine.connect() as conn:
                self._available = has_pgvector(conn)
        return self._available

    def table(self, session: "Session", encoder: str, dim: int) -> str | None:
        """The pgvector table of ``encoder``'s ``dim``-wide vectors when ``session``'s
        snapshot sees it complete; None otherwise. A table not there yet is created
        (in a transaction of its own) for the next snapshots, and None returned: this
        snapshot may predate it."""
        key = (encoder, int(dim))
        found = self._tables.get(key)
        if found is not None:
            return found
        if not 0 < dim <= MAX_DIM or key in self._failed or not self.available():
            return None
        found = _registered(session, encoder, dim)
        if found is not None:
            self._tables[key] = found
            return found
        self.ensure(encoder, dim)
        return None

    def ensure(self, encoder: str, dim: int, *, progress: bool = False) -> str | None:
        """Create the extension, the registry, the trigger and ``encoder``'s table of
        ``dim``-wide vectors with its HNSW index when missing (copying the stored
        vectors in); return the table's name (None when it cannot be created).
        ``progress``: lines for the copy and the index build (``polyrec.progress``)."""
        key = (encoder, int(dim))
        with self._lock:
            if key in self._failed or not self.available():
                return None
            try:
                with self.store.session() as s:
                    name = self._create(s, encoder, int(dim), progress)
            except Exception as exc:  # noqa: BLE001 - search stays in the process
                self._failed.add(key)
                log.warning("pgvector table for %s (%d) not created: %s; dense search stays "
                            "in the process", encoder, dim, exc)
                return None
            return name

    def _create(self, s: "Session", encoder: str, dim: int, progress: bool = False) -> str:
        lock_named(s, "polyrec:pgvector")
        s.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
        found = _registered(s, encoder, dim) if _has_registry(s) else None
        if found is not None:
            return found
        for statement in _SETUP:
            s.execute(text(statement))
        if not s.execute(text("SELECT 1 FROM pg_trigger WHERE tgname = :t AND tgrelid = "
                              "'item_vectors'::regclass"), {"t": TRIGGER}).first():
            s.execute(text(f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON "
                           f"item_vectors FOR EACH ROW EXECUTE FUNCTION {TRIGGER}()"))
        # writers wait from here to the commit: the copy below misses nothing, and each
        # write after it finds the table registered and its trigger keeps it in step
        s.execute(text("LOCK TABLE item_vectors IN SHARE MODE"))
        found = _registered(s, encoder, dim)
        if found is not None:
            return found
        rid = s.execute(text(f"INSERT INTO {REGISTRY} (encoder, dim, table_name, created_at) "
                             "VALUES (:e, :d, '', extract(epoch FROM now())) RETURNING id"),
                        {"e": encoder, "d": dim}).scalar_one()
        name = f"polyrec_vec_{rid}"
        s.execute(text(f"UPDATE {REGISTRY} SET table_name = :n WHERE id = :i"), {"n": name, "i": rid})
        s.execute(text(f"CREATE TABLE {name} (item_id integer PRIMARY KEY REFERENCES items(id) "
                       f"ON DELETE CASCADE, embedding halfvec({dim}) NOT NULL)"))
        rows = _copy_vectors(s, name, encoder, dim, progress)
        s.execute(text("SELECT set_config('maintenance_work_mem', :m, true)"),
                  {"m": self.build_memory})
        stage(f"pgvector: building the HNSW index of {name} ({encoder}, {dim}) over "
              f"{rows:,} vectors", progress)
        pid = s.execute(text("SELECT pg_backend_pid()")).scalar()
        with _IndexWatch(self.store, name, int(pid), rows, progress):
            s.execute(text(f"CREATE INDEX {name}_hnsw ON {name} USING hnsw "
                           f"(embedding halfvec_cosine_ops) WITH (m = {self.m}, "
                           f"ef_construction = {self.ef_construction})"))
        log.info("pgvector table %s for %s (%d) created", name, encoder, dim)
        return name

    # -- search ----------------------------------------------------------------------------
    def search(self, session: "Session", encoder: str, dim: int, query: torch.Tensor | str,
               k: int, allowed: set[int] | None = None, exclude: Iterable[int] = ()
               ) -> list[tuple[int, float]] | None:
        """The ``k`` best (item id, cosine) for ``query`` among ``allowed`` items (all
        when None) without ``exclude``, best first, read in ``session``'s snapshot.
        None when this store cannot answer in SQL (no pgvector, no table in this snapshot):
        the caller searches in the process."""
        name = self.table(session, encoder, dim)
        if name is None:
            return None
        q = query if isinstance(query, str) else vector_literal(query)
        drop = set(exclude)
        want = k + len(drop)
        self.queries += 1
        if allowed is not None:
            ids = list(allowed - drop) if drop else list(allowed)
            if not ids or k <= 0:
                return []
            total = _row_count(session, name)
            if len(ids) <= self.exact_below or want * total > len(ids) * MAX_SCAN_TUPLES // 2:
                return self._exact(session, name, q, k, ids)
            found = self._index(session, name, q, want, ids)
            found = [(i, s) for i, s in found if i not in drop]
            if len(found) < k:  # the iterative scan gave up before k: look at every row
                return self._exact(session, name, q, k, ids)
            return found[:k]
        found = [(i, s) for i, s in self._index(session, name, q, want, None) if i not in drop]
        if len(found) < k and drop:  # the index scan gave up before k others (many
            return self._exact_without(session, name, q, k, drop)  # excluded): every row
        return found[:k]

    def _index(self, session: "Session", name: str, q: str, k: int,
               ids: list[int] | None) -> list[tuple[int, float]]:
        """Top-k through the HNSW index (an iterative scan when filtered)."""
        _configure(session, min(1000, max(self.ef_search, k)))
        where = ""
        params: dict[str, Any] = {"q": q, "k": k}
        stmt_params = []
        if ids is not None:
            where = "WHERE item_id = ANY(:ids) "
            params["ids"] = ids
            stmt_params.append(bindparam("ids", type_=ARRAY(Integer)))
        stmt = text(f"SELECT item_id, embedding <=> CAST(:q AS halfvec) AS d FROM {name} "
                    f"{where}ORDER BY embedding <=> CAST(:q AS halfvec) LIMIT :k")
        if stmt_params:
            stmt = stmt.bindparams(*stmt_params)
        return _scored(session.execute(stmt, params).all())

    def _exact(self, session: "Session", name: str, q: str, k: int,
               ids: Sequence[int]) -> list[tuple[int, float]]:
        """Top-k over the given items' rows, every one compared (no index)."""
        stmt = text(f"SELECT item_id, d FROM (SELECT item_id, embedding <=> CAST(:q AS halfvec) "
                    f"AS d FROM {name} WHERE item_id = ANY(:ids) OFFSET 0) AS scored "
                    "ORDER BY d LIMIT :k").bindparams(bindparam("ids", type_=ARRAY(Integer)))
        return _scored(session.execute(stmt, {"q": q, "k": k, "ids": list(ids)}).all())

    def _exact_without(self, session: "Session", name: str, q: str, k: int,
                       drop: set[int]) -> list[tuple[int, float]]:
        """Top-k over every row but ``drop``'s, every one compared (no index)."""
        stmt = text(f"SELECT item_id, d FROM (SELECT item_id, embedding <=> CAST(:q AS halfvec) "
                    f"AS d FROM {name} WHERE NOT (item_id = ANY(:drop)) OFFSET 0) AS scored "
                    "ORDER BY d LIMIT :k").bindparams(bindparam("drop", type_=ARRAY(Integer)))
        return _scored(session.execute(stmt, {"q": q, "k": k, "drop": sorted(drop)}).all())

    def vector(self, session: "Session", encoder: str, dim: int, item: int) -> str | None:
        """``item``'s vector in text form (None: no table, or no usable vector)."""
        name = self.table(session, encoder, dim)
        if name is None:
            return None
        return session.execute(text(f"SELECT embedding::text FROM {name} WHERE item_id = :i"),
                               {"i": item}).scalar()

    def scores(self, session: "Session", name: str, q: str, ids: Sequence[int]) -> dict[int, float]:
        """Cosine of each of ``ids`` that has a vector in table ``name`` with ``q``."""
        stmt = text(f"SELECT item_id, embedding <=> CAST(:q AS halfvec) FROM {name} "
                    "WHERE item_id = ANY(:ids)").bindparams(bindparam("ids", type_=ARRAY(Integer)))
        return dict(_scored(session.execute(stmt, {"q": q, "ids": list(ids)}).all()))

    def similar(self, session: "Session", encoders: Mapping[str, int], target: int, k: int,
                allowed: set[int] | None = None, pool: int | None = None,
                exclude: Iterable[int] = ()
                ) -> tuple[list[tuple[int, float, dict[str, float]]], list[str]] | None:
        """Neighbours of item ``target``: for each candidate the mean of its cosines to
        the target over the encoders (name -> width) both have a vector for, as the
        in-process similar items. Candidates are each encoder's ``pool`` nearest (the
        k nearest when there is one encoder; 5k, at least 50, otherwise), scored in every
        encoder. Returns (neighbours as (item, mean, per-encoder cosines), the encoders
        used), or None when one of them has no table in this snapshot (the caller
        searches in the process). ``exclude``: items never returned (retired ones)."""
        names = {e: self.table(session, e, d) for e, d in encoders.items()}
        if not names or any(n is None for n in names.values()):
            return None
        queries = {}
        for e, name in names.items():
            vec = session.execute(text(f"SELECT embedding::text FROM {name} WHERE item_id = :i"),
                                  {"i": target}).scalar()
            if vec is not None:
                queries[e] = vec
        if not queries:
            return [], []
        n = pool or (k if len(queries) == 1 else max(5 * k, 50))
        candidates: dict[int, None] = {}
        per: dict[str, dict[int, float]] = {}
        drop = {target, *exclude}
        for e, q in queries.items():
            top = self.search(session, e, encoders[e], q, n, allowed, exclude=drop) or []
            per[e] = dict(top)
            candidates.update(dict.fromkeys(i for i, _ in top))
        if len(queries) > 1:
            for e, q in queries.items():
                missing = [i for i in candidates if i not in per[e]]
                if missing:
                    per[e].update(self.scores(session, names[e], q, missing))  # type: ignore[arg-type]
        out = []
        for item in candidates:
            by = {e: per[e][item] for e in queries if item in per[e]}
            if by:
                out.append((item, sum(by.values()) / len(by), by))
        out.sort(key=lambda t: (-t[1], t[0]))
        return out[:k], list(queries)


def build_tables(store: "Store", encoders: Iterable[str] | None = None, *,
                 progress: bool = False, **options: Any) -> list[dict[str, Any]]:
    """Build, ahead of any search, the pgvector table (and HNSW index) of every
    (encoder, width) with stored vectors, or of the given ``encoders`` only; tables that
    exist are left as they are (their trigger keeps them in step). Nothing on SQLite,
    on a server without pgvector, or with ``POLYREC_PGVECTOR=off``. Returns one entry
    per (encoder, width): ``encoder``, ``dim``, ``table`` (None: it could not be
    created, logged), ``built`` (whether this call built it) and ``seconds``.
    ``options``: :class:`PgVectors`' build settings."""
    pgv = PgVectors.for_store(store, **options)
    if pgv is None or not pgv.available():
        return []
    names = None if encoders is None else sorted(set(encoders))
    if names == []:
        return []
    with store.session() as s:
        widths = _stored_widths(s, names)
        existing = {key: _registered(s, *key) for key in widths}
    out = []
    for encoder, dim in widths:
        start = time.perf_counter()
        name = existing[(encoder, dim)]
        built = False
        if name is None and 0 < dim <= MAX_DIM:
            name = pgv.ensure(encoder, dim, progress=progress)
            built = name is not None
        out.append({"encoder": encoder, "dim": dim, "table": name, "built": built,
                    "seconds": round(time.perf_counter() - start, 3)})
        if built:
            stage(f"pgvector: table {name} for {encoder} ({dim}) ready in "
                  f"{out[-1]['seconds']:.1f}s", progress)
    return out


def missing_tables(store: "Store") -> list[tuple[str, int]]:
    """The (encoder, width) pairs with stored vectors but no pgvector table yet, that
    :func:`build_tables` would build (none on SQLite, without pgvector, or switched off)."""
    pgv = PgVectors.for_store(store)
    if pgv is None or not pgv.available():
        return []
    with store.session() as s:
        return [key for key in _stored_widths(s, None)
                if 0 < key[1] <= MAX_DIM and _registered(s, *key) is None]


def _stored_widths(session: "Session", encoders: Sequence[str] | None) -> list[tuple[str, int]]:
    """The (encoder, width) pairs of the stored vectors (of ``encoders`` when given)."""
    if encoders is None:
        rows = session.execute(text("SELECT DISTINCT encoder, dim FROM item_vectors"))
    else:
        rows = session.execute(text("SELECT DISTINCT encoder, dim FROM item_vectors "
                                    "WHERE encoder = ANY(:e)").bindparams(
            bindparam("e", type_=ARRAY(Text))), {"e": list(encoders)})
    return sorted((str(e), int(d)) for e, d in rows)


def _copy_vectors(s: "Session", name: str, encoder: str, dim: int, progress: bool) -> int:
    """Copy ``encoder``'s stored ``dim``-wide vectors into the new table ``name``, in
    ranges of item ids of about COPY_CHUNK vectors each: the blobs read, decoded here
    (numpy), rounded to float16 as halfvec holds them, and written with one binary COPY
    per range (vectors halfvec cannot hold left out, as the trigger does). Returns the
    rows copied. Decoding the blobs in SQL ran at ~1k vectors/s; this is bound by
    reading the blobs and the server's inserts. A driver without psycopg 3's
    ``cursor.copy`` (psycopg2, SQLAlchemy's default when installed) still decodes them
    in SQL (:func:`_copy_range_in_sql`)."""
    total, lo, hi = s.execute(text("SELECT count(*), min(item_id), max(item_id) FROM "
                                   "item_vectors WHERE encoder = :e AND dim = :d"),
                              {"e": encoder, "d": dim}).one()
    if not total:
        return 0
    step = max(1, (hi - lo + 1) * COPY_CHUNK // total)
    copy_range = (_copy_range if s.connection().dialect.driver == "psycopg"
                  else _copy_range_in_sql)
    copied = 0
    bar = progress_bar(total=total, desc=f"pgvector: copy {encoder} ({dim}) into {name}",
                       unit="vector", enabled=progress)
    try:
        for start in range(lo, hi + 1, step):
            read, written = copy_range(s, name, {"e": encoder, "d": dim, "lo": start,
                                                 "hi": start + step})
            copied += written
            bar.update(read)
    finally:
        bar.close()
    return copied


def _copy_range(s: "Session", name: str, params: dict[str, Any]) -> tuple[int, int]:
    """One range of ids of :func:`_copy_vectors` by binary COPY: (vectors read, copied)."""
    rows = s.execute(text("SELECT item_id, dtype, vector FROM item_vectors WHERE encoder = :e "
                          "AND dim = :d AND item_id >= :lo AND item_id < :hi ORDER BY item_id"),
                     params).all()
    ids, halves = decode_halfvecs(rows, int(params["d"]))
    if len(ids):
        raw = s.connection().connection.driver_connection  # psycopg: the session's transaction
        with raw.cursor() as cur:
            with cur.copy(f"COPY {name} (item_id, embedding) FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(binary_copy(ids, halves))
    return len(rows), len(ids)


def _copy_range_in_sql(s: "Session", name: str, params: dict[str, Any]) -> tuple[int, int]:
    """One range of ids of :func:`_copy_vectors` decoded in SQL by the trigger's functions
    (~1-2k vectors/s here): (rows inserted, rows inserted; those left out are not
    counted as read)."""
    n = s.execute(text(
        f"INSERT INTO {name} (item_id, embedding) SELECT item_id, vals::halfvec FROM "
        "(SELECT item_id, polyrec_vector_values(vector, dtype) AS vals FROM item_vectors "
        "WHERE encoder = :e AND dim = :d AND item_id >= :lo AND item_id < :hi) AS decoded "
        "WHERE polyrec_vector_ok(vals)"), params).rowcount
    return n, n


def decode_halfvecs(rows: Sequence[tuple[int, str, bytes]], dim: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, float16 matrix) of the ``(item_id, dtype, blob)`` rows whose vector
    halfvec can hold: finite, at most HALF_MAX in magnitude, not all zero (the rule of
    ``polyrec_vector_ok``, applied to the stored values). float32 values are rounded to
    the nearest float16, as pgvector's cast does."""
    if not rows:
        return np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float16)
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    values = np.empty((len(rows), dim), dtype=np.float32)
    for dtype, width in (("float16", np.float16), ("float32", np.float32)):
        picked = [k for k, r in enumerate(rows) if r[1] == dtype]
        if picked:
            blob = b"".join(bytes(rows[k][2]) for k in picked)
            values[picked] = np.frombuffer(blob, dtype=width).reshape(len(picked), dim)
    known = np.fromiter((r[1] in ("float16", "float32") for r in rows), dtype=bool,
                        count=len(rows))
    with np.errstate(invalid="ignore"):
        ok = (known & np.isfinite(values).all(axis=1)
              & (np.abs(values) <= HALF_MAX).all(axis=1) & (values != 0).any(axis=1))
    return ids[ok], values[ok].astype(np.float16)


#: the header of PostgreSQL's binary COPY format (signature, flags, no extension)
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)


def binary_copy(ids: np.ndarray, halves: np.ndarray) -> bytes:
    """The rows ``(item_id integer, embedding halfvec)`` in PostgreSQL's binary COPY
    format, built in one numpy pass: per row the field count, then each field's length
    and value (halfvec's binary form: int16 dim, int16 0, the float16 values; all
    big-endian)."""
    n, dim = halves.shape
    row = np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", ">i4"), ("vec_len", ">i4"),
                    ("dim", ">i2"), ("unused", ">i2"), ("values", ">f2", (dim,))])
    out = np.zeros(n, dtype=row)
    out["fields"], out["id_len"], out["id"] = 2, 4, ids
    out["vec_len"], out["dim"], out["values"] = 4 + 2 * dim, dim, halves
    return _COPY_HEADER + out.tobytes() + _COPY_TRAILER


class _IndexWatch:
    """While backend ``pid`` builds an index (of a table other connections cannot see
    yet): a progress line every WATCH_INTERVAL seconds from
    ``pg_stat_progress_create_index`` (pgvector reports the tuples it has put into the
    graph, and its phase). Nothing when ``enabled`` is false."""

    def __init__(self, store: "Store", table: str, pid: int, total: int, enabled: bool) -> None:
        self.store, self.table, self.pid = store, table, pid
        self.total, self.enabled = total, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "_IndexWatch":
        if self.enabled and self.total:
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="polyrec-pgvector-index-progress")
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        bar = progress_bar(total=self.total, desc=f"pgvector: index {self.table}_hnsw",
                           unit="vector", interval=0)
        try:
            with self.store.engine.connect() as conn:
                while not self._stop.wait(WATCH_INTERVAL):
                    row = conn.execute(text(
                        "SELECT tuples_done, phase FROM pg_stat_progress_create_index "
                        "WHERE pid = :p"), {"p": self.pid}).first()
                    conn.rollback()  # the statistics are read once per transaction
                    if row is not None:
                        bar.set_postfix_str(str(row[1]))
                        bar.update(max(0, min(int(row[0] or 0), self.total) - bar.n))
        except Exception as exc:  # noqa: BLE001 - progress output must never fail a build
            log.debug("index progress of %s not read: %s", self.table, exc)
        finally:
            bar.close()


def _configure(session: "Session", ef_search: int) -> None:
    """Set ``hnsw.ef_search`` and ``hnsw.iterative_scan`` (relaxed order: a filtered scan
    goes on until it has k rows; results are re-sorted here) for the session's
    transaction, once per session and value (SET LOCAL: gone when the read snapshot
    ends). Only HNSW scans read them, and every one of them is this module's."""
    if session.info.get("polyrec_hnsw") != ef_search:
        session.execute(text("SELECT set_config('hnsw.ef_search', :v, true), "
                             "set_config('hnsw.iterative_scan', 'relaxed_order', true)"),
                        {"v": str(ef_search)})
        session.info["polyrec_hnsw"] = ef_search


def _has_registry(session: "Session") -> bool:
    return session.execute(text("SELECT to_regclass(:t)"), {"t": REGISTRY}).scalar() is not None


def _registered(session: "Session", encoder: str, dim: int) -> str | None:
    """The table of (encoder, dim) as this session's snapshot sees the registry."""
    if not _has_registry(session):
        return None
    return session.execute(text(f"SELECT table_name FROM {REGISTRY} WHERE encoder = :e "
                                "AND dim = :d AND table_name <> ''"),
                           {"e": encoder, "d": dim}).scalar()


def _row_count(session: "Session", name: str) -> int:
    """The planner's estimate of a table's rows (no scan), at least 1."""
    found = session.execute(text("SELECT reltuples FROM pg_class WHERE oid = CAST(:t AS regclass)"),
                            {"t": name}).scalar()
    return max(1, int(found or 0))


def _scored(rows: Iterable[Any]) -> list[tuple[int, float]]:
    """(item, cosine) best first from (item, cosine distance) rows; NaN distances (zero
    vectors) dropped; re-sorted (an iterative scan may return them slightly out of order)."""
    out = [(int(i), 1.0 - float(d)) for i, d in rows if d is not None and d == d]
    out.sort(key=lambda t: (-t[1], t[0]))
    return out
