"""Batch recommendations: users/s of ``Engine.recommend_many`` against ``Engine.recommend``
called once per user, in the same run, on MovieLens-100k.

For each pipeline (the default ``hybrid`` and ``ease``), on a copy of a database with
ml-100k ingested and encoded (``make demo`` makes one; its live default pipeline is used
as it is when it has one, else the pipeline is trained): one warm-up request, then
``--repeat`` rounds alternating the two ways over the same users (every stored user by
default), k = ``--k``, seen items excluded. Each round also checks that both ways gave
the same lists. Prints a table (median users/s and the spread over the rounds, and the
ratio batch / per user) and writes benchmarks/results/batch_recommend.json.

Usage:
    .venv/bin/python benchmarks/batch_recommend.py --db demo.db [--users N] [--k 20]
        [--repeat 3] [--batch-size 256] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: (label, ranker for Engine.train or None for the default, options)
PIPELINES = [("default (hybrid)", None, {}), ("ease", "ease", {"l2": 500.0})]


def measure(eng: Any, users: list[str], k: int, repeat: int, batch_size: int) -> dict[str, Any]:
    """users/s of recommend per user and of recommend_many, alternated ``repeat`` times,
    and how many users got different lists."""
    eng.recommend(users[0], k)  # warm-up: the pipeline and the data snapshot loaded
    list(eng.recommend_many(users[:batch_size], k, batch_size=batch_size))
    rates: dict[str, list[float]] = {"per_user": [], "batch": []}
    different = 0
    for _ in range(repeat):
        start = time.perf_counter()
        single = {u: [r.item for r in eng.recommend(u, k)] for u in users}
        rates["per_user"].append(len(users) / (time.perf_counter() - start))
        start = time.perf_counter()
        many = {u: [r.item for r in recs]
                for u, recs in eng.recommend_many(users, k, batch_size=batch_size)}
        rates["batch"].append(len(users) / (time.perf_counter() - start))
        different = max(different, sum(single[u] != many[u] for u in users))
    med = {way: statistics.median(r) for way, r in rates.items()}
    return {"users": len(users), "k": k, "batch_size": batch_size,
            "users_per_s": {way: [round(x, 1) for x in r] for way, r in rates.items()},
            "median_users_per_s": {way: round(v, 1) for way, v in med.items()},
            "ratio_batch_per_user": round(med["batch"] / med["per_user"], 2),
            "users_with_different_lists": different}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True,
                        help="A database with ml-100k ingested and encoded (make demo).")
    parser.add_argument("--users", type=int, default=None,
                        help="The first N stored users (default: all).")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: one core).")
    args = parser.parse_args()
    import torch

    from polyrec import Engine
    torch.set_num_threads(max(1, args.threads))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        shutil.copyfile(args.db, db)
        for label, ranker, options in PIPELINES:
            with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
                live = next((m for m in eng.models() if m.get("live")), None)
                trained = None
                if ranker is not None or live is None or live["ranker"] != "hybrid":
                    start = time.perf_counter()
                    eng.train(ranker, options=options, force=True)
                    trained = round(time.perf_counter() - start, 1)
                users = [u for u, _ in eng.recommend_many(None, 1, batch_size=4096)]
                users = users[:args.users] if args.users else users
                result = measure(eng, users, args.k, args.repeat, args.batch_size)
            rows.append({"pipeline": label, "trained_s": trained, **result})
            print(f"{label}: {result['median_users_per_s']}", flush=True)
    print(f"\nBatch recommendations on ml-100k: {rows[0]['users']} users, k={args.k}, "
          f"batch {args.batch_size}, {args.threads} torch thread(s), {args.repeat} rounds")
    print(f"{'pipeline':<18}{'per user (u/s)':>18}{'batch (u/s)':>18}{'ratio':>8}{'differ':>8}")
    for r in rows:
        spread = {w: f"{statistics.median(v):.0f} [{min(v):.0f}-{max(v):.0f}]"
                  for w, v in r["users_per_s"].items()}
        print(f"{r['pipeline']:<18}{spread['per_user']:>18}{spread['batch']:>18}"
              f"{r['ratio_batch_per_user']:>7.1f}x{r['users_with_different_lists']:>8}")
    out = {"benchmark": "batch_recommend", "dataset": "ml-100k", "threads": args.threads,
           "rows": rows, "machine": platform.platform(), "python": platform.python_version(),
           "torch": torch.__version__}
    path = ROOT / "benchmarks" / "results" / "batch_recommend.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
