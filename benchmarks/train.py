"""Two-tower training throughput and top-k latency on the current device.

* Training: the "two_tower" ranker (attention fuser over the stored text and KG vectors
  plus item-ID embeddings, sampled softmax) fitted for ``--epochs`` epochs without
  validation on MovieLens-100k positives; throughput = training interactions processed
  per second inside the training loop (best of ``--repeat`` fits), and seconds per epoch.
* Top-k latency: exact top-k (torch.topk) over the fitted model's scores with each
  user's training items masked: one user (median and p95 of ``--queries`` requests) and a
  batch of 1,000 users (sampled with replacement; median of ``--repeat`` runs). Both
  warm: the item tower is computed once and cached, as when serving.

The store comes from ``--db`` (a database with ml-100k ingested and encoded, e.g. the
demo's); without it, ml-100k is ingested into a temporary database and encoded with
bert and kg first (minutes on a CPU). Prints a table and writes
benchmarks/results/train.json. On a CPU the ranker fits with one torch thread by default
(its ``threads`` option; ``--threads N`` overrides it and torch's setting). Usage:
    .venv/bin/python benchmarks/train.py [--db demo.db] [--device auto|cpu|cuda]
        [--epochs 3] [--repeat 2] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from polyrec import Engine  # noqa: E402
from polyrec.rank.dataset import build_training_data  # noqa: E402
from polyrec.device import resolve_device  # noqa: E402
from polyrec.plugins.rank_two_tower import TwoTowerRanker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("POLYREC_DATASETS", ROOT.parent / "shared" / "datasets")) / "ml-100k"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_db(path: Path, device: str) -> None:
    """Ingest ml-100k and encode it with bert and kg (what `make demo` does first)."""
    with Engine(path, device=device, entrypoints=False, progress=True) as eng:
        eng.ingest(DATA / "ml-100k.item", "items")
        eng.ingest(DATA / "ml-100k.user", "users")
        eng.ingest(DATA / "ml-100k.inter", "interactions")
        eng.ingest(DATA / "ml-100k.kg", "kg", links=DATA / "ml-100k.link")
        eng.encode(["bert", "kg"])


def topk(ranker: TwoTowerRanker, users: torch.Tensor, data: Any, history: list[torch.Tensor],
         k: int) -> torch.Tensor:
    """The serving path: scores, training items masked, exact top-k."""
    scores = ranker.score_users(users, data)
    rows = torch.cat([torch.full((len(history[u]),), r, dtype=torch.long)
                      for r, u in enumerate(users.tolist())])
    cols = torch.cat([history[u] for u in users.tolist()])
    scores[rows, cols] = -float("inf")
    return torch.topk(scores, k, dim=1).indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=None, help="Store with ml-100k encoded.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--queries", type=int, default=200, help="Single-user requests timed.")
    parser.add_argument("--batch-users", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for top-k and for fitting (default: torch's "
                             "setting for top-k, the ranker's 'threads' option for fitting)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    tmp = None
    db = args.db
    if db is None:
        tmp = tempfile.TemporaryDirectory()
        db = Path(tmp.name) / "ml100k.db"
        build_db(db, str(device))
    with Engine(db, device=device, entrypoints=False, progress=False) as eng:
        data = build_training_data(eng)
    if not data.item_features:
        raise SystemExit(f"{db} has no item vectors; run `polyrec encode` on it first")
    n_train = int(torch.unique(data.users * data.n_items + data.items).numel())

    fits = []
    ranker = None
    for _ in range(args.repeat):
        opts = {"threads": args.threads} if args.threads else {}
        ranker = TwoTowerRanker(device=str(device), epochs=args.epochs, validation=False, seed=0,
                                **opts)
        sync(device)
        start = time.perf_counter()
        ranker.fit(data)
        sync(device)
        fits.append({"seconds": time.perf_counter() - start,
                     "throughput": float(ranker.info["throughput"])})
    best = max(fits, key=lambda f: f["throughput"])
    assert ranker is not None

    history = data.user_items()
    active = torch.tensor([u for u in range(data.n_users) if len(history[u])])
    gen = torch.Generator().manual_seed(0)
    first = time.perf_counter()
    topk(ranker, active[:1], data, history, args.k)  # computes and caches the item tower
    cold_ms = (time.perf_counter() - first) * 1e3
    one = []
    for q in range(args.queries):
        user = active[torch.randint(len(active), (1,), generator=gen)]
        sync(device)
        start = time.perf_counter()
        topk(ranker, user, data, history, args.k)
        sync(device)
        one.append((time.perf_counter() - start) * 1e3)
    batch = []
    for _ in range(max(args.repeat, 3)):
        users = active[torch.randint(len(active), (args.batch_users,), generator=gen)]
        sync(device)
        start = time.perf_counter()
        topk(ranker, users, data, history, args.k)
        sync(device)
        batch.append((time.perf_counter() - start) * 1e3)
    one.sort()
    result = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "fit_threads": ranker.options["threads"],
        "data": {"users": data.n_users, "items": data.n_items, "train_interactions": n_train,
                 "modalities": {m: int(v.shape[1]) for m, (v, _) in data.item_features.items()}},
        "model": {k: ranker.options[k] for k in ("dim", "fuser", "loss", "negatives", "n_random",
                                                  "batch_size")},
        "epochs": args.epochs,
        "train": {"interactions_per_s": round(best["throughput"], 1),
                  "seconds_per_epoch": round(n_train / best["throughput"], 3),
                  "fit_seconds": [round(f["seconds"], 2) for f in fits]},
        "topk": {"k": args.k, "first_request_ms": round(cold_ms, 2),
                 "one_user_ms_p50": round(statistics.median(one), 3),
                 "one_user_ms_p95": round(one[int(0.95 * (len(one) - 1))], 3),
                 "batch_users": args.batch_users,
                 "batch_ms_p50": round(statistics.median(batch), 2),
                 "batch_users_per_s": round(args.batch_users / (statistics.median(batch) / 1e3), 1)},
        "command": " ".join(["python", "benchmarks/train.py", *sys.argv[1:]]),
    }
    rows = [("device", result["device_name"] + f" ({device.type}, {result['threads']} threads, "
                                               f"fit with {result['fit_threads'] or 'all'})"),
            ("training interactions", f"{n_train:,}"),
            ("train throughput", f"{best['throughput']:,.0f} interactions/s"),
            ("seconds per epoch", f"{result['train']['seconds_per_epoch']:.2f}"),
            ("top-k, one user (p50 / p95)", f"{result['topk']['one_user_ms_p50']:.2f} / "
                                            f"{result['topk']['one_user_ms_p95']:.2f} ms"),
            (f"top-k, batch of {args.batch_users:,} users", f"{result['topk']['batch_ms_p50']:.1f} ms "
                                                         f"({result['topk']['batch_users_per_s']:,.0f} users/s)"),
            ("first request (item tower)", f"{cold_ms:.1f} ms")]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
