"""Engine.recommend at catalogue scale (issue 10, part 7): a trained two-tower pipeline
over a synthetic shop of ``--items`` items (default 1,000,000), served by the real
Recommender, with full scoring against candidate retrieval through the vector index
(polyrec.rank.retrieval: FAISS IVF by default, HNSW on request), in one run.

The shop: ``--items`` items in ``--clusters`` taste clusters (each item's stored "bert"
vector is its cluster's centre plus noise, so content carries the taste), ``--users``
users who each like one or two clusters, and ``--interactions`` purchases drawn with
power-law (Zipf) item popularity inside the liked clusters. Everything is written to
the store directly (bulk inserts; ingestion speed is benchmarks/ingest.py's subject),
then ``Engine.train("two_tower", ...)`` fits the pipeline as a user would.

Measured, on the same users, in one process with the paths interleaved (each user's
request runs through every path in turn, in rotated order, after 5 warm-up users), so
that all paths share whatever load the machine has:
- ``full``: ``Engine.recommend`` with index backend "exact" (the ranker scores every
  item: ``score_users``), p50/p99 over ``--requests`` single-user requests;
- each of ``--variants`` (default ``ivf``, the Recommender's settings): the same
  requests through an index over the ranker's retrieval keys (built once and persisted
  beside the database; ``open s``: loading it, ``build s``: building it when no file was
  there), p50/p99, and recall@10 of its answers against ``full``'s. A variant is
  ``kind[:field=value...]`` over ``Recommender.index_settings``, e.g. ``ivf:nprobe=125``
  or ``hnsw:ef_search=2048``; ``exact`` is the same candidate path with an exact top-k
  over the keys (``torch.topk(keys @ query)``, no index);
- ``first request``: a fresh process (interpreter, imports, Engine, data snapshot, model,
  index loaded from disk, one recommendation), ``--fresh-runs`` times.

Prints a table and writes benchmarks/results/recommend_scale.json. Usage:
    .venv/bin/python benchmarks/recommend_scale.py [--items 1000000] [--users 5000]
        [--interactions 100000] [--requests 200] [--workdir DIR (keeps the database)]
        [--threshold N (index from N items; for small trial runs)] [--threads 1]
        [--variants ivf,hnsw:ef_search=2048] [--fresh-only]
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
def timed_training(db: Path) -> dict[str, Any]:
    """``Engine.train('two_tower')`` in the shop, with the seconds between its progress
    lines (reading, fitting, holdout metrics, each gate step)."""
    import logging

    from polyrec import Engine
    marks: list[tuple[float, str]] = []

    class Marks(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            marks.append((time.perf_counter(), record.getMessage()))

    handler = Marks()
    progress_log = logging.getLogger("polyrec.progress")
    progress_log.addHandler(handler)
    progress_log.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        with Engine(db, device="cpu", entrypoints=False, progress=True) as eng:
            report = eng.train("two_tower", options={**TWO_TOWER, "progress": False},
                               force=True, seed=0)
    finally:
        progress_log.removeHandler(handler)
    end = time.perf_counter()
    stages = [{"stage": text.split(";")[0][:80], "s": round(nxt - at, 1)}
              for (at, text), (nxt, _) in zip(marks, marks[1:] + [(end, "")])]
    out = {"total_s": round(end - start, 1), "fit_s": round(report.seconds, 1),
           "positives_per_s": round(float(report.info.get("throughput", 0.0)), 1),
           "stages": stages, "load_average": os.getloadavg()}
    print(f"Engine.train('two_tower'): {out['total_s']} s (fit {out['fit_s']} s, "
          f"{out['positives_per_s']} positives/s), load {out['load_average']}")
    for row in stages:
        print(f"  {row['s']:>7.1f} s  {row['stage']}")
    # the fresh processes below should find the new version's index saved, as a server
    # restarted after training does (the gate's recommendations started building it)
    start = time.perf_counter()
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        eng.recommend("u1", K)
        retrieval = eng.services.recommender()._retrieval()
        if retrieval is not None:
            retrieval.slot.wait()
    out["index_ready_s"] = round(time.perf_counter() - start, 1)
    print(f"  {out['index_ready_s']:>7.1f} s  until the new version's index was saved")
    return out


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
def variant(spec: str) -> dict[str, Any]:
    """IndexSettings changes of a ``kind[:field=value...]`` variant."""
    kind, *fields = spec.split(":")
    changes: dict[str, Any] = {"backend": "auto", "kind": kind}
    for field in fields:
        key, _, value = field.partition("=")
        changes[key] = int(value)
    return changes


def serve(db: Path, specs: list[str], users: list[str], threshold: int | None,
          warmup: int = 5) -> list[dict[str, Any]]:
    """Latency of Engine.recommend for ``users`` with full scoring and each variant of
    ``specs``, in one process and interleaved: each user's requests run through every
    path in turn (rotated order), so the paths share the machine's load. Answers too."""
    from polyrec import Engine
    from dataclasses import replace
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        start = time.perf_counter()
        rec = eng.services.recommender()
        base = replace(rec.index_settings, **({"threshold": threshold} if threshold else {}))
        rec.index_settings = replace(base, backend="exact")
        eng.recommend(users[0], K)  # data snapshot, model
        rows = [{"variant": "full", "backend": "exact", "index": "full scoring",
                 "first_request_s": round(time.perf_counter() - start, 1),
                 "index_build_s": 0.0, "retrieval": None}]
        snap = rec.snapshot()
        for spec in specs:  # each path's retrieval: item side and index, loaded or built
            rec.index_settings = replace(base, **variant("ivf" if spec == "exact" else spec))
            snap.cache.pop("retrieval", None)
            t = time.perf_counter()
            retrieval = rec._retrieval()
            if spec == "exact" and retrieval is not None:  # the keys, searched exactly
                from polyrec.rank.retrieval import Retrieval, _checked_keys
                from polyrec.rank.vector_index import IndexSlot
                items, matrix = _checked_keys(rec.ranker.retrieval_keys(snap.data),
                                              snap.data.n_items)
                retrieval = Retrieval(rec.ranker, items, IndexSlot(
                    matrix, name="exact", settings=replace(base, backend="exact")))
            opened, waited = time.perf_counter() - t, 0.0
            if retrieval is not None and not retrieval.slot.ready():
                print(f"  waiting for the {rec.index_settings.kind.upper()} index over "
                      f"{retrieval.size:,} items ...", flush=True)
                retrieval.slot.wait()
                waited = time.perf_counter() - t - opened
            current = retrieval.slot.current if retrieval else None
            found = {"ef_search": getattr(current, "ef_search", None),
                     "nprobe": getattr(current, "nprobe", None),
                     "nlist": getattr(getattr(current, "index", None), "nlist", None)}
            rows.append({"variant": spec, "backend": "auto",
                         "index": retrieval.slot.kind if retrieval else "full scoring",
                         **{k: v for k, v in found.items() if v is not None},
                         "first_request_s": round(opened, 1), "index_build_s": round(waited, 1),
                         "retrieval": retrieval})
        latencies: list[list[float]] = [[] for _ in rows]
        answers: list[list[list[str]]] = [[] for _ in rows]
        swapped = 0
        for j, user in enumerate(users[:warmup] + users):
            for n in range(len(rows)):
                r = (j + n) % len(rows)
                snap = rec.snapshot()
                snap.cache["retrieval"] = (rec.ranker, rows[r]["retrieval"])
                t = time.perf_counter()
                got = eng.recommend(user, K)
                elapsed = (time.perf_counter() - t) * 1000
                swapped += rec.snapshot() is not snap  # a refreshed snapshot: not this path
                if j >= warmup:
                    latencies[r].append(elapsed)
                    answers[r].append([x.item for x in got])
        if swapped:
            print(f"  warning: {swapped} requests ran on a refreshed snapshot", flush=True)
    for row, lat, ans in zip(rows, latencies, answers):
        del row["retrieval"]
        row.update({"p50_ms": round(percentile(lat, 50), 1),
                    "p99_ms": round(percentile(lat, 99), 1),
                    "mean_ms": round(statistics.fmean(lat), 1), "answers": ans})
    return rows


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
    ap.add_argument("--variants", default="ivf",
                    help="indexes compared with full scoring, comma-separated "
                         "kind[:field=value...] over the Recommender's index settings "
                         "(default: ivf; e.g. ivf:nprobe=125,hnsw:ef_search=2048)")
    ap.add_argument("--fresh-only", action="store_true",
                    help="only the fresh processes' first request (no in-process runs)")
    ap.add_argument("--threshold", type=int, default=None,
                    help="items from which the index is used (default: IndexSettings')")
    ap.add_argument("--retrain", action="store_true",
                    help="train the two-tower again in the existing shop first, timing "
                         "each stage of Engine.train (fit, holdout metrics, gate)")
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
    elif args.retrain:
        result["retrain"] = timed_training(db)
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
    rows = serve(db, args.variants.split(","), users, args.threshold)
    full = rows[0]
    for row in rows:
        row["recall_at_10_vs_full"] = round(statistics.fmean(
            len(set(a) & set(b)) / max(1, len(b))
            for a, b in zip(row["answers"], full["answers"])), 4)
        row["p50_ratio_full_over_this"] = round(full["p50_ms"] / row["p50_ms"], 2)
    rows = [{k: v for k, v in r.items() if k != "answers"} for r in rows]
    result.update({"rows": rows, "fresh_process": fresh,
                   "load_average_after": os.getloadavg()})
    print(f"\nEngine.recommend, top-{K}, {args.items:,} items, {args.requests} requests")
    print(f"{'path':<26}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'recall@10':>11}"
          f"{'open s':>9}{'build s':>9}")
    for r in rows:
        print(f"{r['variant']:<26}{r['p50_ms']:>9}{r['p99_ms']:>9}{r['mean_ms']:>9}"
              f"{r['recall_at_10_vs_full']:>11}{r['first_request_s']:>9}{r['index_build_s']:>9}")
    print(f"load average before / after: {result['machine']['load_average']} / "
          f"{result['load_average_after']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
