"""Text search quality of the bert encoder, fp32 against a compressed variant (quantize=int8).

Dense text retrieval as the search's dense leg does it: items encoded with
``encode_texts``, the query with ``encode_query``, ranked by cosine. Labelled queries are
built from the real catalogues' attributes (no hand labels):

* H&M articles (1,000): a query "<colour> <product type>" (e.g. "Black Trousers") for
  every pair held by at least 3 articles; relevant = the articles with both attributes.
* MovieLens-100k (1,682 titles): a query "<genre> and <genre> movies" for every genre
  pair held by at least 10 films; relevant = the films with both genres.

Reports NDCG@10, Recall@10 (over min(|rel|, 10)) and MRR per variant, their ratio, and
the overlap of the two top-10 lists. Writes benchmarks/results/search_quality.json. Usage:
    .venv/bin/python benchmarks/search_quality.py [--quantize int8]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from polyrec.contracts import EncoderContext, ItemView  # noqa: E402
from polyrec.plugins.text_bert import BertEncoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = EncoderContext(engine=None, device=torch.device("cpu"), progress=False)  # type: ignore[arg-type]


def hm_task(data: Path) -> tuple[list[ItemView], list[tuple[str, set[int]]]]:
    import pyarrow.parquet as pq
    rows = pq.read_table(data / "hm-sample" / "articles_sample.parquet").to_pylist()
    items = [ItemView(id=k, external_id=str(r["article_id"]), title=r["prod_name"],
                      text=r["detail_desc"], attributes=r) for k, r in enumerate(rows)]
    pairs = Counter((r["colour_group_name"], r["product_type_name"]) for r in rows)
    queries = [(f"{c} {t}", {k for k, r in enumerate(rows)
                             if (r["colour_group_name"], r["product_type_name"]) == (c, t)})
               for (c, t), n in sorted(pairs.items()) if n >= 3]
    return items, queries


def ml_task(data: Path) -> tuple[list[ItemView], list[tuple[str, set[int]]]]:
    lines = (data / "ml-100k" / "ml-100k.item").read_text(encoding="latin-1").splitlines()[1:]
    items, genres = [], []
    for k, line in enumerate(lines):
        _, title, year, g = line.split("\t")
        items.append(ItemView(id=k, external_id=str(k), title=title,
                              attributes={"release_year": year, "class": g.split()}))
        genres.append(set(g.split()))
    names = sorted(set().union(*genres))
    queries = []
    for a, b in itertools.combinations(names, 2):
        rel = {k for k, g in enumerate(genres) if a in g and b in g}
        if len(rel) >= 10:
            queries.append((f"{a} and {b} movies", rel))
    return items, queries


def metrics(ranked: list[int], rel: set[int], k: int = 10) -> dict[str, float]:
    dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(ranked[:k]) if i in rel)
    idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
    first = next((r for r, i in enumerate(ranked) if i in rel), None)
    return {"ndcg@10": dcg / idcg, "recall@10": len(rel & set(ranked[:k])) / min(len(rel), k),
            "mrr": 0.0 if first is None else 1 / (first + 1)}


def run_task(encoders: dict[str, BertEncoder], items: list[ItemView],
             queries: list[tuple[str, set[int]]]) -> dict[str, Any]:
    first = next(iter(encoders.values()))
    texts = [first.content(i) or "" for i in items]
    out: dict[str, Any] = {"items": len(items), "queries": len(queries)}
    tops: dict[str, list[list[int]]] = {}
    for name, enc in encoders.items():
        vectors = enc.encode_texts(texts, CPU)
        q = enc.encode_texts([text for text, _ in queries], CPU)
        order = (q @ vectors.T).argsort(dim=1, descending=True).tolist()
        tops[name] = [o[:10] for o in order]
        per = [metrics(o, rel) for o, (_, rel) in zip(order, queries)]
        out[name] = {m: round(sum(p[m] for p in per) / len(per), 4) for m in per[0]}
    a, b = list(encoders)
    out["ratio"] = {m: round(out[b][m] / out[a][m], 4) for m in out[a]}
    out["top10_overlap"] = round(sum(len(set(x) & set(y)) for x, y in zip(tops[a], tops[b]))
                                 / (10 * len(queries)), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--quantize", default="int8")
    args = parser.parse_args()
    encoders = {"fp32": BertEncoder(), args.quantize: BertEncoder(quantize=args.quantize)}
    for enc in encoders.values():
        enc.prepare(CPU)
    results = {"H&M colour + type": run_task(encoders, *hm_task(args.data)),
               "ml-100k genre pairs": run_task(encoders, *ml_task(args.data))}
    print(f"{'task':<20} {'queries':>7} {'variant':<6} {'NDCG@10':>8} {'R@10':>7} {'MRR':>7}  overlap@10")
    for task, r in results.items():
        for name in encoders:
            print(f"{task:<20} {r['queries']:>7} {name:<6} {r[name]['ndcg@10']:>8.4f} "
                  f"{r[name]['recall@10']:>7.4f} {r[name]['mrr']:>7.4f}")
        ratio = r["ratio"]
        print(f"{'':<20} {'':>7} {'ratio':<6} {ratio['ndcg@10']:>8.4f} {ratio['recall@10']:>7.4f} "
              f"{ratio['mrr']:>7.4f}  {r['top10_overlap']:.3f}")
    out = ROOT / "benchmarks" / "results" / "search_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "search_quality", "variants": list(encoders),
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
