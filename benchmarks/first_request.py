"""First requests of a fresh serving process, cold and after the warm-up (engine/serve/warm.py).

Each round starts a new Python process (models are loaded once per process), opens the
store, builds the app with ``create_app(warm=False|True)``, waits for the warm-up to
finish when there is one (its time is reported apart), then times the first and second
``/search``, ``/recommend`` and ``/similar`` through a TestClient. Cold and warm rounds
alternate so that the machine's load falls on both alike. Prints a table of medians and
ranges and writes JSON. Usage (a trained store, e.g. the demo's):

    .venv/bin/python benchmarks/first_request.py --db demo/ml100k.db --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = [("search", "/search", {"query": "space adventure", "k": 10}),
            ("search_2nd", "/search", {"query": "romantic comedy", "k": 10}),
            ("recommend", "/recommend", {"user": None, "k": 10}),
            ("recommend_2nd", "/recommend", {"user": None, "k": 10}),
            ("similar", "/similar", {"item": None, "k": 10})]


def one_round(db: str, warm: bool) -> dict[str, float]:
    """In this process: the app, the warm-up (when on), then the timed requests (ms)."""
    import torch
    torch.set_num_threads(1)  # as polyrec serve (--torch-threads 1)
    from fastapi.testclient import TestClient

    from polyrec import Engine
    from polyrec.serve.app import create_app
    out: dict[str, float] = {}
    with Engine(db, device="cpu", progress=False) as eng:
        users, items = _ids(eng)
        start = time.perf_counter()
        client = TestClient(create_app(eng, warm=warm))
        out["app_ms"] = (time.perf_counter() - start) * 1000
        if warm:
            while client.get("/health").json()["warm"]["state"] == "running":
                time.sleep(0.05)
            out["warm_up_ms"] = (time.perf_counter() - start) * 1000
        for name, path, body in REQUESTS:
            body = dict(body)
            if "user" in body:
                body["user"] = users[0] if name == "recommend" else users[1]
            if "item" in body:
                body["item"] = items[0]
            t = time.perf_counter()
            r = client.post(path, json=body)
            out[f"{name}_ms"] = (time.perf_counter() - t) * 1000
            if r.status_code != 200:
                raise SystemExit(f"{path}: {r.status_code} {r.text[:300]}")
    return out


def _ids(eng) -> tuple[list[str], list[str]]:
    from sqlalchemy import select

    from polyrec.store.models import Item, User
    with eng.store.session() as s:
        users = list(s.execute(select(User.external_id).order_by(User.id).limit(2)).scalars())
        items = list(s.execute(select(Item.external_id).order_by(Item.id).limit(1)).scalars())
    return users, items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="a trained store (SQLite file or URL)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode")
    parser.add_argument("--one", choices=("cold", "warm"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "first_request.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_round(args.db, args.one == "warm")))
        return
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    for k in range(args.rounds):
        for mode in ("cold", "warm") if k % 2 == 0 else ("warm", "cold"):
            proc = subprocess.run([sys.executable, __file__, "--db", args.db, "--one", mode],
                                  capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {k + 1} {mode}: " + ", ".join(f"{key} {v:.0f}" for key, v in
                                                        runs[mode][-1].items()), flush=True)
    keys = [f"{name}_ms" for name, _, _ in REQUESTS]
    print("\nms (median [min-max]) | " + " | ".join(k[:-3] for k in keys))
    table = {}
    for mode, rows in runs.items():
        table[mode] = {k: {"median": round(statistics.median(r[k] for r in rows), 1),
                           "min": round(min(r[k] for r in rows), 1),
                           "max": round(max(r[k] for r in rows), 1)} for k in keys}
        print(f"{mode} | " + " | ".join(
            f"{table[mode][k]['median']:.0f} [{table[mode][k]['min']:.0f}-{table[mode][k]['max']:.0f}]"
            for k in keys))
    warmups = [r["warm_up_ms"] for r in runs["warm"]]
    print(f"warm-up itself: {statistics.median(warmups):.0f} ms median "
          f"[{min(warmups):.0f}-{max(warmups):.0f}]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "first_request", "db": args.db,
                                    "rounds": args.rounds, "load_average_at_end": os.getloadavg(),
                                    "runs": runs, "table": table}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
