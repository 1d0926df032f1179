"""The copy step of a pgvector table build (polyrec.store.pgvector): vectors/s of the
binary COPY (blobs decoded in the client) against decoding the blobs in SQL (the
functions the trigger uses, and what the build did before), in alternating rounds on
one throwaway PostgreSQL server (polyrec.store.pg_server.LocalPostgres, pgvector 0.8).

``--items`` items with a stored float16 vector of ``--dim`` values each (as ``polyrec
encode`` stores them); each round copies them all into a fresh halfvec table inside a
transaction that is rolled back (no HNSW index: that step is the same either way).

Prints a table and writes benchmarks/results/pgvector_copy.json. Usage:
    .venv/bin/python benchmarks/pgvector_copy.py [--items 50000] [--dim 384] [--rounds 2]
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

import numpy as np
import torch
from sqlalchemy import text

from polyrec import Engine
from polyrec.store import pgvector
from polyrec.store.pg_server import LocalPostgres
from polyrec.store.vectors import save_vectors

ROOT = Path(__file__).resolve().parents[1]


def sql_copy(s, name: str, encoder: str, dim: int) -> int:  # type: ignore[no-untyped-def]
    """The blobs decoded in SQL (polyrec_vector_values), in one INSERT ... SELECT."""
    return s.execute(text(
        f"INSERT INTO {name} (item_id, embedding) SELECT item_id, vals::halfvec FROM "
        "(SELECT item_id, polyrec_vector_values(vector, dtype) AS vals FROM item_vectors "
        "WHERE encoder = :e AND dim = :d) AS decoded WHERE polyrec_vector_ok(vals)"),
        {"e": encoder, "d": dim}).rowcount


def one_round(eng: Engine, how: str, dim: int) -> tuple[int, float]:
    """(rows copied, seconds) of one copy into a new table, rolled back after."""
    session = eng.store._sessions()
    try:
        session.execute(text(f"CREATE TABLE bench_copy (item_id integer PRIMARY KEY, "
                             f"embedding halfvec({dim}) NOT NULL)"))
        start = time.perf_counter()
        if how == "copy":
            rows = pgvector._copy_vectors(session, "bench_copy", "enc", dim, False)
        else:
            rows = sql_copy(session, "bench_copy", "enc", dim)
        return rows, time.perf_counter() - start
    finally:
        session.rollback()
        session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sql-items", type=int, default=None,
                        help="copy only this many items in the SQL rounds (default: all; "
                        "it runs at ~1k vectors/s)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "pgvector_copy.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results: dict[str, list[float]] = {"copy": [], "sql": []}
    with LocalPostgres() as pg:
        url = pg.create_database("copy")
        with Engine(url, device="cpu", entrypoints=False, progress=False) as eng:
            eng.add_items([{"external_id": f"i{n}"} for n in range(args.items)])
            ids = sorted(it.id for it in eng.items())
            for start in range(0, len(ids), 10_000):
                chunk = ids[start:start + 10_000]
                vecs = torch.from_numpy(rng.standard_normal((len(chunk), args.dim)).astype(np.float32))
                with eng.store.session() as s:
                    save_vectors(s, "enc", "fp", [(i, "h") for i in chunk], vecs)
            with eng.store.session() as s:  # the SQL decoder (the trigger's functions)
                s.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
                for statement in pgvector._SETUP[:4]:
                    s.execute(text(statement))
            for r in range(args.rounds):
                for how in ("copy", "sql"):
                    if how == "sql" and args.sql_items:
                        with eng.store.session() as s:  # fewer rows for the slow path
                            s.execute(text("UPDATE item_vectors SET encoder = 'rest' WHERE "
                                           "item_id > :top"), {"top": ids[args.sql_items - 1]})
                    rows, secs = one_round(eng, how, args.dim)
                    if how == "sql" and args.sql_items:
                        with eng.store.session() as s:
                            s.execute(text("UPDATE item_vectors SET encoder = 'enc' "
                                           "WHERE encoder = 'rest'"))
                    results[how].append(rows / secs)
                    print(f"round {r + 1} {how}: {rows:,} vectors in {secs:.1f}s = "
                          f"{rows / secs:,.0f}/s (load {os.getloadavg()[0]:.1f})", flush=True)
    summary = {how: {"vectors_per_s": [round(v) for v in vals],
                     "median": round(statistics.median(vals))} for how, vals in results.items()}
    print("how | vectors/s (per round) | median")
    for how, row in summary.items():
        print(f"{how} | {', '.join(f'{v:,}' for v in row['vectors_per_s'])} | {row['median']:,}")
    out = {"benchmark": "pgvector_copy", "items": args.items, "dim": args.dim,
           "rounds": args.rounds, "sql_items": args.sql_items, "results": summary,
           "command": " ".join(sys.argv), "machine": platform.platform(),
           "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
