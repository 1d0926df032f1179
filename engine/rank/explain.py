"""Why an item was recommended: modality attention, the history items it is closest to,
and a knowledge-graph path to one of them ("shares director X with Y that you liked").

Works with any ranker: the fused item vectors and attention weights come from a
two-tower model inside the pipeline when there is one (the ranker itself, an ensemble
member, a re-ranker's base); otherwise the stored encoder vectors stand in.
"""
from __future__ import annotations

from typing import Any, Iterable

import networkx as nx
import torch
import torch.nn.functional as F

from polyrec.contracts import Ranker
from polyrec.training_data import TrainingData


def find_ranker(ranker: Ranker, name: str) -> Ranker | None:
    """The first ranker called ``name`` in a pipeline (itself, ensemble members, a
    re-ranker's base and scorers), depth first; None when there is none."""
    if getattr(ranker, "name", None) == name:
        return ranker
    children: list[Any] = list(getattr(ranker, "members", []) or [])
    base = getattr(ranker, "base", None)
    if isinstance(base, Ranker):
        children.append(base)
    children += list(getattr(ranker, "scorers", []) or [])
    for child in children:
        found = find_ranker(child, name)
        if found is not None:
            return found
    return None


def components(ranker: Ranker) -> list[tuple[str, Ranker]]:
    """The named rankers whose scores a pipeline combines: ensemble members, or a
    re-ranker's retrieval ranker and scorers; empty for a single ranker."""
    members = getattr(ranker, "members", None)
    if members:
        specs = getattr(ranker, "member_specs", None) or [{"name": m.name} for m in members]
        return [(spec["name"], m) for spec, m in zip(specs, members)]
    base = getattr(ranker, "base", None)
    if isinstance(base, Ranker):
        return [(base.name, base)] + [(r.name, r) for r in getattr(ranker, "scorers", []) or []]
    return []


def item_vectors(ranker: Ranker, data: TrainingData) -> torch.Tensor | None:
    """Unit-length, mean-centred item vectors [n_items, D] for similarity: the two-tower
    item tower when the pipeline has one, else the stored encoder vectors concatenated
    (each modality normalised); None when there are neither."""
    tower = find_ranker(ranker, "two_tower")
    if tower is not None and hasattr(tower, "item_vectors"):
        vectors = tower.item_vectors(data).float()
    else:
        parts = [F.normalize(v.float(), dim=-1) * p[:, None] for v, p in data.item_features.values()]
        if not parts:
            return None
        vectors = torch.cat(parts, dim=1)
    # centre on the mean item so the direction every item shares does not make all
    # items look alike; an item without a vector stays zero (similar to nothing)
    present = vectors.abs().sum(1) > 0
    if bool(present.any()):
        vectors = torch.where(present[:, None], vectors - vectors[present].mean(0), vectors)
    return F.normalize(vectors, dim=-1)


def attention_weights(ranker: Ranker, data: TrainingData) -> tuple[list[str], torch.Tensor] | None:
    """(modalities, weights [n_items, M]) of the pipeline's fuser, None without one."""
    tower = find_ranker(ranker, "two_tower")
    if tower is None or not hasattr(tower, "attention"):
        return None
    names, weights = tower.attention(data)
    return (names, weights) if names else None


def relation_phrase(relation: str) -> str:
    """'film.film.directed_by' -> 'directed by'."""
    return relation.rsplit(".", 1)[-1].replace("_", " ")


def path_sentence(path: Any, other_title: str) -> str:
    """A reading of a knowledge-graph path from the recommended item to a liked one."""
    via = path.steps[0].target_label if path.hops >= 2 else None
    if path.hops == 1:
        return f"linked to {other_title} that you liked ({relation_phrase(path.steps[0].relation)})"
    rel = relation_phrase(path.steps[0].relation)
    if path.hops == 2:
        return f"shares {via} ({rel}) with {other_title} that you liked"
    return f"connected to {other_title} that you liked through {via} ({rel}), {path.hops} hops"


class Explainer:
    """Builds explanation dicts for one user's recommendations over one data snapshot."""

    def __init__(self, ranker: Ranker, data: TrainingData, titles: dict[int, str],
                 external: dict[int, str], graph: nx.MultiDiGraph | None = None,
                 top_history: int = 3, path_candidates: int = 5, max_hops: int = 3) -> None:
        self.data, self.titles, self.external, self.graph = data, titles, external, graph
        self.vectors = item_vectors(ranker, data)
        self.attention = attention_weights(ranker, data)
        self.top_history, self.path_candidates, self.max_hops = top_history, path_candidates, max_hops

    def _item(self, index: int) -> dict[str, Any]:
        ident = self.data.item_ids[index]
        return {"item": self.external[ident], "title": self.titles.get(ident)}

    def explain(self, item: int, history: Iterable[int], scores: dict[str, float] | None = None
                ) -> dict[str, Any]:
        """Explanation of recommending item index ``item`` to a user with ``history``."""
        history = [int(h) for h in history]
        out: dict[str, Any] = {}
        if self.attention is not None:
            names, weights = self.attention
            row = weights[item]
            out["modalities"] = {m: round(float(w), 4) for m, w in zip(names, row) if float(w) > 0}
        similar: list[tuple[int, float]] = []
        if self.vectors is not None and history:
            sims = self.vectors[history] @ self.vectors[item]
            order = torch.argsort(sims, descending=True).tolist()
            similar = [(history[j], float(sims[j])) for j in order[:max(self.top_history,
                                                                       self.path_candidates)]]
            out["because"] = [{**self._item(h), "similarity": round(s, 4)}
                              for h, s in similar[:self.top_history]]
        if scores:
            out["scores"] = {k: round(float(v), 4) for k, v in scores.items()}
        path = self._kg_path(item, [h for h, _ in similar] or history[:self.path_candidates])
        if path is not None:
            out["kg_path"] = path
        out["text"] = self._sentence(out)
        return out

    def _kg_path(self, item: int, liked: list[int]) -> dict[str, Any] | None:
        if self.graph is None:
            return None
        from polyrec.knowledge_graph.paths import HUB_DEGREE
        from polyrec.knowledge_graph.paths import explain as kg_explain
        from polyrec.errors import NotFoundError
        ext = self.external[self.data.item_ids[item]]
        best: tuple[tuple, int, Any] | None = None
        for other in liked[:self.path_candidates]:
            other_ext = self.external[self.data.item_ids[other]]
            try:
                paths = kg_explain(self.graph, ext, other_ext, max_hops=self.max_hops, limit=1)
            except NotFoundError:  # an item without a linked entity
                continue
            if paths:
                p = paths[0]
                hub = any(self.graph.degree(n) > HUB_DEGREE for n in p.via)
                rank = (hub, p.hops, p.cost)  # the most specific link wins
                if best is None or rank < best[0]:
                    best = (rank, other, p)
        if best is None:
            return None
        _, other, p = best
        other_ext = self.external[self.data.item_ids[other]]
        title = self.titles.get(self.data.item_ids[other]) or other_ext
        return {"with": other_ext, "title": title, "path": p.text(),
                "via": [self.graph.nodes[n].get("label") or n for n in p.via],
                "relations": [s.relation for s in p.steps], "sentence": path_sentence(p, title)}

    @staticmethod
    def _sentence(out: dict[str, Any]) -> str:
        parts = []
        if out.get("because"):
            names = [b["title"] or b["item"] for b in out["because"][:2]]
            parts.append("because you liked " + " and ".join(names))
        else:  # no history: the pipeline falls back to popularity
            parts.append("popular with other users")
        if out.get("kg_path"):
            parts.append(out["kg_path"]["sentence"])
        if out.get("modalities"):
            ranked = sorted(out["modalities"].items(), key=lambda kv: -kv[1])
            parts.append("weighing " + ", ".join(f"{m} {w:.0%}" for m, w in ranked))
        return "; ".join(parts)
