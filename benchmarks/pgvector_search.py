"""Dense search on PostgreSQL: pgvector (polyrec.store.pgvector) against the in-process
exact search over the same stored vectors (issue 15).

A throwaway PostgreSQL server (polyrec.store.pg_server.LocalPostgres, pgvector 0.8)
gets a synthetic catalogue of ``--items`` items in ``--clusters`` clusters: each item's
stored vector (float16, as ``polyrec encode`` stores them) is its cluster's centre plus
noise, and its attribute ``group`` (one of 10) makes the filters. Queries are items'
vectors with fresh noise added. Measured, in alternating rounds on one Engine:

- ``build``: creating the pgvector table (copy of the stored vectors by the trigger's
  decoder, HNSW index build) and, in process, loading the matrix from the database;
- ``inprocess`` / ``pgvector``: the dense top-k (``VectorSpace.search`` on the loaded
  matrix; ``PgVectors.search`` inside a read snapshot), no filter and a filter allowing
  10 % of the items (pgvector: iterative index scan) and 0.5 % (exact scan of the
  allowed rows), p50/p95 per round and recall@k against the exact answer;
- ``similar``: ``Engine.similar`` (one encoder) warm, and the first call of a fresh
  Engine (in process: includes loading the vectors);
- ``write``: re-encoding ``--writes`` items (save_vectors) with and without a pgvector
  table (the trigger's cost per written vector).

Prints a table and writes benchmarks/results/pgvector_search.json. Usage:
    .venv/bin/python benchmarks/pgvector_search.py [--items 100000] [--dim 384]
        [--queries 100] [--rounds 3] [--k 10] [--ef-search 100] [--threads 1]
        [--exact-below N] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pgvector_search.json"
ENCODER = "bench"


def build_catalogue(url: str, n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Items and their float16 vectors written straight to the store; returns the vectors."""
    from polyrec import Engine
    from polyrec.store.models import Item
    from polyrec.store.vectors import save_vectors
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    assign = rng.integers(0, clusters, n)
    vectors = centres[assign] + 0.8 * rng.standard_normal((n, dim)).astype(np.float32)
    with Engine(url, device="cpu", entrypoints=False, progress=False) as eng:
        for start in range(0, n, 10_000):
            stop = min(n, start + 10_000)
            with eng.store.session() as s:
                s.execute(Item.__table__.insert(), [
                    {"external_id": f"i{k}", "title": f"item {k}",
                     "attributes": {"group": f"g{k % 10}", "rare": "yes" if k % 200 == 0 else "no"},
                     "created_at": 0.0, "updated_at": 0.0} for k in range(start, stop)])
                ids = [r[0] for r in s.execute(Item.__table__.select().with_only_columns(
                    Item.id).where(Item.id > start).where(Item.id <= stop).order_by(Item.id))]
                save_vectors(s, ENCODER, "bench-v1", [(i, "h") for i in ids],
                             torch.from_numpy(vectors[start:stop]))
    return vectors


def percentiles(ms: list[float]) -> dict[str, float]:
    arr = np.asarray(ms)
    return {"p50": round(float(np.percentile(arr, 50)), 3), "p95": round(float(np.percentile(arr, 95)), 3),
            "mean": round(float(arr.mean()), 3)}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=500)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--pool", type=int, default=200, help="also measured: the search's candidate pool")
    ap.add_argument("--ef-search", type=int, default=100)
    ap.add_argument("--exact-below", type=int, default=None,
                    help="PgVectors.exact_below: filters allowing at most this many items are scanned exactly")
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from polyrec import Engine
    from polyrec.retrieve.search import VectorSpace
    from polyrec.store import pgvector
    from polyrec.store.pg_server import LocalPostgres
    from polyrec.store.vectors import save_vectors

    out: dict[str, Any] = {"items": args.items, "dim": args.dim, "clusters": args.clusters,
                           "queries": args.queries, "rounds": args.rounds, "k": args.k,
                           "pool": args.pool, "ef_search": args.ef_search, "threads": args.threads,
                           "load_before": os.getloadavg(), "python": sys.version.split()[0],
                           "machine": platform.machine(), "cpus": os.cpu_count()}
    with LocalPostgres(settings={"shared_buffers": "256MB"}) as pg:
        url = pg.create_database("bench")
        t = time.perf_counter()
        vectors = build_catalogue(url, args.items, args.dim, args.clusters, args.seed)
        out["write_catalogue_s"] = round(time.perf_counter() - t, 1)
        print(f"catalogue: {args.items:,} items x {args.dim} written in {out['write_catalogue_s']} s",
              flush=True)
        rng = np.random.default_rng(args.seed + 1)
        picks = rng.integers(0, args.items, args.queries)
        queries = torch.from_numpy(vectors[picks] + 0.8 * rng.standard_normal(
            (args.queries, args.dim)).astype(np.float32))

        with Engine(url, device="cpu", entrypoints=False, progress=False) as eng:
            srch = eng.services.searcher()
            pgv = srch.pgvector
            assert pgv is not None and pgv.available(), "no pgvector on this server"
            pgv.ef_search = args.ef_search
            if args.exact_below is not None:
                pgv.exact_below = args.exact_below
            out["exact_below"] = pgv.exact_below
            # write cost without a pgvector table (trigger not installed yet)
            ids = [r.id for r in eng.items(list(range(1, args.writes + 1)))]
            block = torch.from_numpy(vectors[:args.writes])
            with eng.store.session() as s:
                _, out["write_without_table_ms"] = timed(lambda: save_vectors(
                    s, ENCODER, "bench-v1", [(i, "h2") for i in ids], block))
            t = time.perf_counter()
            table = pgv.ensure(ENCODER, args.dim)
            out["pgvector_build_s"] = round(time.perf_counter() - t, 1)
            with eng.store.session() as s:
                _, out["write_with_table_ms"] = timed(lambda: save_vectors(
                    s, ENCODER, "bench-v1", [(i, "h3") for i in ids], block))
            print(f"pgvector table {table}: built in {out['pgvector_build_s']} s; writing "
                  f"{args.writes:,} vectors {out['write_without_table_ms']:.0f} ms without, "
                  f"{out['write_with_table_ms']:.0f} ms with the table", flush=True)
            with eng.store.snapshot() as s:
                state = srch.state(s)
                space, load_ms = timed(lambda: srch.space(s, ENCODER, state))
                snap = srch.catalog(s, state)
                out["inprocess_load_ms"] = round(load_ms)
                out["table_mb"] = int(s.execute(pgv_size_sql(table)).scalar())
                plan = [r[0] for r in s.execute(explain_sql(table), {
                    "q": pgvector.vector_literal(queries[0])})]
            out["plan"] = plan
            print(f"in-process: matrix loaded in {load_ms:.0f} ms; pgvector table + index "
                  f"{out['table_mb']} MB; plan: {plan[1].strip() if len(plan) > 1 else plan}",
                  flush=True)
            exact = VectorSpace.of(ENCODER, (), space.item_ids, space.matrix, normalised=True)
            filters = {"none": None, "10%": snap.allowed({"group": "g3"}),
                       "0.5%": snap.allowed({"rare": "yes"})}
            rows: dict[str, Any] = {}
            for fname, allowed in filters.items():
                for k in (args.k, args.pool):
                    truth = [[i for i, _ in exact.top(exact.scores(q), k, allowed)] for q in queries]
                    per_round: dict[str, list[dict[str, float]]] = {"inprocess": [], "pgvector": []}
                    recall: dict[str, float] = {}
                    for _ in range(args.rounds):
                        for path in ("inprocess", "pgvector"):
                            times, got = [], []
                            with eng.store.snapshot() as s:
                                for q in queries:
                                    if path == "inprocess":
                                        res, ms = timed(lambda: space.search(q, k, allowed))
                                    else:
                                        res, ms = timed(lambda: pgv.search(s, ENCODER, args.dim, q, k, allowed))
                                    times.append(ms)
                                    got.append([i for i, _ in res])
                            per_round[path].append(percentiles(times))
                            recall[path] = round(float(np.mean([len(set(g) & set(w)) / max(1, len(w))
                                                                for g, w in zip(got, truth)])), 4)
                    key = f"filter={fname} k={k}"
                    rows[key] = {p: {"rounds": per_round[p], "recall": recall[p],
                                     "p50_median": statistics.median(r["p50"] for r in per_round[p])}
                                 for p in per_round}
                    a, b = rows[key]["inprocess"], rows[key]["pgvector"]
                    print(f"{key:<22} in-process p50 {a['p50_median']:7.2f} ms "
                          f"(rounds {[r['p50'] for r in a['rounds']]}) | pgvector p50 "
                          f"{b['p50_median']:7.2f} ms (rounds {[r['p50'] for r in b['rounds']]}, "
                          f"p95 {[r['p95'] for r in b['rounds']]}) recall@{k} {b['recall']:.3f} | "
                          f"ratio {a['p50_median'] / max(b['p50_median'], 1e-9):.1f}x", flush=True)
            out["search"] = rows
            item = "i12345" if args.items > 12345 else "i1"
            warm = {}
            for path in ("pgvector", "inprocess"):
                if path == "inprocess":
                    os.environ[pgvector.ENV] = "off"
                with Engine(url, device="cpu", entrypoints=False, progress=False) as fresh:
                    _, first = timed(lambda: fresh.similar(item, args.k, basis=ENCODER))
                    times = [timed(lambda: fresh.similar(item, args.k, basis=ENCODER))[1]
                             for _ in range(20)]
                warm[path] = {"first_ms": round(first, 1), **percentiles(times)}
                os.environ.pop(pgvector.ENV, None)
            out["similar"] = warm
            print(f"similar: pgvector first {warm['pgvector']['first_ms']:.0f} ms, warm p50 "
                  f"{warm['pgvector']['p50']:.1f} ms | in-process first {warm['inprocess']['first_ms']:.0f}"
                  f" ms, warm p50 {warm['inprocess']['p50']:.1f} ms", flush=True)
    out["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"load {out['load_before']} -> {out['load_after']}; wrote {args.out}")


def pgv_size_sql(table: str) -> Any:
    from sqlalchemy import text
    return text(f"SELECT round(pg_total_relation_size('{table}') / 1048576.0)")


def explain_sql(table: str) -> Any:
    from sqlalchemy import text
    return text(f"EXPLAIN SELECT item_id FROM {table} ORDER BY embedding <=> CAST(:q AS halfvec) LIMIT 10")


if __name__ == "__main__":
    main()
