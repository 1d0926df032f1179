"""Frozen vs fine-tuned text encoder (issue 13, part 3): search precision on the H&M
development queries (tuning part and held-out part, reported separately), and
recommendation quality on MovieLens-100k (``polyrec evaluate`` on the docs split).

Each side is a prepared store (the same data; the tuned one re-encoded with ``polyrec
encode -e bert --set bert.weights=encoder_tuned`` after ``polyrec tune-encoder``); both
are evaluated in this one process, so the search code is the same for both. Usage:

    .venv/bin/python benchmarks/intent.py search --frozen HM.db --tuned HM_TUNED.db
    .venv/bin/python benchmarks/intent.py recommend --frozen ML.db --tuned ML_TUNED.db

Prints a table and writes benchmarks/results/intent_<task>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SETS = {"tuning": ROOT / "tests" / "data" / "hm_queries_tune.jsonl",
        "held-out": ROOT / "tests" / "data" / "hm_queries_heldout.jsonl"}


def search(frozen: Path, tuned: Path) -> dict[str, Any]:
    from polyrec import Engine
    from polyrec.retrieve.search_eval import evaluate_search
    out: dict[str, Any] = {}
    for side, db in (("frozen", frozen), ("tuned", tuned)):
        with Engine(db, device="cpu", progress=False) as eng:
            for name, path in SETS.items():
                t0 = time.perf_counter()
                res = evaluate_search(eng, path)
                out.setdefault(name, {})[side] = {"means": res.means,
                                                  "queries": len(res.queries),
                                                  "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{'set':<9} {'encoder':<7} {'run':<8} {'P@10':>6} {'NDCG@10':>8} {'MRR':>6}")
    for name, sides in out.items():
        for side, r in sides.items():
            for run, m in r["means"].items():
                print(f"{name:<9} {side:<7} {run:<8} {m['p']:>6.3f} {m['ndcg']:>8.3f} "
                      f"{m['mrr']:>6.3f}")
    return out


def recommend(frozen: Path, tuned: Path, models: str, seed: int) -> dict[str, Any]:
    from polyrec import Engine
    out: dict[str, Any] = {}
    for side, db in (("frozen", frozen), ("tuned", tuned)):
        with Engine(db, device="cpu", progress=False) as eng:
            t0 = time.perf_counter()
            res = eng.evaluate(models, seed=seed)
            print(f"== {side} ({db})")
            print(res.table())
            out[side] = {"result": res.as_dict(), "seconds": round(time.perf_counter() - t0, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=("search", "recommend"))
    ap.add_argument("--frozen", type=Path, required=True)
    ap.add_argument("--tuned", type=Path, required=True)
    ap.add_argument("--models", default="ease,hybrid")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    result = (search(args.frozen, args.tuned) if args.task == "search"
              else recommend(args.frozen, args.tuned, args.models, args.seed))
    path = ROOT / "benchmarks" / "results" / f"intent_{args.task}.json"
    path.write_text(json.dumps({"command": " ".join(os.sys.argv), **result}, indent=1,
                               default=str))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
