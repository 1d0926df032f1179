"""Engine.recommend at catalogue scale (issue 10, part 7): a trained two-tower pipeline
over a synthetic shop of ``--items`` items (default 1,000,000), served by the real
Recommender, with full scoring against candidate retrieval through the HNSW index
(polyrec.rank.retrieval), in one run.

The shop: ``--items`` items in ``--clusters`` taste clusters (each item's stored "bert"
vector is its cluster's centre plus noise, so content carries the taste), ``--users``
users who each like one or two clusters, and ``--interactions`` purchases drawn with
power-law (Zipf) item popularity inside the liked clusters. Everything is written to
the store directly (bulk inserts; ingestion speed is benchmarks/ingest.py's subject),
then ``Engine.train("two_tower", ...)`` fits the pipeline as a user would.

Measured, on the same users:
- ``full``: ``Engine.recommend`` with index backend "exact" (the ranker scores every
  item: ``score_users``), p50/p99 over ``--requests`` single-user requests;
- ``hnsw``: the same requests with the default index settings (HNSW over the ranker's
  retrieval keys, built once and persisted beside the database), p50/p99, and recall@10
  of its answers against ``full``'s;
- ``first request``: a fresh process (interpreter, imports, Engine, data snapshot, model,
  index loaded from disk, one recommendation), ``--fresh-runs`` times.

Prints a table and writes benchmarks/results/recommend_scale.json. Usage:
    .venv/bin/python benchmarks/recommend_scale.py [--items 1000000] [--users 5000]
        [--interactions 100000] [--requests 200] [--workdir DIR (keeps the database)]
        [--threshold N (index from N items; for small trial runs)] [--threads 1]
        [--fresh-only]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "recommend_scale.json"
K = 10
TWO_TOWER = {"dim": 64, "epochs": 1, "batch_size": 4096, "n_random": 2048, "validation": False,
             "progress": True}

FRESH = r"""
import sys, time
start = time.perf_counter()
from polyrec import Engine
eng = Engine(sys.argv[1], device="cpu", entrypoints=False, progress=False)
opened = time.perf_counter()
recs = eng.recommend(sys.argv[2], 10)
rec = eng.services.recommender()
kind = getattr(getattr(rec._retrieval(), "slot", None), "kind", "full")
print(round(opened - start, 2), round(time.perf_counter() - start, 2), kind, len(recs))
"""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


# -- the synthetic shop --------------------------------------------------------------------
def build_shop(db: Path, n_items: int, n_users: int, n_inter: int, clusters: int,
               seed: int = 0) -> dict[str, Any]:
    """Write the shop into a new store at ``db`` (see the module docstring)."""
    from polyrec import Engine
    from polyrec.encode.pipeline import content_hash
    from polyrec.store.catalog import interaction_key
    from polyrec.store.models import Interaction, Item, ItemVector, User
    from polyrec.store.sqlite import checkpoint
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        enc = eng.encoder("bert")
        dim, fingerprint = enc.dim, enc.fingerprint()
        centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        cluster_of = rng.integers(clusters, size=n_items)
        now, chunk = time.time(), 50_000
        for lo in range(0, n_items, chunk):
            hi = min(n_items, lo + chunk)
            vecs = centres[cluster_of[lo:hi]] + 0.8 * rng.standard_normal((hi - lo, dim),
                                                                           dtype=np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            vecs = vecs.astype(np.float16)
            with eng.store.session() as s:
                s.execute(Item.__table__.insert(), [
                    {"id": i + 1, "external_id": f"i{i + 1}", "title": f"item {i + 1}",
                     "text": None, "image": None,
                     "attributes": {"cluster": f"c{cluster_of[i]}", "shelf": f"s{i % 7}"},
                     "created_at": now, "updated_at": now} for i in range(lo, hi)])
                s.execute(ItemVector.__table__.insert(), [
                    {"item_id": i + 1, "encoder": "bert", "fingerprint": fingerprint,
                     "content_hash": content_hash(f"shop:{i + 1}"), "dtype": "float16",
                     "dim": dim, "vector": vecs[i - lo].tobytes(), "created_at": now}
                    for i in range(lo, hi)])
            print(f"  items {hi:,} / {n_items:,}", flush=True)
        members = [np.flatnonzero(cluster_of == c) for c in range(clusters)]
        for m in members:  # popularity inside a cluster: Zipf over a random order
            rng.shuffle(m)
        with eng.store.session() as s:
            s.execute(User.__table__.insert(), [
                {"id": u + 1, "external_id": f"u{u + 1}", "attributes": {}, "created_at": now,
                 "updated_at": now} for u in range(n_users)])
        likes = rng.integers(clusters, size=(n_users, 2))
        users = rng.integers(n_users, size=n_inter)
        pick = np.where(rng.random(n_inter) < 0.7, likes[users, 0], likes[users, 1])
        rank = np.minimum(rng.zipf(1.3, size=n_inter) - 1, 10**9)
        rows, seen = [], set()
        for j, (u, c, r) in enumerate(zip(users.tolist(), pick.tolist(), rank.tolist())):
            group = members[c]
            item = int(group[r % len(group)]) + 1
            if (u, item) in seen:
                continue
            seen.add((u, item))
            ts = now - n_inter + j
            rows.append({"user_id": u + 1, "item_id": item, "kind": "purchase", "value": None,
                         "ts": ts, "context": None,
                         "dedup_key": interaction_key(f"u{u + 1}", f"i{item}", "purchase", ts,
                                                      None)})
            if len(rows) == 100_000:
                with eng.store.session() as s:
                    s.execute(Interaction.__table__.insert(), rows)
                rows = []
        if rows:
            with eng.store.session() as s:
                s.execute(Interaction.__table__.insert(), rows)
        stored = len(seen)
    checkpoint(db)
    return {"build_s": round(time.perf_counter() - start, 1), "interactions": stored}


# -- measuring -----------------------------------------------------------------------------
def serve(db: Path, backend: str, users: list[str], threshold: int | None,
          ef_search: int | None) -> dict[str, Any]:
    """Latency of Engine.recommend for ``users`` with the index ``backend``; answers too."""
    from polyrec import Engine
    from dataclasses import replace
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        start = time.perf_counter()
        rec = eng.services.recommender()
        changes: dict[str, Any] = {"backend": backend}  # the rest: the Recommender's defaults
        if threshold:
            changes["threshold"] = threshold
        if ef_search:
            changes["ef_search"] = ef_search
        rec.index_settings = replace(rec.index_settings, **changes)
        eng.recommend(users[0], K)  # data snapshot, model, item side, index
        retrieval = rec._retrieval()
        waited = 0.0
        if retrieval is not None and not retrieval.slot.ready():
            t = time.perf_counter()
            print(f"  waiting for the HNSW index over {retrieval.size:,} items ...", flush=True)
            retrieval.slot.wait()
            waited = time.perf_counter() - t
        warm_s = time.perf_counter() - start
        answers, latencies = [], []
        for user in users:
            t = time.perf_counter()
            got = eng.recommend(user, K)
            latencies.append((time.perf_counter() - t) * 1000)
            answers.append([r.item for r in got])
    return {"backend": backend, "index": retrieval.slot.kind if retrieval else "full scoring",
            "ef_search": rec.index_settings.ef_search if retrieval else None,
            "p50_ms": round(percentile(latencies, 50), 1),
            "p99_ms": round(percentile(latencies, 99), 1),
            "mean_ms": round(statistics.fmean(latencies), 1),
            "first_request_s": round(warm_s - waited, 1), "index_build_s": round(waited, 1),
            "answers": answers}


def fresh_first_request(db: Path, user: str, runs: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", FRESH, str(db), user], check=True,
                              capture_output=True, text=True)
        opened, inner, kind, n = done.stdout.split()[-4:]
        out.append({"process_s": round(time.perf_counter() - start, 2), "engine_s": float(opened),
                    "inner_s": float(inner), "index": kind, "results": int(n)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=5_000)
    ap.add_argument("--interactions", type=int, default=100_000)
    ap.add_argument("--clusters", type=int, default=200)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--fresh-runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (polyrec serve's default: 1 per process)")
    ap.add_argument("--ef-search", type=int, default=None,
                    help="HNSW search breadth (default: the Recommender's)")
    ap.add_argument("--fresh-only", action="store_true",
                    help="only the fresh processes' first request (no in-process runs)")
    ap.add_argument("--threshold", type=int, default=None,
                    help="items from which the index is used (default: IndexSettings')")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the fresh processes too
    workdir = args.workdir or Path(__import__("tempfile").mkdtemp(prefix="polyrec-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / f"shop-{args.items}.db"
    result: dict[str, Any] = {"machine": {"platform": platform.platform(),
                                          "torch_threads": torch.get_num_threads(),
                                          "load_average": os.getloadavg()},
                              "settings": {k: v for k, v in vars(args).items()
                                           if k != "workdir"} | {"two_tower": TWO_TOWER}}
    from polyrec import Engine
    if not db.exists():
        print(f"building a shop of {args.items:,} items ...", flush=True)
        result["build"] = build_shop(db, args.items, args.users, args.interactions,
                                     args.clusters)
        with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
            t = time.perf_counter()
            report = eng.train("two_tower", options=TWO_TOWER, force=True, seed=0)
            result["train_s"] = round(time.perf_counter() - t, 1)
            print(f"  trained two_tower v{report.version} in {result['train_s']} s", flush=True)
    rng = np.random.default_rng(7)
    users = [f"u{u}" for u in rng.integers(1, args.users + 1, size=args.requests)]
    # fresh processes first: after the two in-process engines below (gigabytes) the page
    # cache no longer holds the store's files, which is not what a server restart sees
    fresh = fresh_first_request(db, users[0], args.fresh_runs)
    print("fresh process, first request (s):",
          ", ".join(f"{f['process_s']} (engine {f['engine_s']}, {f['index']})" for f in fresh),
          flush=True)
    if args.fresh_only:
        result["fresh_process"] = fresh
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        return
    full = serve(db, "exact", users, args.threshold, None)
    hnsw = serve(db, "auto", users, args.threshold, args.ef_search)
    recall = statistics.fmean(len(set(a) & set(b)) / max(1, len(b))
                              for a, b in zip(hnsw["answers"], full["answers"]))
    rows = [{k: v for k, v in r.items() if k != "answers"} for r in (full, hnsw)]
    result.update({"rows": rows, "recall_at_10_vs_full": round(recall, 4),
                   "p50_ratio_full_over_hnsw": round(full["p50_ms"] / hnsw["p50_ms"], 2),
                   "fresh_process": fresh})
    print(f"\nEngine.recommend, top-{K}, {args.items:,} items, {args.requests} requests")
    print(f"{'path':<22}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'first req s':>13}")
    for r in rows:
        print(f"{r['index']:<22}{r['p50_ms']:>9}{r['p99_ms']:>9}{r['mean_ms']:>9}"
              f"{r['first_request_s']:>13}")
    print(f"recall@10 of hnsw against full scoring: {recall:.4f}; "
          f"p50 full / hnsw: {result['p50_ratio_full_over_hnsw']}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
