"""Serving benchmark: search and recommend latency (p50/p99) and throughput, in-process and
over HTTP, with 1 and 8 concurrent clients; and exact top-k versus FAISS at 1M items.

Three parts, all measured in one run:

1. **MovieLens-100k**: a real store (ingested, BERT-encoded, trained when Engine.train
   exists). Search queries are distinct (movie titles and genre phrases) and the query
   embedding cache is emptied before every run, so each request embeds its query.
   Recommend asks for random known users.
2. **Synthetic catalogue** (``--items``, default 1,000,000): items with random titles and
   colour/type attributes, and random unit "bert" vectors stored with the real BERT
   encoder's fingerprint, so ``Engine.search`` runs its full path (BERT query embedding,
   exact dense top-k over every item, FTS5 BM25, query understanding, RRF) over a
   catalogue of that size. "recommend" there is the retrieval step of a recommender:
   top-k of a random user vector over all item vectors (``VectorSpace.top``).
3. **Exact vs FAISS**: top-k of random queries over the same normalised matrix with
   ``torch.topk(X @ q)`` and with ``faiss.IndexFlatIP`` (exact too), one query at a time
   and in batches of 64, agreement of the two answers, and the time ratio.

HTTP clients are threads with their own keep-alive httpx client against a uvicorn server
on 127.0.0.1 in the same process (the server's thread pool shares one Engine). Each run
is a fixed number of requests split over the clients; throughput = requests / wall time.

Prints tables and writes benchmarks/results/serve.json. Usage:
    .venv/bin/python benchmarks/serve.py [--items 1000000] [--requests 200]
        [--workdir DIR (keeps the built databases)] [--data ../shared/datasets]
        [--skip-ml100k] [--skip-synthetic] [--device auto] [--train-epochs N]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from polyrec.store.sqlite import checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results" / "serve.json"
K = 10

COLOURS = ["black", "white", "red", "blue", "green", "beige", "grey", "pink", "yellow", "brown",
           "navy", "olive", "orange", "purple", "cream", "khaki"]
TYPES = ["dress", "shirt", "jacket", "trousers", "skirt", "sweater", "coat", "scarf", "boots",
         "sneakers", "hoodie", "blouse", "shorts", "cardigan", "top", "jeans", "bag", "hat"]
WORDS = ["soft", "linen", "cotton", "wool", "slim", "relaxed", "summer", "winter", "classic",
         "striped", "printed", "knitted", "denim", "velvet", "silk", "padded", "cropped", "long",
         "short", "oversized", "fitted", "light", "warm", "casual", "party", "sport", "basic"]


# -- measuring ------------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, int(round(p / 100 * (len(ordered) - 1)))))
    return ordered[rank]


def run_load(call: Callable[[Any, Any], None], payloads: Sequence[Any], clients: int,
             make_client: Callable[[], Any] = lambda: None) -> dict[str, float]:
    """Send ``payloads`` through ``call(client, payload)`` from ``clients`` threads; each
    thread gets its share in order. Latency per request, throughput over the wall time."""
    shares = [payloads[i::clients] for i in range(clients)]
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(share: Sequence[Any]) -> None:
        client = make_client()
        mine = []
        try:
            for p in share:
                start = time.perf_counter()
                call(client, p)
                mine.append(time.perf_counter() - start)
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)
        finally:
            if hasattr(client, "close"):
                client.close()
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, shares))
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return {"requests": len(latencies), "clients": clients,
            "p50_ms": round(1000 * percentile(latencies, 50), 2),
            "p99_ms": round(1000 * percentile(latencies, 99), 2),
            "mean_ms": round(1000 * statistics.fmean(latencies), 2),
            "throughput_rps": round(len(latencies) / wall, 1)}


def http_client_factory(url: str) -> Callable[[], Any]:
    import httpx
    return lambda: httpx.Client(base_url=url, timeout=300)


def _post(path: str) -> Callable[[Any, Any], None]:
    def call(client: Any, body: Any) -> None:
        r = client.post(path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{path} -> {r.status_code}: {r.text[:200]}")
    return call


def bench_engine(eng: Any, name: str, queries: list[str], users: list[str] | None,
                 clients: Sequence[int], recommend_inprocess: Callable[[Any, Any], None] | None = None,
                 recommend_payloads: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """search (and recommend) in-process and over HTTP at each client count."""
    from polyrec.retrieve.search import searcher
    from polyrec.serve.app import create_app, recommend_or_popular, start_background
    srch = searcher(eng)
    srch.check_interval = 1.0  # as the server does: store signatures checked once a second
    rows: list[dict[str, Any]] = []
    eng.search(queries[0], K)  # load models and snapshots outside the timings
    if users:
        recommend_or_popular(eng, users[0], K)

    def search_call(_: Any, q: str) -> None:
        eng.search(q, K)

    def recommend_call(_: Any, u: str) -> None:
        recommend_or_popular(eng, u, K)

    with start_background(create_app(eng)) as server:
        make = http_client_factory(server.url)
        for n in clients:
            first = len(rows)
            srch._query_cache.clear()
            rows.append({"catalogue": name, "op": "search", "via": "in-process",
                         **run_load(search_call, queries, n)})
            srch._query_cache.clear()
            rows.append({"catalogue": name, "op": "search", "via": "http",
                         **run_load(_post("/search"), [{"query": q, "k": K} for q in queries],
                                    n, make)})
            if users:
                rows.append({"catalogue": name, "op": "recommend", "via": "in-process",
                             **run_load(recommend_call, users, n)})
                rows.append({"catalogue": name, "op": "recommend", "via": "http",
                             **run_load(_post("/recommend"), [{"user": u, "k": K} for u in users],
                                        n, make)})
            if recommend_inprocess is not None and recommend_payloads is not None:
                rows.append({"catalogue": name, "op": "recommend (retrieval)", "via": "in-process",
                             **run_load(recommend_inprocess, recommend_payloads, n)})
            print_rows(rows[first:])
    return rows


# -- MovieLens-100k --------------------------------------------------------------------------
def prepare_ml100k(db: Path, data: Path, device: str, epochs: int | None) -> dict[str, Any]:
    """ml-100k ingested, BERT-encoded and trained (the default pipeline; ``epochs`` caps
    the epochs of its rankers that take them)."""
    from polyrec import Engine
    info: dict[str, Any] = {}
    with Engine(db, device=device, entrypoints=False, progress=True) as eng:
        m = data / "ml-100k"
        eng.ingest(m / "ml-100k.item", "items")
        eng.ingest(m / "ml-100k.user", "users")
        eng.ingest(m / "ml-100k.inter", "interactions")
        eng.ingest(m / "ml-100k.kg", "kg", links=m / "ml-100k.link")
        start = time.perf_counter()
        eng.encode(["bert"])
        info["encode_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        eng.train(epochs=epochs)
        info["train_s"] = round(time.perf_counter() - start, 1)
        info["train_epochs"] = epochs
    checkpoint(db)
    return info


def ml100k_workload(eng: Any, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    items = eng.items()
    genres = sorted({g for v in items for g in (v.attributes.get("class") or [])})
    queries = []
    for v in rng.sample(items, n):
        title = (v.title or v.external_id).split(",")[0]
        queries.append(title if rng.random() < 0.5 else f"{rng.choice(genres).lower()} like {title}")
    queries = list(dict.fromkeys(queries))
    from sqlalchemy import select

    from polyrec.store.models import User
    with eng.store.session() as s:
        users = [u for (u,) in s.execute(select(User.external_id))]
    return queries, [rng.choice(users) for _ in range(n)]


# -- synthetic catalogue ------------------------------------------------------------------
def prepare_synthetic(db: Path, n_items: int, device: str, seed: int = 0) -> dict[str, Any]:
    """n_items with random titles/attributes and random unit BERT-space vectors (float16),
    stored with the real BERT encoder's fingerprint, so search runs its full path."""
    from polyrec import Engine
    from polyrec.encode.pipeline import content_hash
    from polyrec.store.models import Item, ItemVector
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {}
    start = time.perf_counter()
    with Engine(db, device=device, entrypoints=False, progress=False) as eng:
        enc = eng.encoder("bert")
        dim, fingerprint = enc.dim, enc.fingerprint()
        now = time.time()
        chunk = 50_000
        for lo in range(0, n_items, chunk):
            hi = min(n_items, lo + chunk)
            colours = rng.integers(len(COLOURS), size=hi - lo)
            types = rng.integers(len(TYPES), size=hi - lo)
            words = rng.integers(len(WORDS), size=(hi - lo, 2))
            rows = []
            for j in range(hi - lo):
                c, t = COLOURS[colours[j]], TYPES[types[j]]
                rows.append({"id": lo + j + 1, "external_id": f"s{lo + j + 1}",
                             "title": f"{WORDS[words[j, 0]]} {WORDS[words[j, 1]]} {c} {t}",
                             "text": None, "image": None,
                             "attributes": {"colour": c.title(), "type": t.title()},
                             "created_at": now, "updated_at": now})
            vecs = rng.standard_normal((hi - lo, dim), dtype=np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            vecs = vecs.astype(np.float16)
            with eng.store.session() as s:
                s.execute(Item.__table__.insert(), rows)
                s.execute(ItemVector.__table__.insert(), [
                    {"item_id": lo + j + 1, "encoder": "bert", "fingerprint": fingerprint,
                     "content_hash": content_hash(f"synthetic:{lo + j + 1}"), "dtype": "float16",
                     "dim": dim, "vector": vecs[j].tobytes(), "created_at": now}
                    for j in range(hi - lo)])
            print(f"  synthetic catalogue: {hi:,} / {n_items:,} items", flush=True)
    checkpoint(db)
    info["build_s"] = round(time.perf_counter() - start, 1)
    return info


def synthetic_queries(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        q = f"{rng.choice(WORDS)} {rng.choice(COLOURS)} {rng.choice(TYPES)} {rng.randint(0, 10**6)}"
        out.append(q)
    return out


# -- exact vs FAISS -----------------------------------------------------------------------
def exact_vs_faiss(matrix: torch.Tensor, n_queries: int, clients: Sequence[int],
                   seed: int = 2) -> list[dict[str, Any]]:
    import faiss
    gen = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(n_queries, matrix.shape[1], generator=gen), dim=1)
    x = matrix.contiguous().numpy()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    qn = queries.numpy()
    rows: list[dict[str, Any]] = []
    _, exact_ids = torch.topk(queries @ matrix.T, K, dim=1)
    _, faiss_ids = index.search(qn, K)
    agree = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / K
                           for a, b in zip(exact_ids, faiss_ids)]))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        mat = matrix.to(device)
        qs = queries.to(device)

        def torch_one(_: Any, i: int, mat: torch.Tensor = mat, qs: torch.Tensor = qs) -> None:
            torch.topk(mat @ qs[i], K).indices.cpu()

        def torch_batch(_: Any, i: int, mat: torch.Tensor = mat, qs: torch.Tensor = qs) -> None:
            torch.topk(qs[i:i + 64] @ mat.T, K, dim=1).indices.cpu()

        for n in clients:
            rows.append({"method": f"torch exact ({device})", "batch": 1,
                         **run_load(torch_one, list(range(n_queries)), n)})
            rows.append({"method": f"torch exact ({device})", "batch": 64,
                         **run_load(torch_batch, list(range(0, n_queries, 64)) * 4, n)})

    def faiss_one(_: Any, i: int) -> None:
        index.search(qn[i:i + 1], K)

    def faiss_batch(_: Any, i: int) -> None:
        index.search(qn[i:i + 64], K)

    for n in clients:
        rows.append({"method": "faiss IndexFlatIP (cpu)", "batch": 1,
                     **run_load(faiss_one, list(range(n_queries)), n)})
        rows.append({"method": "faiss IndexFlatIP (cpu)", "batch": 64,
                     **run_load(faiss_batch, list(range(0, n_queries, 64)) * 4, n)})
    for r in rows:
        r["items"] = matrix.shape[0]
        r["dim"] = matrix.shape[1]
        r["agreement_at_10"] = round(agree, 4)
    base = {(r["batch"], r["clients"]): r["p50_ms"] for r in rows if r["method"] == "torch exact (cpu)"}
    for r in rows:
        r["p50_vs_torch_cpu"] = round(r["p50_ms"] / base[(r["batch"], r["clients"])], 2) \
            if base.get((r["batch"], r["clients"])) else None
    return rows


# -- recommend retrieval at scale: exact vs HNSW, first request of a fresh process ---------
FRESH_PROCESS = """
import sys, time, torch
start = time.perf_counter()
from polyrec import Engine
from polyrec.retrieve.search import searcher
from polyrec.rank.vector_index import IndexSettings
eng = Engine(sys.argv[1], device="cpu", entrypoints=False, progress=False)
srch = searcher(eng)
srch.index_settings = IndexSettings(backend=sys.argv[2])
with eng.store.snapshot() as s:
    space = srch.space(s, "bert")
q = torch.nn.functional.normalize(torch.randn(space.matrix.shape[1]), dim=0)
space.search(q, 10)
print(round(time.perf_counter() - start, 2), space.index.kind)
"""


def fresh_process_first_request(db: Path, backend: str, runs: int = 3) -> list[dict[str, Any]]:
    """Seconds from interpreter start to the first top-10 over the store's bert vectors
    in a new process (imports, Engine, the vector matrix, its index), ``runs`` times."""
    import subprocess
    import sys
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(db), backend], check=True,
                              capture_output=True, text=True)
        inner, kind = done.stdout.split()[-2:]
        out.append({"process_s": round(time.perf_counter() - start, 2), "inner_s": float(inner),
                    "index": kind})
    return out


def recommend_at_scale(n_items: int, dim: int, n_queries: int, directory: Path,
                       settings: Any, seed: int = 4) -> dict[str, Any]:
    """Top-10 of a user vector over ``n_items`` unit item vectors of width ``dim`` (a
    vector model's retrieval step, e.g. the two-tower's item tower: dim 64): exact
    (torch) against the HNSW index (built once, persisted under ``directory``),
    latency of both and recall@10 of HNSW against exact."""
    from polyrec.retrieve.search import VectorSpace
    gen = torch.Generator().manual_seed(seed)
    items = torch.nn.functional.normalize(torch.randn(n_items, dim, generator=gen), dim=1)
    users = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=gen), dim=1)
    space = VectorSpace.of(f"bench-model-{dim}d", ("bench",), range(n_items), items,
                           normalised=True)
    start = time.perf_counter()
    space = space.indexed(settings, directory)
    space.index.wait()
    build = round(time.perf_counter() - start, 1)
    exact = [[i for i, _ in space.top(space.scores(u), K)] for u in users]
    approx = [[i for i, _ in space.search(u, K)] for u in users]
    recall = float(np.mean([len(set(a) & set(e)) / K for a, e in zip(approx, exact)]))
    rows = []
    for label, call in (("exact (torch)", lambda _, i: space.top(space.scores(users[i]), K)),
                        (f"{space.index.kind} (faiss)", lambda _, i: space.search(users[i], K))):
        for rep in range(3):
            rows.append({"method": label, "items": n_items, "dim": dim, "repeat": rep,
                         **run_load(call, list(range(n_queries)), 1)})
    return {"rows": rows, "recall_at_10": round(recall, 4), "index_s": build,
            "index": space.index.kind, "ef_search": getattr(settings, "ef_search", None),
            "m": getattr(settings, "m", None)}


# -- output -------------------------------------------------------------------------------
def print_rows(rows: Sequence[dict[str, Any]]) -> None:
    for r in rows:
        label = r.get("method") or f"{r['catalogue']:<12} {r['op']:<22} {r['via']:<10}"
        extra = f" batch={r['batch']:<3}" if "batch" in r else ""
        ratio = f"  x{r['p50_vs_torch_cpu']}" if r.get("p50_vs_torch_cpu") is not None else ""
        print(f"{label}{extra} clients={r['clients']}  p50={r['p50_ms']:8.2f} ms  "
              f"p99={r['p99_ms']:8.2f} ms  {r['throughput_rps']:9.1f} req/s{ratio}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Keep the built databases here and reuse them (default: a temp dir).")
    parser.add_argument("--items", type=int, default=1_000_000, help="Synthetic catalogue size.")
    parser.add_argument("--requests", type=int, default=200, help="Requests per run.")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-epochs", type=int, default=None,
                        help="Epochs of the ml-100k model (default: the rankers' own).")
    parser.add_argument("--skip-ml100k", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-search", action="store_true",
                        help="At --items: only recommend retrieval, fresh processes, exact vs HNSW.")
    parser.add_argument("--search-index", default="exact", choices=["exact", "auto", "faiss"],
                        help="Index of the stored bert vectors in search (default exact: an HNSW "
                             "over 1M x 384 takes long to build).")
    parser.add_argument("--scale-dims", default="64",
                        help="Widths of the item vectors for exact vs HNSW retrieval at --items.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    import tempfile

    from polyrec import Engine
    from polyrec.device import resolve_device
    from polyrec.retrieve.search import searcher
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="polyrec-serve-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(args.device))
    result: dict[str, Any] = {
        "command": "python benchmarks/serve.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in (("items", args.items),
                                                        ("requests", args.requests),
                                                        ("clients", args.clients),
                                                        ("train-epochs", args.train_epochs))
            if v is not None),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu_threads": torch.get_num_threads(), "device": device,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "platform": platform.platform()},
        "k": K, "serving": [], "topk": [], "prepare": {}}

    if not args.skip_ml100k:
        db = workdir / "ml100k.db"
        if not db.exists():
            print("preparing MovieLens-100k (ingest, encode, train) ...", flush=True)
            result["prepare"]["ml100k"] = prepare_ml100k(db, args.data, args.device,
                                                         args.train_epochs)
        with Engine(db, device=args.device, entrypoints=False, progress=False) as eng:
            queries, users = ml100k_workload(eng, args.requests)
            result["serving"] += bench_engine(eng, "ml-100k", queries, users, clients)

    if not args.skip_synthetic:
        db = workdir / f"synthetic-{args.items}.db"
        if not db.exists():
            print(f"building a synthetic catalogue of {args.items:,} items ...", flush=True)
            result["prepare"]["synthetic"] = prepare_synthetic(db, args.items, args.device)
        from polyrec.rank.vector_index import IndexSettings
        with Engine(db, device=args.device, entrypoints=False, progress=False) as eng:
            searcher(eng).index_settings = IndexSettings(backend=args.search_index)
            start = time.perf_counter()
            eng.search("warm black coat", K)  # loads the snapshots: catalogue, vectors, FTS5
            result["prepare"]["synthetic_first_search_s"] = round(time.perf_counter() - start, 1)
            with eng.store.session() as s:
                space = searcher(eng).space(s, "bert")
            gen = torch.Generator().manual_seed(3)
            user_vecs = torch.nn.functional.normalize(torch.randn(args.requests, space.matrix.shape[1],
                                                                  generator=gen), dim=1)

            def retrieve(_: Any, i: int) -> None:
                space.search(user_vecs[i], K)

            if args.skip_search:
                for rep in range(3):
                    result["serving"].append({
                        "catalogue": f"synthetic-{args.items // 1000}k", "repeat": rep,
                        "op": f"recommend (retrieval, {space.matrix.shape[1]}d, {space.index.kind})",
                        "via": "in-process", **run_load(retrieve, list(range(args.requests)), 1)})
                print_rows(result["serving"])
            else:
                result["serving"] += bench_engine(
                    eng, f"synthetic-{args.items // 1000}k", synthetic_queries(args.requests),
                    None, clients, recommend_inprocess=retrieve,
                    recommend_payloads=list(range(args.requests)))
                print("exact top-k vs FAISS ...", flush=True)
                result["topk"] = exact_vs_faiss(space.matrix, args.requests, clients)
                print_rows(result["topk"])
        print("first request of a fresh process ...", flush=True)
        result["fresh_process"] = fresh_process_first_request(db, args.search_index)
        print(result["fresh_process"], flush=True)
        result["scale"] = []
        for dim in [int(d) for d in args.scale_dims.split(",") if d]:
            print(f"exact vs HNSW, {args.items:,} x {dim} ...", flush=True)
            found = recommend_at_scale(args.items, dim, args.requests, workdir / "index",
                                       IndexSettings(backend="faiss"))
            result["scale"].append(found)
            print_rows(found["rows"])
            print(f"  recall@10 {found['recall_at_10']}  index {found['index_s']} s", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
