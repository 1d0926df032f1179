"""A living catalogue under load: recommend and search over HTTP while a writer streams
events and new items, against the same load without the writer.

8 client threads (``--clients``), each with its own keep-alive httpx client, send
``--requests`` requests in all (half /recommend for random known users and for users
the writer created, half /search, some queries naming the new items) to a uvicorn server
on 127.0.0.1 in this process (loopback only). Two phases per repeat, each on a fresh
copy of the prepared store and a fresh Engine (warmed with a few requests first):

* **baseline**: the clients alone;
* **live**: the clients while one writer thread adds ``--items`` new items in batches of
  ``--item-batch`` (``PUT /items``; encoded on arrival in the background) and posts a
  batch of ``--events`` events after each (``POST /feedback/batch``, from new users and
  known ones, on known and new items), ``--write-interval`` seconds apart; the clients go on past ``--requests`` until the
writer is done (at most 5x as many requests). A probe thread
  then searches for each batch's own word until the batch's items come back by their
  vectors (``dense`` rank).

Reported: requests, errors (any non-200 or exception), p50/p99 latency per operation
and the live/baseline ratio; for the new items, seconds from the end of their PUT to
their first appearance in any client's search result, in a search result by vector
(encoded and picked up), and in a recommendation.

The store: MovieLens-100k (items, users, ratings), BERT-encoded, and a model trained
once: ``--ranker default`` (the default pipeline with the fast options of the tests:
two_tower dim 32, 2 epochs without validation, EASE l2 fixed at 500) or any ranker name
(``--ranker ease`` trains in seconds). ``--db`` reuses a prepared store (kept with
``--keep-db PATH``). Prints a table; writes benchmarks/results/live.json.

    .venv/bin/python benchmarks/live.py [--repeat 2] [--requests 400] [--items 1000]
        [--ranker default] [--db prepared.db] [--keep-db prepared.db]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("POLYREC_DATASETS", ROOT.parent / "shared" / "datasets"))
RESULTS = ROOT / "benchmarks" / "results" / "live.json"
QUERIES = ["star wars", "toy story", "comedy about a wedding", "space adventure",
           "crime thriller", "romantic drama", "horror", "animated film for children",
           "war movie", "detective mystery"]
FAST_DEFAULT = {"base_options": {"l2": 500.0},
                "scorers": [{"name": "two_tower", "options": {"dim": 32, "validation": False}}]}


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def pseudo_word(seed: int, batch: int) -> str:
    """A made-up word naming one batch of new items (letters only, so BM25 indexes it;
    no genre word, so query understanding does not boost old items over new ones)."""
    letters, n = [], seed * 1000 + batch
    for _ in range(4):
        n, d = divmod(n, 26)
        letters.append(chr(97 + d))
    return "zq" + "".join(letters)


def open_engine(db: Path, device: str) -> Any:
    from polyrec import Engine
    return Engine(db, device=device, entrypoints=False, progress=False)


def prepare(db: Path, data: Path, ranker: str, device: str) -> dict[str, Any]:
    """Ingest ml-100k, encode with BERT, train; returns timings."""
    out: dict[str, Any] = {}
    with open_engine(db, device) as eng:
        t = time.perf_counter()
        ml = data / "ml-100k"
        eng.ingest(ml / "ml-100k.item", "items")
        eng.ingest(ml / "ml-100k.user", "users")
        eng.ingest(ml / "ml-100k.inter", "interactions")
        out["ingest_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        eng.encode(["bert"])
        out["encode_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        if ranker == "default":
            eng.train(epochs=2, seed=0, options=FAST_DEFAULT)
        else:
            eng.train(ranker, seed=0)
        out["train_s"] = round(time.perf_counter() - t, 1)
    from polyrec.store.sqlite import checkpoint
    checkpoint(db)
    return out


class Phase:
    """One measured run: clients (and, when live, the writer and the probe)."""

    def __init__(self, url: str, args: argparse.Namespace, live: bool, seed: int) -> None:
        self.url, self.args, self.live, self.seed = url, args, live, seed
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {"recommend": [], "search": []}
        self.errors: list[str] = []
        self.requests = 0
        # live: the clients go on past --requests until the writer is done (at most 5x)
        self.tickets = iter(range(args.requests * (5 if live else 1)))
        self.new_users: list[str] = []
        self.inserted: dict[str, float] = {}  # new item -> time its PUT returned
        self.batch_word: dict[int, str] = {}
        self.first_search: dict[str, float] = {}
        self.first_dense: dict[str, float] = {}
        self.first_recommend: dict[str, float] = {}
        self.writer_done = threading.Event()
        self.write_errors: list[str] = []
        self.write_seconds = 0.0

    # -- clients -------------------------------------------------------------------------
    def client(self, t: int) -> None:
        import httpx
        rnd = random.Random(self.seed * 100 + t)
        deadline = time.monotonic() + self.args.time_limit
        with httpx.Client(base_url=self.url, timeout=120) as http:
            for n in self.tickets:
                if time.monotonic() > deadline:
                    break
                if n >= self.args.requests and self.writer_done.is_set():
                    break
                if n % 2 == 0:
                    with self.lock:
                        fresh = self.new_users[-50:]
                    user = (rnd.choice(fresh) if fresh and rnd.random() < 0.3
                            else str(rnd.randint(1, 943)))
                    self.call(http, "recommend", "/recommend", {"user": user, "k": 10})
                else:
                    with self.lock:
                        words = list(self.batch_word.values())[-5:]
                    query = (rnd.choice(words) if words and rnd.random() < 0.3
                             else rnd.choice(QUERIES))
                    self.call(http, "search", "/search", {"query": query, "k": 10})

    def call(self, http: Any, kind: str, path: str, body: dict) -> None:
        t0 = time.perf_counter()
        try:
            r = http.post(path, json=body)
            ok, text = r.status_code == 200, r.text
        except Exception as exc:  # noqa: BLE001 - an error of the run, counted
            ok, text = False, f"{type(exc).__name__}: {exc}"
        dt = time.perf_counter() - t0
        now = time.monotonic()
        with self.lock:
            self.requests += 1
            if not ok:
                self.errors.append(f"{kind} {body}: {text[:200]}")
                return
            self.latency[kind].append(dt)
            if self.inserted:
                self._seen(kind, json.loads(text), now)

    def _seen(self, kind: str, body: dict, now: float) -> None:
        for hit in body.get("results", []):
            item = hit.get("item")
            if item not in self.inserted:
                continue
            first = self.first_recommend if kind == "recommend" else self.first_search
            first.setdefault(item, now)
            if kind == "search" and "dense" in (hit.get("ranks") or {}):
                self.first_dense.setdefault(item, now)

    # -- the writer and the probe --------------------------------------------------------
    def writer(self) -> None:
        import httpx
        rnd = random.Random(self.seed)
        a = self.args
        start = time.perf_counter()
        try:
            with httpx.Client(base_url=self.url, timeout=120) as http:
                for b in range(0, a.items, a.item_batch):
                    word = pseudo_word(self.seed, b // a.item_batch)
                    items = [{"external_id": f"new-{self.seed}-{b + k}",
                              "title": f"The {word} {('river', 'mountain', 'city')[k % 3]} "
                                       f"story {k}",
                              "text": f"A film about {word}, shot over a year."}
                             for k in range(min(a.item_batch, a.items - b))]
                    r = http.put("/items", json={"items": items})
                    stamp = time.monotonic()
                    if r.status_code != 200:
                        self.write_errors.append(f"PUT /items: {r.status_code} {r.text[:200]}")
                        continue
                    with self.lock:
                        for it in items:
                            self.inserted[it["external_id"]] = stamp
                        self.batch_word[b // a.item_batch] = word
                    with self.lock:
                        known_new = list(self.inserted)
                    events = []
                    for e in range(a.events):
                        user = (f"live-user-{self.seed}-{b}-{e}" if e % 2 == 0
                                else str(rnd.randint(1, 943)))
                        item = (rnd.choice(known_new) if e % 3 == 0 else str(rnd.randint(1, 1682)))
                        events.append({"user": user, "item": item, "kind": "click"})
                    r = http.post("/feedback/batch", json={"events": events})
                    if r.status_code != 200:
                        self.write_errors.append(f"POST /feedback/batch: {r.status_code} "
                                                 f"{r.text[:200]}")
                    else:
                        with self.lock:
                            self.new_users.extend(e["user"] for e in events
                                                  if e["user"].startswith("live-user"))
                    time.sleep(a.write_interval)
        finally:
            self.write_seconds = time.perf_counter() - start
            self.writer_done.set()

    def probe(self) -> None:
        """Search each batch's word until its items come back by vector (bounded)."""
        import httpx
        done: set[int] = set()
        deadline = None
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while True:
                if self.writer_done.is_set() and deadline is None:
                    deadline = time.monotonic() + self.args.visibility_timeout
                if deadline is not None and (time.monotonic() > deadline
                                             or len(done) == len(self.batch_word)):
                    return
                with self.lock:
                    todo = [(b, w) for b, w in self.batch_word.items() if b not in done]
                for b, word in todo:
                    r = http.post("/search", json={"query": word, "k": 20})
                    now = time.monotonic()
                    if r.status_code != 200:
                        continue
                    hits = r.json()["results"]
                    with self.lock:
                        for hit in hits:
                            item = hit["item"]
                            if item in self.inserted:
                                self.first_search.setdefault(item, now)
                                if "dense" in hit["ranks"]:
                                    self.first_dense.setdefault(item, now)
                    with self.lock:
                        batch_items = [i for i in self.inserted
                                       if int(i.split("-")[2]) // self.args.item_batch == b]
                        if batch_items and all(i in self.first_dense for i in batch_items):
                            done.add(b)
                time.sleep(0.25)

    # -- run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        threads = [threading.Thread(target=self.client, args=(t,))
                   for t in range(self.args.clients)]
        extra = ([threading.Thread(target=self.writer), threading.Thread(target=self.probe)]
                 if self.live else [])
        start = time.perf_counter()
        for th in extra + threads:
            th.start()
        for th in threads:
            th.join()
        clients_s = time.perf_counter() - start
        for th in extra:
            th.join()
        out: dict[str, Any] = {"phase": "live" if self.live else "baseline",
                               "requests": self.requests, "errors": len(self.errors),
                               "error_samples": self.errors[:5], "clients_s": round(clients_s, 1),
                               "throughput": round(self.requests / clients_s, 1)}
        for kind, xs in self.latency.items():
            out[f"{kind}_n"] = len(xs)
            out[f"{kind}_p50_ms"] = round(1000 * percentile(xs, 50), 1)
            out[f"{kind}_p99_ms"] = round(1000 * percentile(xs, 99), 1)
        if self.live:
            out["write_errors"] = self.write_errors[:5]
            out["items_inserted"] = len(self.inserted)
            out["writer_s"] = round(self.write_seconds, 1)
            out["new_users"] = len(self.new_users)
            for name, first in (("search_any", self.first_search),
                                ("search_dense", self.first_dense),
                                ("recommend", self.first_recommend)):
                lags = [first[i] - t for i, t in self.inserted.items() if i in first]
                out[f"visible_{name}_items"] = len(lags)
                out[f"visible_{name}_p50_s"] = round(percentile(lags, 50), 2) if lags else None
                out[f"visible_{name}_p99_s"] = round(percentile(lags, 99), 2) if lags else None
                out[f"visible_{name}_max_s"] = round(max(lags), 2) if lags else None
        return out


def run_phase(prepared: Path, work: Path, args: argparse.Namespace, live: bool,
              seed: int) -> dict[str, Any]:
    from polyrec.serve.app import create_app, start_background
    db = work / f"run-{seed}-{'live' if live else 'base'}.db"
    shutil.copyfile(prepared, db)
    with open_engine(db, args.device) as eng, \
            start_background(create_app(eng)) as server:
        import httpx
        with httpx.Client(base_url=server.url, timeout=120) as http:  # warm-up
            for n in range(4):
                http.post("/recommend", json={"user": str(n + 1), "k": 10})
                http.post("/search", json={"query": QUERIES[n], "k": 10})
        result = Phase(server.url, args, live, seed).run()
        if live:
            t = time.perf_counter()
            result["encoding_drained"] = eng.wait_for_encoding(args.visibility_timeout)
            result["encoding_wait_s"] = round(time.perf_counter() - t, 1)
            result["arrivals"] = {k: v for k, v in eng.services.arrivals().status().items()
                                  if k != "errors"}
            result["arrival_errors"] = eng.services.arrivals().status()["errors"][:3]
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=400, help="requests per phase, all clients")
    ap.add_argument("--time-limit", type=float, default=180.0, help="seconds per phase (clients)")
    ap.add_argument("--items", type=int, default=1000, help="new items the writer adds")
    ap.add_argument("--item-batch", type=int, default=50)
    ap.add_argument("--events", type=int, default=40, help="events posted after each item batch")
    ap.add_argument("--write-interval", type=float, default=0.5)
    ap.add_argument("--visibility-timeout", type=float, default=120.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ranker", default="default",
                    help="'default' (the default pipeline, fast options) or a ranker name")
    ap.add_argument("--db", type=Path, help="a prepared store (ml-100k, bert, trained)")
    ap.add_argument("--keep-db", type=Path, help="keep the prepared store here")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="polyrec-live-"))
    setup: dict[str, Any] = {}
    if args.db:
        prepared = args.db
    else:
        prepared = args.keep_db or work / "prepared.db"
        setup = prepare(prepared, args.data, args.ranker, args.device)
        print(f"prepared {prepared}: {setup}", flush=True)
    runs = []
    try:
        for rep in range(args.repeat):
            for live in (False, True):
                r = run_phase(prepared, work, args, live, seed=rep)
                r["repeat"] = rep
                runs.append(r)
                print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'run':<4} {'phase':<9} {'requests':>8} {'errors':>6} {'rec p50':>8} {'rec p99':>8} "
          f"{'srch p50':>8} {'srch p99':>8} {'req/s':>6} {'p50 x':>6} {'p99 x':>6} "
          f"{'vis any':>8} {'vis vec':>8} {'vis vec max':>11} {'vis rec':>8}")
    for r in runs:
        base = next(b for b in runs if b["repeat"] == r["repeat"] and b["phase"] == "baseline")
        def ratio(key: str) -> str:
            both = [r[f"{k}_{key}"] / base[f"{k}_{key}"] for k in ("recommend", "search")
                    if base[f"{k}_{key}"]]
            return f"{sum(both) / len(both):.2f}" if both else "-"
        vis = lambda k: "-" if r.get(k) is None else f"{r[k]:.1f}s"  # noqa: E731
        print(f"{r['repeat']:<4} {r['phase']:<9} {r['requests']:>8} {r['errors']:>6} "
              f"{r['recommend_p50_ms']:>8.0f} {r['recommend_p99_ms']:>8.0f} "
              f"{r['search_p50_ms']:>8.0f} {r['search_p99_ms']:>8.0f} {r['throughput']:>6.1f} "
              f"{ratio('p50_ms'):>6} {ratio('p99_ms'):>6} "
              f"{vis('visible_search_any_p50_s'):>8} {vis('visible_search_dense_p50_s'):>8} "
              f"{vis('visible_search_dense_max_s'):>11} {vis('visible_recommend_p50_s'):>8}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": args.threads,
                    "loadavg": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "setup": setup, "runs": runs}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
