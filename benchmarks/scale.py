"""Scale benchmark: a synthetic shop through ingest, encode, train, batch scoring and
recommend, on SQLite (one process), PostgreSQL (serving with 2 workers) and Ray (2 local
workers).

The shop (deterministic for a seed): ``--items`` items with a title, a description and
attributes (category, brand, colour, price), ``--users`` users and ``--interactions``
purchase/click events whose items follow a power law (Zipf, exponent ``--zipf``) and whose
users' activity does too. Per configuration it reports ingest rows/s (items +
interactions files), encode items/s (bert on a timed subset of ``--encode-items`` items:
MiniLM on 1M items is hours on a small CPU; Ray's time includes starting the actors),
train s/epoch (the two-tower, ID tower, one epoch without validation: the steps' time
from the ranker's throughput; "train fit s" is the whole fit, on Ray with the start of
the workers and shipping the data), batch-scoring users/s (``--batch-users`` users, top 10) and
recommend p99 (``--requests`` single-user requests; PostgreSQL: over HTTP to ``polyrec
serve --workers 2`` from 4 client threads; the others in-process).

At 1M items and millions of interactions: the shop is generated once into ``--shop``
(a folder, reused while its meta.json matches the sizes and seed), the databases live in
``--work`` (SQLite files; PostgreSQL is a throwaway server for the run, or ``--pg-url``),
``--phases`` runs some of ingest, encode, train, batch, recommend (the others read the
databases already in ``--work``: e.g. ``--phases train`` after the lead's change to the
two-tower), the Ray configuration works on the SQLite configuration's database
(``--ray-store sqlite``, the default; ``postgresql``: the ``--pg-url`` database, which
``python -m polyrec.store.pg_server`` can hold between runs; Ray is not used for ingest),
each phase prints its seconds, resident memory and a timestamp, and ``--merge`` updates
the rows of an existing JSON rather than replacing it.

Prints a table and writes benchmarks/results/scale.json. Usage:
    .venv/bin/python benchmarks/scale.py --items 100000 --interactions 1000000
    .venv/bin/python benchmarks/scale.py --configs sqlite,ray --items 20000 --interactions 200000
    .venv/bin/python benchmarks/scale.py --items 1000000 --interactions 2000000 \
        --shop /tmp/shop --work /tmp/work --keep --phases ingest --configs sqlite
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np

from polyrec import Engine

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("linen cotton wool silk denim leather velvet summer winter classic slim wide "
         "cropped long short soft light warm striped plain floral checked knitted woven "
         "relaxed fitted organic recycled vintage modern basic premium everyday").split()
NOUNS = ("dress shirt jacket coat trousers skirt sweater hoodie jeans shorts blouse scarf "
         "boots sneakers sandals bag belt hat socks cardigan").split()
COLOURS = "black white navy red green beige grey blue pink yellow brown olive".split()
TWO_TOWER = {"modalities": "none", "validation": False, "refit": False, "epochs": 1,
             "batch_size": 2048, "n_random": 1024}


# -- the synthetic shop --------------------------------------------------------------------
def shop(folder: Path, items: int, users: int, interactions: int, zipf: float,
         seed: int) -> dict[str, Path]:
    """The shop's files in ``folder``: those already there when its meta.json records the
    same sizes and seed, else generated now (interactions written 200,000 at a time:
    10M rows need no more memory than 200k)."""
    meta = {"items": items, "users": users, "interactions": interactions, "zipf": zipf,
            "seed": seed}
    paths = {"items": folder / "items.csv", "interactions": folder / "interactions.csv"}
    found = folder / "meta.json"
    if found.exists() and json.loads(found.read_text()) == meta and all(
            p.exists() for p in paths.values()):
        print(f"[{_clock()}] reusing the shop in {folder}", flush=True)
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    found.unlink(missing_ok=True)
    secs, paths = timed(lambda: generate(folder, items, users, interactions, zipf, seed))
    found.write_text(json.dumps(meta) + "\n")
    print(f"[{_clock()}] generated {items:,} items, {users:,} users, {interactions:,} "
          f"interactions in {secs:.0f}s into {folder}", flush=True)
    return paths


def generate(folder: Path, items: int, users: int, interactions: int, zipf: float,
             seed: int) -> dict[str, Path]:
    """Write items.csv, interactions.csv (CSV through the usual readers) into ``folder``."""
    rng = np.random.default_rng(seed)
    paths = {"items": folder / "items.csv", "interactions": folder / "interactions.csv"}
    with open(paths["items"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "title", "text", "category", "brand", "colour", "price"])
        for i in range(items):
            adj = rng.choice(WORDS, 3)
            noun = NOUNS[int(rng.integers(len(NOUNS)))]
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            w.writerow([f"i{i}", f"{adj[0].title()} {colour} {noun}",
                        f"A {adj[1]} {adj[2]} {noun} in {colour}, {adj[0]} fit.",
                        noun, f"brand{int(rng.zipf(1.5)) % 500}", colour,
                        round(float(rng.lognormal(3.5, 0.6)), 2)])
    # power-law item popularity and user activity (ranks shuffled so ids carry no order)
    item_w = 1.0 / np.arange(1, items + 1) ** zipf
    item_w = rng.permutation(item_w / item_w.sum())
    user_w = 1.0 / np.arange(1, users + 1) ** 0.8
    user_w = rng.permutation(user_w / user_w.sum())
    t0 = 1_700_000_000
    with open(paths["interactions"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "kind", "timestamp"])
        for lo in range(0, interactions, 200_000):
            n = min(200_000, interactions - lo)
            us = rng.choice(users, n, p=user_w)
            its = rng.choice(items, n, p=item_w)
            kinds = np.where(rng.random(n) < 0.2, "purchase", "click")
            ts = t0 + np.sort(rng.integers(0, 90 * 86400, n)) + lo
            w.writerows(zip((f"u{u}" for u in us), (f"i{i}" for i in its), kinds, ts.tolist()))
    return paths


# -- measurements -------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def ingest(eng: Engine, paths: dict[str, Path]) -> dict[str, Any]:
    """Both files through ``Engine.ingest`` (the interactions' time includes handing them
    to the feedback learners, as the command does); rows/s of each and of both."""
    rows, seconds, out = 0, 0.0, {}
    for kind in ("items", "interactions"):
        secs, report = timed(lambda: eng.ingest(paths[kind], kind))
        rows, seconds = rows + report.rows, seconds + secs
        out[f"ingest_{kind}_rows_per_s"] = round(report.rows / secs)
        print(f"[{_clock()}]   {kind}: {report.rows:,} rows in {secs:.0f}s", flush=True)
    return {"ingest_rows": rows, "ingest_s": round(seconds, 2),
            "ingest_rows_per_s": round(rows / seconds), **out}


def encode_subset(url: str | None, paths: dict[str, Path], n: int, ray_workers: int | None
                  ) -> dict[str, Any]:
    """bert on the first ``n`` items, in a database of their own (``url``, else a SQLite
    file): the rate, not the catalogue, is what is measured."""
    with tempfile.TemporaryDirectory() as tmp:
        sub = Path(tmp) / "items.csv"
        with open(paths["items"]) as src, open(sub, "w") as dst:
            for k, line in enumerate(src):
                if k > n:
                    break
                dst.write(line)
        with Engine(url or Path(tmp) / "enc.db", device="cpu",
                    entrypoints=False, progress=False) as eng:
            eng.ingest(sub, "items")
            if ray_workers:
                from polyrec.cluster.encode import encode
                secs, rep = timed(lambda: encode(eng, ["bert"], n_workers=ray_workers,
                                                 shard=max(64, n // (4 * ray_workers))))
            else:
                secs, rep = timed(lambda: eng.encode(["bert"]))
    r = rep["bert"]
    if r.error:
        raise RuntimeError(r.error)
    return {"encode_items": r.encoded, "encode_s": round(secs, 2),
            "encode_items_per_s": round(r.encoded / secs, 1)}


def train(eng: Engine, ray_workers: int | None, holdout: float | None = None
          ) -> dict[str, Any]:
    """The two-tower, one epoch; ``holdout``: the registry's held-out share (None: its
    default; 0: none, so no gate evaluation and no Recall@20). The gate measures at most
    its ``holdout_users`` (2,000) held-out users, each over the whole catalogue:
    ``gate_users`` of ``held_out_users``."""
    extra = {} if holdout is None else {"holdout": holdout}
    if ray_workers:
        from polyrec.cluster.train import train as ray_train
        secs, rep = timed(lambda: ray_train(eng, "two_tower", n_workers=ray_workers,
                                            options=TWO_TOWER, seed=0, force=True, **extra))
    else:
        secs, rep = timed(lambda: eng.train("two_tower", options=TWO_TOWER, seed=0, force=True,
                                            **extra))
    steps_s = rep.interactions / rep.info["throughput"]  # the epoch's steps (two_tower info)
    return {"train_s_per_epoch": round(steps_s, 2), "train_fit_s": round(rep.seconds, 2),
            "train_total_s": round(secs, 2),
            "train_positives": rep.interactions, "recall@20": rep.metrics.get("recall@20"),
            "gate_users": rep.metrics.get("users"),
            "held_out_users": rep.metrics.get("held_out_users", rep.metrics.get("users"))}


def batch(eng: Engine, users: list[str], ray_workers: int | None) -> dict[str, Any]:
    if ray_workers:
        from polyrec.cluster.batch import recommend_many
        run = lambda: sum(1 for _ in recommend_many(eng, users, 10, n_workers=ray_workers,  # noqa: E731
                                                    shard=max(100, len(users) // (4 * ray_workers))))
    else:
        run = lambda: sum(1 for _ in eng.recommend_many(users, 10, progress=False))  # noqa: E731
    secs, n = timed(run)
    return {"batch_users": n, "batch_s": round(secs, 2), "batch_users_per_s": round(n / secs, 1)}


def p99(latencies: list[float]) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies)
    return {"recommend_requests": len(ms), "recommend_p50_ms": round(statistics.median(ms), 2),
            "recommend_p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2)}


def recommend_inprocess(eng: Engine, users: list[str]) -> dict[str, Any]:
    eng.recommend(users[0], 10)  # the model loaded once, as a server does at its first request
    lat = []
    for u in users:
        t, _ = timed(lambda: eng.recommend(u, 10))
        lat.append(t)
    return p99(lat)


def recommend_http(url: str, users: list[str], workers: int = 2, clients: int = 4) -> dict[str, Any]:
    """p99 of POST /recommend against ``polyrec serve --workers`` from ``clients`` threads."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "polyrec"), "--db", url, "--device", "cpu", "--quiet",
           "serve", "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def post(user: str) -> float:
        req = urllib.request.Request(f"{base}/recommend", data=json.dumps(
            {"user": user, "k": 10}).encode(), headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()
        return time.perf_counter() - start

    try:
        started, deadline = time.time(), time.time() + 900
        warmed: set[int] = set()  # worker pids whose start-up warm-up is done
        while len(warmed) < workers:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=30) as resp:
                    health = json.loads(resp.read())
                if health.get("warm", {}).get("state") in ("done", "off"):
                    warmed.add(int(health["pid"]))
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"polyrec serve did not start and warm up "
                                   f"({len(warmed)} of {workers} workers ready)")
            time.sleep(0.5)
        ready_s = time.time() - started
        for u in users[:4 * workers]:  # every worker has served before timing
            post(u)
        lat: list[float] = []
        lock = threading.Lock()
        share = [users[k::clients] for k in range(clients)]

        def client(mine: list[str]) -> None:
            for u in mine:
                t = post(u)
                with lock:
                    lat.append(t)
        threads = [threading.Thread(target=client, args=(m,)) for m in share]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {**p99(lat), "recommend_via": f"HTTP, {workers} workers, {clients} clients",
                "serve_ready_s": round(ready_s, 1)}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


# -- configurations -----------------------------------------------------------------------
PHASES = ("ingest", "encode", "train", "batch", "recommend")


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def _rss_mb(field: str = "VmRSS") -> int:
    """This process's resident memory now (MB); ``VmHWM``: its peak so far."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def phase(row: dict[str, Any], name: str, config: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one phase of a configuration: its results into ``row``, its wall seconds, the
    resident memory after it and the peak so far under ``phase_s`` / ``rss_mb`` /
    ``peak_rss_mb``, a line when it starts and ends (load average included)."""
    print(f"[{_clock()}] {config}: {name} ...", flush=True)
    secs, out = timed(fn)
    row.update(out)
    row.setdefault("phase_s", {})[name] = round(secs, 1)
    row.setdefault("rss_mb", {})[name] = _rss_mb()
    row.setdefault("peak_rss_mb", {})[name] = _rss_mb("VmHWM")
    print(f"[{_clock()}] {config}: {name} done in {secs:.0f}s "
          f"({', '.join(f'{k}={v}' for k, v in out.items())}; rss {_rss_mb()} MB, "
          f"peak {_rss_mb('VmHWM')} MB, "
          f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())})", flush=True)


def run_config(name: str, args: argparse.Namespace, paths: dict[str, Path], work: Path,
               phases: list[str]) -> dict[str, Any]:
    ray_workers = 2 if name == "ray" else None
    pg = None
    row: dict[str, Any] = {"config": name, "phases": phases}
    try:
        if name == "postgresql":
            if args.pg_url:
                url = args.pg_url
            else:
                from polyrec.store.pg_server import LocalPostgres
                pg = LocalPostgres(base_dir=work).start()
                url = pg.create_database("scale")
                if "ingest" not in phases:
                    raise SystemExit("postgresql without --pg-url starts an empty server: "
                                     "include the ingest phase")
        elif name == "ray" and args.ray_store == "sqlite":
            url = f"sqlite:///{work / 'sqlite.db'}"
            row["store"] = "the sqlite configuration's database"
        elif name == "ray" and args.ray_store == "postgresql":
            if not args.pg_url:
                raise SystemExit("--ray-store postgresql works on the postgresql configuration's "
                                 "database: give it with --pg-url (python -m "
                                 "polyrec.store.pg_server holds a server between runs)")
            url = args.pg_url
            row["store"] = "the postgresql configuration's database"
        else:
            url = f"sqlite:///{work / f'{name}.db'}"
        ingest_here = "ingest" in phases and row.get("store") is None
        if name == "ray" and args.ray_store == "sqlite" and not (work / "sqlite.db").exists():
            raise SystemExit(f"{work / 'sqlite.db'} is missing: run the sqlite configuration's "
                             "ingest phase first (or --ray-store own)")
        with Engine(url, device="cpu", entrypoints=False, progress=args.verbose) as eng:
            if ingest_here:
                phase(row, "ingest", name, lambda: ingest(eng, paths))
            if "encode" in phases:
                def enc() -> dict[str, Any]:
                    enc_url = pg.create_database("encode") if pg is not None else None
                    return encode_subset(enc_url, paths, args.encode_items, ray_workers)
                phase(row, "encode", name, enc)
            if "train" in phases:
                phase(row, "train", name, lambda: train(eng, ray_workers, args.holdout))
            rng = np.random.default_rng(args.seed + 1)
            known = _users(eng) if {"batch", "recommend"} & set(phases) else []
            picks = ([known[int(i)] for i in rng.choice(len(known), args.batch_users, replace=False)]
                     if known else [])
            reqs = [known[int(i)] for i in rng.choice(len(known), args.requests)] if known else []
            if "batch" in phases:
                phase(row, "batch", name, lambda: batch(eng, picks, ray_workers))
            if "recommend" in phases and name != "postgresql":
                def rec() -> dict[str, Any]:
                    return {**recommend_inprocess(eng, reqs), "recommend_via": "in-process"}
                phase(row, "recommend", name, rec)
        if "recommend" in phases and name == "postgresql":
            phase(row, "recommend", name, lambda: recommend_http(url, reqs))
    finally:
        if pg is not None:
            pg.stop()
    return row


def _users(eng: Engine) -> list[str]:
    from sqlalchemy import select

    from polyrec.store.models import User
    with eng.store.session() as s:
        return [str(u) for u in s.execute(select(User.external_id).order_by(User.id)).scalars()]


COLUMNS = [("config", "config", "{}"), ("ingest rows/s", "ingest_rows_per_s", "{:,}"),
           ("encode items/s", "encode_items_per_s", "{:,}"),
           ("train s/epoch", "train_s_per_epoch", "{}"), ("train fit s", "train_fit_s", "{}"),
           ("batch users/s", "batch_users_per_s", "{:,}"),
           ("recommend p99 ms", "recommend_p99_ms", "{}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=None, help="default: interactions / 20")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encode-items", type=int, default=2000)
    parser.add_argument("--batch-users", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--configs", default="sqlite,postgresql,ray")
    parser.add_argument("--holdout", type=float, default=None,
                        help="training's held-out share (default: the registry's; 0: no gate "
                        "evaluation, no Recall@20)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"some of {','.join(PHASES)}; the others read what --work holds")
    parser.add_argument("--shop", type=Path, default=None,
                        help="folder of the generated shop, reused when it matches "
                        "(default: a temporary folder)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder of the databases (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true",
                        help="keep --work's databases (to re-run phases); default: removed")
    parser.add_argument("--pg-url", default=None,
                        help="an existing PostgreSQL database instead of a throwaway server")
    parser.add_argument("--ray-store", choices=("sqlite", "postgresql", "own"), default="sqlite",
                        help="ray works on the sqlite configuration's database (default), on "
                        "--pg-url's (postgresql) or ingests into its own")
    parser.add_argument("--verbose", action="store_true",
                        help="the engine's progress lines (ingest, training) on stderr")
    parser.add_argument("--merge", action="store_true",
                        help="merge into --out: this run's phases replace those figures of "
                        "its configurations, the rest is kept")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    args = parser.parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if set(phases) - set(PHASES):
        parser.error(f"--phases: unknown {sorted(set(phases) - set(PHASES))}")
    if args.verbose:
        import logging
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        logging.getLogger("polyrec.progress").setLevel(logging.INFO)
    users = args.users or max(100, args.interactions // 20)
    rows = []
    with tempfile.TemporaryDirectory(prefix="polyrec-scale-") as folder:
        tmp = Path(folder)
        paths = shop(args.shop or tmp / "shop", args.items, users, args.interactions,
                     args.zipf, args.seed)
        work = args.work or tmp / "work"
        work.mkdir(parents=True, exist_ok=True)
        try:
            for name in args.configs.split(","):
                rows.append(run_config(name.strip(), args, paths, work, phases))
        finally:
            if not args.keep:
                for f in work.glob("*.db*"):  # the files and the index folders beside them
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
    if args.merge and args.out.exists():  # this run's phases over the earlier ones
        earlier = {r["config"]: r for r in json.loads(args.out.read_text()).get("results", [])}
        for r in rows:
            before = earlier.pop(r["config"], {})
            for key in ("phase_s", "rss_mb", "peak_rss_mb"):
                r[key] = {**before.get(key, {}), **r.get(key, {})}
            r["phases"] = [p for p in PHASES if p in set(before.get("phases", [])) | set(r["phases"])]
            r.update({k: v for k, v in before.items() if k not in r})
        rows = list(earlier.values()) + rows
    print(" | ".join(h for h, _, _ in COLUMNS))
    for r in rows:
        print(" | ".join(f.format(r[k]) if r.get(k) is not None else "-" for _, k, f in COLUMNS))
    result = {"benchmark": "scale", "items": args.items, "users": users,
              "interactions": args.interactions, "zipf": args.zipf, "seed": args.seed,
              "encode_items": args.encode_items, "batch_users": args.batch_users,
              "requests": args.requests, "two_tower": TWO_TOWER,
              "command": " ".join(sys.argv),
              "machine": platform.platform(), "cpus": os.cpu_count(),
              "load_average_at_end": os.getloadavg(), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
