"""In-process search latency on the H&M sample (issue 13, part 5): the 87 queries of the
development set (tests/data/hm_queries_*.jsonl), each embedded afresh (the query-vector
cache is emptied before every request), with semantic facet matching off, on, and on with
the trained intent model when the database has one (``polyrec train-intent``).

Rounds alternate the configurations so machine load hits them alike; p50/p90/p99 over all
requests of all rounds, and each round's p50 (the spread). Prints a table and writes
benchmarks/results/search_hm.json. Usage:
    .venv/bin/python benchmarks/search_hm.py --db HM.db [--rounds 3] [--threads N]
(HM.db: the H&M sample ingested and BERT-encoded, as tests/conftest.py hm_bert_db builds it)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from polyrec import Engine
from polyrec.retrieve.search import searcher
from polyrec.retrieve.search_eval import load_queries

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "search_hm.json"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's, the machine's cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    queries = [q.query for part in ("tune", "heldout")
               for q in load_queries(ROOT / "tests" / "data" / f"hm_queries_{part}.jsonl")]
    eng = Engine(args.db, device="cpu", entrypoints=False, progress=False)
    srch = searcher(eng)
    configs = {"semantic off": {"semantic": False, "intent_model": False},
               "semantic on": {"semantic": True, "intent_model": False}}
    start = time.perf_counter()
    eng.search("black dress", 10)  # load the encoder, snapshots, value embeddings
    first = time.perf_counter() - start
    with eng.store.snapshot() as s:
        space = srch.space(s, "bert")
    has_model = space is not None and srch.intent_model(space) is not None
    if has_model:
        configs["semantic + intent model"] = {"semantic": True, "intent_model": True}
    times: dict[str, list[float]] = {c: [] for c in configs}
    rounds: dict[str, list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for name, opts in configs.items():
            this = []
            for q in queries:
                srch._query_cache.clear()
                t = time.perf_counter()
                eng.search(q, 10, **opts)
                this.append((time.perf_counter() - t) * 1000)
            times[name] += this
            rounds[name].append(statistics.median(this))
    rows = [{"config": n, "requests": len(times[n]), "p50_ms": round(pct(times[n], 0.5), 1),
             "p90_ms": round(pct(times[n], 0.9), 1), "p99_ms": round(pct(times[n], 0.99), 1),
             "round_p50_ms": [round(x, 1) for x in rounds[n]]} for n in configs]
    print(f"{'config':<26} {'requests':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}  round p50s")
    for r in rows:
        print(f"{r['config']:<26} {r['requests']:>8} {r['p50_ms']:>8} {r['p90_ms']:>8} "
              f"{r['p99_ms']:>8}  {r['round_p50_ms']}")
    print(f"first search (loads encoder, snapshots, value embeddings): {first:.1f} s")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = {"rows": rows, "first_search_s": round(first, 2), "queries": len(queries),
           "rounds": args.rounds, "intent_model": has_model, "torch_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "loadavg_at_end": load, "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} (load average at the end: {load})")


if __name__ == "__main__":
    main()
