"""Why an item was recommended: modality attention, the history items it is closest to,
a knowledge-graph path to one of them ("shares director X with Y that you liked"), the
score of each component of the pipeline and the ranker's own words.

Works with any ranker, through the optional Ranker contract methods only
(polyrec.contracts.Ranker): ``components()`` (named sub-rankers: ensemble members, a
re-ranker's base and scorers), ``item_vectors(data)`` and ``modality_weights(data)``
(asked of the ranker, then of its components, depth first; the stored encoder vectors
stand in when none has item vectors) and ``explain(user, item, data)``.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import networkx as nx
import torch
import torch.nn.functional as F

from polyrec.contracts import Ranker
from polyrec.training_data import TrainingData


def _overrides(ranker: Any, method: str) -> bool:
    """True when ``ranker``'s class implements ``method`` itself (not the contract default)."""
    impl = getattr(type(ranker), method, None)
    return impl is not None and impl is not getattr(Ranker, method, None)


def components(ranker: Ranker) -> list[tuple[str, Ranker]]:
    """The named rankers whose scores a pipeline combines (``Ranker.components()``);
    empty for a single ranker."""
    return [(str(label), child) for label, child in ranker.components() or []]


def walk(ranker: Ranker) -> Iterator[Ranker]:
    """The ranker and every component below it, depth first (each once)."""
    seen: set[int] = set()
    stack = [ranker]
    while stack:
        r = stack.pop()
        if id(r) in seen:
            continue
        seen.add(id(r))
        yield r
        stack.extend(reversed([child for _, child in components(r)]))


def find_ranker(ranker: Ranker, name: str) -> Ranker | None:
    """The first ranker called ``name`` in a pipeline (itself, then its components, depth
    first); None when there is none."""
    return next((r for r in walk(ranker) if getattr(r, "name", None) == name), None)


def item_vectors(ranker: Ranker, data: TrainingData) -> torch.Tensor | None:
    """Unit-length, mean-centred item vectors [n_items, D] for similarity: the first
    ``Ranker.item_vectors(data)`` in the pipeline that gives some, else the stored encoder
    vectors concatenated (each modality normalised); None when there are neither."""
    vectors = None
    for r in walk(ranker):
        if _overrides(r, "item_vectors"):
            found = r.item_vectors(data)
            if found is not None:
                vectors = found.detach().float().cpu()
                break
    if vectors is None:
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
    """(modalities, weights [n_items, M]) from the first ``Ranker.modality_weights(data)``
    in the pipeline that gives some; None without one."""
    for r in walk(ranker):
        if not _overrides(r, "modality_weights"):
            continue
        found = r.modality_weights(data)
        if found is not None and found[0]:
            names, weights = found
            return list(names), weights.detach().float().cpu()
    return None


def ranker_reasons(ranker: Ranker, user: int, item: int, data: TrainingData) -> dict[str, str]:
    """label -> what ``Ranker.explain(user, item, data)`` says, for the ranker (label
    "ranker") and each of its components (their labels); rankers with nothing to say and
    rankers whose ``explain`` fails are left out."""
    out: dict[str, str] = {}
    for label, r in [("ranker", ranker), *components(ranker)]:
        if not _overrides(r, "explain"):
            continue
        try:
            said = r.explain(int(user), int(item), data)
        except Exception:  # noqa: BLE001 - an explanation never fails a request
            continue
        if said:
            out[label] = str(said)
    return out


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
        self.ranker = ranker
        self.data, self.titles, self.external, self.graph = data, titles, external, graph
        self.vectors = item_vectors(ranker, data)
        self.attention = attention_weights(ranker, data)
        self.top_history, self.path_candidates, self.max_hops = top_history, path_candidates, max_hops

    def _item(self, index: int) -> dict[str, Any]:
        ident = self.data.item_ids[index]
        return {"item": self.external[ident], "title": self.titles.get(ident)}

    def explain(self, item: int, history: Iterable[int], scores: dict[str, float] | None = None,
                *, user: int | None = None) -> dict[str, Any]:
        """Explanation of recommending item index ``item`` to a user with ``history``;
        with ``user`` (dense index), also what the rankers say (``Ranker.explain``)."""
        history = [int(h) for h in history]
        out: dict[str, Any] = {}
        if user is not None:
            said = ranker_reasons(self.ranker, user, item, self.data)
            if said:
                out["ranker"] = said
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
            # only what is like the item says why: a history item pointing away from it
            # (similarity 0 or below) is no reason
            liked = [(h, s) for h, s in similar[:self.top_history] if s > 0]
            if liked:
                out["because"] = [{**self._item(h), "similarity": round(s, 4)}
                                  for h, s in liked]
        if scores:
            out["scores"] = {k: round(float(v), 4) for k, v in scores.items()}
        path = self._kg_path(item, [h for h, _ in similar] or history[:self.path_candidates])
        if path is not None:
            out["kg_path"] = path
        out["text"] = self._sentence(out, has_history=bool(history),
                                     model=str(getattr(self.ranker, "name", "") or ""))
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
    def _sentence(out: dict[str, Any], has_history: bool = False, model: str = "") -> str:
        parts = []
        if out.get("because"):
            names = [b["title"] or b["item"] for b in out["because"][:2]]
            parts.append("because you liked " + " and ".join(names))
        elif has_history:  # scored from the history, with no liked item like it to name
            models = ", ".join(out.get("scores") or {}) or model
            parts.append("ranked for your history" + (f" by {models}" if models else ""))
        else:  # no history: the pipeline falls back to popularity
            parts.append("popular with other users")
        if out.get("kg_path"):
            parts.append(out["kg_path"]["sentence"])
        parts.extend(out.get("ranker", {}).values())
        if out.get("modalities"):
            ranked = sorted(out["modalities"].items(), key=lambda kv: -kv[1])
            parts.append("weighing " + ", ".join(f"{m} {w:.0%}" for m, w in ranked))
        return "; ".join(parts)
