"""How long the admin pages take on a large synthetic catalogue (default 1M items).

    .venv/bin/python benchmarks/admin_pages.py [--items 1000000] [--users 200000]
                                               [--interactions 2000000] [--repeat 5]

Builds a SQLite database through the Engine's schema (rows written with executemany:
items with a title, text and attributes, users, 'click' interactions spread over a year),
serves it (polyrec.serve.app, a real uvicorn server), and times each page over HTTP:
the first request and the median of ``--repeat`` more. No model is trained, so the
preview's recommendations are the popular items (the API's cold-start answer), whose
first call builds the search snapshot of the catalogue; that cost is the API's, reported
on its own line (``/recommend`` directly). Prints a table and writes JSON to
benchmarks/results/admin_pages.json.
"""
from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from polyrec import Engine
from polyrec.serve.app import create_app, start_background

RESULTS = Path(__file__).resolve().parent / "results"


def build(db: Path, items: int, users: int, interactions: int, seed: int = 0) -> None:
    Engine(db, device="cpu", entrypoints=False, progress=False).close()  # the schema
    rng = random.Random(seed)
    con = sqlite3.connect(db)
    now = 1_700_000_000.0
    colours = ["Black", "White", "Red", "Blue", "Green", "Beige"]
    con.executemany("INSERT INTO items (id, external_id, title, text, image, attributes, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, NULL, ?, ?, ?)",
                    ((i, f"i{i}", f"Item {i}", f"a {colours[i % 6].lower()} thing number {i}",
                      json.dumps({"colour_group_name": colours[i % 6]}), now, now)
                     for i in range(1, items + 1)))
    con.executemany("INSERT INTO users (id, external_id, attributes, created_at, updated_at) "
                    "VALUES (?, ?, '{}', ?, ?)", ((u, f"u{u}", now, now) for u in range(1, users + 1)))
    con.executemany("INSERT INTO interactions (id, user_id, item_id, kind, value, ts, context, "
                    "dedup_key) VALUES (?, ?, ?, 'click', NULL, ?, NULL, ?)",
                    ((n, rng.randint(1, users), min(int(rng.paretovariate(1.2)), items),
                      now - rng.random() * 365 * 86400, f"k{n}") for n in range(1, interactions + 1)))
    con.commit()
    con.close()


def timed(client: httpx.Client, path: str, repeat: int) -> dict:
    t = time.perf_counter()
    r = client.get(path)
    first = time.perf_counter() - t
    assert r.status_code == 200, (path, r.status_code, r.text[:300])
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        client.get(path).raise_for_status()
        runs.append(time.perf_counter() - t)
    return {"path": path, "first_s": round(first, 3), "median_s": round(statistics.median(runs), 3),
            "min_s": round(min(runs), 3), "max_s": round(max(runs), 3), "bytes": len(r.content)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--interactions", type=int, default=2_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="polyrec-admin-bench-") as tmp:
        db = Path(tmp) / "big.db"
        t = time.perf_counter()
        build(db, args.items, args.users, args.interactions)
        print(f"built {args.items:,} items, {args.users:,} users, {args.interactions:,} "
              f"interactions in {time.perf_counter() - t:.0f} s")
        rows = []
        with Engine(db, device="cpu", entrypoints=False, progress=False) as eng, \
                start_background(create_app(eng)) as server, \
                httpx.Client(base_url=server.url, timeout=600) as client:
            t = time.perf_counter()
            client.post("/recommend", json={"user": "u1", "k": 10}).raise_for_status()
            snapshot = time.perf_counter() - t
            runs = []
            for _ in range(args.repeat):  # what the preview's recommendations cost over the API
                t = time.perf_counter()
                client.post("/recommend", json={"user": "u1", "k": 10}).raise_for_status()
                runs.append(time.perf_counter() - t)
            recommend = {"path": "POST /recommend (popular)", "first_s": None,
                         "median_s": round(statistics.median(runs), 3),
                         "min_s": round(min(runs), 3), "max_s": round(max(runs), 3), "bytes": 0}
            for path in ["/", "/admin/models", "/admin/experiments", "/admin/preview",
                         "/admin/preview?user=u1", "/admin/preview?user=u1&p=2",
                         "/docs", "/redoc"]:
                rows.append(timed(client, path, args.repeat))
    rows.append(recommend)
    print(f"\nfirst /recommend (cold start: builds the search snapshot): {snapshot:.1f} s")
    print(f"{'page':<28}{'first s':>9}{'median s':>10}{'min s':>8}{'max s':>8}{'KB':>8}")
    for r in rows:
        first = "-" if r["first_s"] is None else f"{r['first_s']:.3f}"
        print(f"{r['path']:<28}{first:>9}{r['median_s']:>10.3f}{r['min_s']:>8.3f}"
              f"{r['max_s']:>8.3f}{r['bytes'] / 1024:>8.0f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "admin_pages.json"
    out.write_text(json.dumps({"args": vars(args), "first_recommend_s": round(snapshot, 2),
                               "pages": rows}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
