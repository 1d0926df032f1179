"""Ablation: what the image vectors (image_cnn) add to similar items on the H&M sample.

For each item, its 5 nearest neighbours by cosine (the "encoders" basis of
``polyrec similar``: the mean of the cosines over the encoders both items have vectors
for) with text vectors only (bert), image vectors only (image_cnn), and both; the share
of neighbours with the same product group / product type / colour is reported next to
the same share at random. Two populations: the 100 articles with a photo, and all 1,000
(image vectors where present). Purchases: for customers who bought two or more distinct
articles, how often another of their articles is among an article's 10 nearest.

The store is ``--db`` (made when missing: H&M ingested, `polyrec encode` with bert and
image_cnn). Prints a table and writes benchmarks/results/image_ablation.json. Usage:
    .venv/bin/python benchmarks/image_ablation.py [--db /tmp/hm.db] [--data ../shared/datasets]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from sqlalchemy import select  # noqa: E402

from polyrec import Engine  # noqa: E402
from polyrec.store.models import Interaction  # noqa: E402
from polyrec.store.vectors import load_vectors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("product_group_name", "product_type_name", "colour_group_name")


def build(db: Path, data: Path) -> None:
    hm = data / "hm-sample"
    with Engine(db, device="cpu", progress=False) as eng:
        eng.ingest(hm / "articles_sample.parquet", "items",
                   image_template="images/{article_id:010d}.jpg", image_root=hm)
        eng.ingest(hm / "transactions_sample.parquet", "interactions",
                   interaction_kind="purchase")
        eng.encode(["bert", "image_cnn"])


def similarity(spaces: list[tuple[list[int], torch.Tensor]], ids: list[int]) -> torch.Tensor:
    """[n, n] mean cosine over the spaces both items have a vector in (-inf: none)."""
    pos = {i: k for k, i in enumerate(ids)}
    total = torch.zeros(len(ids), len(ids))
    count = torch.zeros(len(ids), len(ids))
    for space_ids, matrix in spaces:
        rows = torch.tensor([pos[i] for i in space_ids if i in pos], dtype=torch.long)
        keep = [k for k, i in enumerate(space_ids) if i in pos]
        m = torch.nn.functional.normalize(matrix[keep].float(), dim=1)
        have = torch.zeros(len(ids), dtype=torch.bool)
        have[rows] = True
        full = torch.zeros(len(ids), m.shape[1])
        full[rows] = m
        total += full @ full.T
        count += (have[:, None] & have[None, :]).float()
    sims = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("-inf")))
    sims.fill_diagonal_(float("-inf"))
    return sims


def agreement(sims: torch.Tensor, labels: list[str], k: int = 5) -> float:
    nearest = sims.topk(k, dim=1).indices.tolist()
    same = sum(labels[j] == labels[i] for i, row in enumerate(nearest) for j in row)
    return same / (k * len(labels))


def chance(labels: list[str]) -> float:
    n, counts = len(labels), collections.Counter(labels)
    return sum(c * (c - 1) for c in counts.values()) / (n * (n - 1))


def co_purchase(sims: torch.Tensor, ids: list[int], baskets: list[set[int]], k: int = 10
                ) -> tuple[float, int]:
    """Share of (article, other article of the same customer) pairs with the other among
    the article's k nearest; the number of pairs."""
    pos = {i: n for n, i in enumerate(ids)}
    nearest = sims.topk(k, dim=1).indices.tolist()
    hits = pairs = 0
    for basket in baskets:
        rows = [pos[i] for i in basket if i in pos]
        for a in rows:
            for b in rows:
                if a != b:
                    pairs += 1
                    hits += b in nearest[a]
    return (hits / pairs if pairs else float("nan")), pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("/tmp/polyrec_hm_ablation.db"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets")
    args = parser.parse_args()
    if not args.db.exists():
        build(args.db, args.data)
    with Engine(args.db, device="cpu", progress=False) as eng:
        by_user: dict[int, set[int]] = collections.defaultdict(set)
        with eng.store.session() as s:
            text = load_vectors(s, "bert")
            image = load_vectors(s, "image_cnn")
            for user, item in s.execute(select(Interaction.user_id, Interaction.item_id)):
                by_user[user].add(item)
        items = {v.id: v for v in eng.items()}
    baskets = [b for b in by_user.values() if len(b) > 1]
    rows: list[dict[str, Any]] = []
    populations = {"100 with photo": sorted(image[0]), "all 1,000": sorted(items)}
    for population, ids in populations.items():
        labels = {f: [str(items[i].attributes.get(f)) for i in ids] for f in FIELDS}
        bases = {"text (bert)": [text], "image (image_cnn)": [image], "text + image": [text, image]}
        if population != "100 with photo":
            bases.pop("image (image_cnn)")
        for basis, spaces in bases.items():
            sims = similarity(spaces, ids)
            hit, pairs = co_purchase(sims, ids, baskets)
            rows.append({"items": population, "basis": basis,
                         **{f: round(agreement(sims, labels[f]), 3) for f in FIELDS},
                         "co_purchase_at_10": round(hit, 3), "co_purchase_pairs": pairs})
        rows.append({"items": population, "basis": "random (expected)",
                     **{f: round(chance(labels[f]), 3) for f in FIELDS},
                     "co_purchase_at_10": None, "co_purchase_pairs": None})
    print(f"{'items':<15} {'basis':<18} {'group@5':>8} {'type@5':>7} {'colour@5':>8} "
          f"{'co-purch@10':>11} {'pairs':>6}")
    for r in rows:
        cp = "" if r["co_purchase_at_10"] is None else f"{r['co_purchase_at_10']:.3f}"
        print(f"{r['items']:<15} {r['basis']:<18} {r['product_group_name']:>8.3f} "
              f"{r['product_type_name']:>7.3f} {r['colour_group_name']:>8.3f} {cp:>11} "
              f"{'' if r['co_purchase_pairs'] is None else r['co_purchase_pairs']:>6}")
    out = ROOT / "benchmarks" / "results" / "image_ablation.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"db": str(args.db), "baskets": len(baskets), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
