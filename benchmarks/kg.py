"""Knowledge-graph figures on MovieLens-100k (91,631 Freebase triples), current device.

* graph: reading the stored graph into arrays, the networkx MultiDiGraph, the fingerprint;
* embeddings: training time of TransE / RotatE configurations through the "kg" encoder,
  and how real the item vectors are — mean cosine of item pairs sharing a director, or
  at least two cast members, against random pairs, with the AUC (the chance that a
  sharing pair is closer than a random pair);
* paths: latency of ``explain`` on item pairs that share a director, and how often the
  shared director is among the top 5 paths.

Prints a table and writes benchmarks/results/kg.json. Usage:
    .venv/bin/python benchmarks/kg.py [--device auto|cpu|cuda] [--threads N (default 1, 0 = torch's)] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyrec import Engine
from polyrec.contracts import EncoderContext
from polyrec.knowledge_graph.graph import (graph_fingerprint, item_pairs_sharing, load_tables,
                                           to_networkx)
from polyrec.knowledge_graph.paths import explain

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "datasets" / "ml-100k"

CONFIGS: list[dict[str, Any]] = [
    {"method": "transe", "dim": 32, "epochs": 5},   # what the tests train
    {"method": "transe", "dim": 64, "epochs": 10},  # the encoder's defaults
    {"method": "transe", "dim": 64, "epochs": 20},
    {"method": "rotate", "dim": 64, "epochs": 5},
]


def best(fn, repeat: int = 3) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def similarity(vectors: dict[str, torch.Tensor], groups: dict[str, list], rng) -> dict[str, float]:
    names = sorted(vectors)
    random_pairs = [tuple(rng.choice(names, 2, replace=False)) for _ in range(5000)]

    def cos(pairs):
        a = torch.stack([vectors[x] for x, _ in pairs])
        b = torch.stack([vectors[y] for _, y in pairs])
        return torch.nn.functional.cosine_similarity(a, b, dim=1).numpy()

    base = cos(random_pairs)
    out = {"random": float(base.mean())}
    for name, pairs in groups.items():
        sims = cos(pairs)
        out[name] = float(sims.mean())
        out[f"{name}_auc"] = float((sims[:, None] > base[None, :2000]).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads while training (default 1 like the encoder; 0: torch's)")
    parser.add_argument("--quick", action="store_true", help="only the first configuration")
    args = parser.parse_args()
    results: dict[str, Any] = {"host": platform.node(), "torch": torch.__version__,
                               "cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0],
                               "torch_threads": args.threads or torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp, \
            Engine(Path(tmp) / "kg.db", device=args.device, entrypoints=False, progress=False) as eng:
        results["device"] = str(eng.device)
        eng.ingest(ML100K / "ml-100k.item", "items")
        eng.ingest(ML100K / "ml-100k.kg", "kg", links=ML100K / "ml-100k.link")
        with eng.store.session() as s:
            t_tables, tables = best(lambda: load_tables(s))
        t_fp, _ = best(lambda: graph_fingerprint(tables))
        t_nx, graph = best(lambda: to_networkx(tables))
        results["graph"] = {"triples": tables.n_triples, "entities": tables.n_entities,
                            "load_tables_s": round(t_tables, 3), "fingerprint_s": round(t_fp, 3),
                            "networkx_s": round(t_nx, 3)}

        pairs = item_pairs_sharing(graph, "film.film.directed_by")
        groups = {"director": pairs, "cast2": item_pairs_sharing(graph, "film.film.actor", min_shared=2)}
        start = time.perf_counter()
        hits = 0
        sample = pairs[:200]
        for a, b in sample:
            paths = explain(graph, a, b, limit=5)
            hits += any(p.hops == 2 and all("film.film.directed_by" in s.relations for s in p.steps)
                        for p in paths)
        results["paths"] = {"pairs": len(sample),
                            "ms_per_explain": round(1000 * (time.perf_counter() - start) / len(sample), 2),
                            "director_in_top5": round(hits / len(sample), 3)}

        items = eng.items()
        names = {it.id: it.external_id for it in items}
        linked = [it for it in items if it.entity is not None]
        ctx = EncoderContext(engine=eng, device=eng.device, progress=False)
        rows = []
        for cfg in CONFIGS[:1] if args.quick else CONFIGS:
            enc = eng.registry("encoders").get("kg")(**cfg, threads=args.threads)
            enc.prepare(ctx)
            res = enc.encode(linked, ctx)
            vectors = {names[i]: v for i, v in zip(res.item_ids, res.vectors)}
            sims = similarity(vectors, groups, np.random.default_rng(0))
            emb = enc.embeddings
            rows.append({**cfg, "train_s": round(emb.seconds, 2),
                         "s_per_epoch": round(emb.seconds / cfg["epochs"], 3),
                         "final_loss": round(emb.losses[-1], 4), "vectors": len(res.item_ids),
                         **{k: round(v, 3) for k, v in sims.items()}})
        results["embeddings"] = rows

    results["load_average_after"] = os.getloadavg()[0]
    g = results["graph"]
    print(f"device {results['device']}, torch threads {results['torch_threads']}, {results['cpus']} cpus, "
          f"load average {results['load_average_before']:.1f} -> {results['load_average_after']:.1f}")
    print(f"graph: {g['triples']:,} triples, {g['entities']:,} entities; load {g['load_tables_s']} s, "
          f"fingerprint {g['fingerprint_s']} s, networkx {g['networkx_s']} s")
    p = results["paths"]
    print(f"paths: {p['ms_per_explain']} ms per explain; shared director in top 5 for "
          f"{p['director_in_top5']:.0%} of {p['pairs']} pairs")
    header = (f"{'method':<7} {'dim':>4} {'ep':>3} {'train s':>8} {'s/ep':>6} {'random':>7} "
              f"{'director':>8} {'auc':>5} {'cast2':>6} {'auc':>5}")
    print(header)
    for r in rows:
        print(f"{r['method']:<7} {r['dim']:>4} {r['epochs']:>3} {r['train_s']:>8} {r['s_per_epoch']:>6} "
              f"{r['random']:>7.3f} {r['director']:>8.3f} {r['director_auc']:>5.2f} "
              f"{r['cast2']:>6.3f} {r['cast2_auc']:>5.2f}")
    out = ROOT / "benchmarks" / "results" / "kg.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
