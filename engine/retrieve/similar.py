"""Similar items: nearest neighbours of an item by cosine similarity.

The basis is, in order of preference (``basis="auto"``):

1. ``model``: the trained default model's fused item vectors (attention over text,
   image and graph vectors, trained on interactions), when a model is trained;
2. ``encoders``: the stored encoder vectors (bert, image_cnn, kg, ...): for each candidate
   the mean of its cosine similarities to the item over the encoders both have a vector
   for. Of a stand-in pair (clip / image_cnn) only the one in use counts
   (engine/encode/selection.py).

A modality ("image") as the basis compares that modality's vectors only.

The response says which basis was used. Vector matrices come from the Engine's
:class:`~polyrec.retrieve.search.Searcher` snapshots, so repeated calls do not reload them.
On PostgreSQL with pgvector, the encoders basis is answered in the database instead
(polyrec.store.pgvector: each encoder's nearest items through its HNSW index, scored in
every encoder), and no matrix is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch

from polyrec.encode.selection import passed_over
from polyrec.errors import ConfigError, NotFoundError
from polyrec.retrieve.search import VectorSpace, model_space, searcher, validate_k
from polyrec.store.ids import shown

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine


@dataclass
class SimilarItem:
    """One neighbour: external id, cosine score, and the per-space scores behind it."""

    item: str
    score: float
    title: str | None = None
    by: dict[str, float] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"item": self.item, "score": round(self.score, 6), "title": self.title,
                "by": {k: round(v, 6) for k, v in self.by.items()}, "attributes": self.attributes}


@dataclass
class SimilarResponse:
    """Neighbours of ``item`` and the basis they were found with."""

    item: str
    results: list[SimilarItem]
    basis: str
    spaces: list[str]
    notes: list[str] = field(default_factory=list)

    def ids(self) -> list[str]:
        return [r.item for r in self.results]

    def as_dict(self) -> dict[str, Any]:
        return {"item": self.item, "basis": self.basis, "spaces": self.spaces,
                "notes": self.notes, "results": [r.as_dict() for r in self.results]}


def _positions(external: Mapping[int, str]) -> tuple[list[int], dict[int, int]]:
    ids = list(external)
    return ids, {i: n for n, i in enumerate(ids)}


def _align(space: VectorSpace, pos: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(catalogue positions of the space's rows that are in the catalogue, which rows)."""
    keep = torch.tensor([i in pos for i in space.item_ids], dtype=torch.bool)
    where = torch.tensor([pos[i] for i in space.item_ids if i in pos], dtype=torch.long)
    return where, keep


def _basis_encoders(basis: str, stored: list[str], modalities: Mapping[str, str],
                    skip: set[str]) -> list[str]:
    """The encoders whose vectors a non-model basis compares: all stored ones in use
    ("auto", "encoders"), one encoder by name, or the stored ones in use of a modality
    ("image": image_cnn, or clip where it has pretrained weights)."""
    if basis in ("auto", "encoders"):
        return [n for n in stored if n not in skip]
    if basis in stored:
        return [basis]
    if basis in modalities.values() and basis not in modalities:  # kg: the encoder's name
        names = [n for n in stored if modalities.get(n) == basis and n not in skip]
        if names:
            return names
        raise ConfigError(f"no vectors stored for the {basis} modality by the encoder in use; "
                          "run `polyrec encode`")
    raise ConfigError(f"no vectors stored for encoder '{basis}' "
                      f"(have: {', '.join(sorted(stored)) or 'none'})")


def similar(engine: "Engine", item: str, k: int = 10, *,
            filters: Mapping[str, Any] | None = None, basis: str = "auto") -> SimilarResponse:
    """The ``k`` items most similar to ``item`` (external id), passing ``filters``;
    never a retired item (polyrec.store.lifecycle), though a retired ``item`` has
    neighbours (alternatives to a discontinued product).

    ``basis``: "auto" (trained model, else encoders), "model", "encoders", a modality
    ("text", "image", "kg": its encoder in use) or one encoder name ("bert", "image_cnn")."""
    k = validate_k(k)
    srch = searcher(engine)
    registry = engine.registry("encoders")
    modalities = {name: str(cls.modality) for name, cls in registry.items()}
    skip = passed_over(engine) if basis != "model" else set()
    notes: list[str] = []
    # the trained model loads (and may record things) through sessions of its own
    model = model_space(engine) if basis in ("auto", "model") else None
    with engine.store.snapshot() as s:  # one snapshot: a write landing meanwhile is not half-seen
        state = srch.state(s)
        snap = srch.catalog(s, state)
        retired = srch.retired(s, state)  # never a neighbour (the item itself may be one)
        target = snap.internal.get(str(item))
        if target is None:
            raise NotFoundError(f"unknown item {shown(item)}")
        allowed = snap.allowed(filters)
        spaces: dict[str, VectorSpace] = {}
        used = basis
        if basis in ("auto", "model"):
            if model is not None and model.has(target):
                spaces[model.name] = model
                used = "model"
            elif basis == "model":
                raise NotFoundError("no trained model knows this item; train one with "
                                    "`polyrec train`, or use basis 'encoders'")
            elif model is None:
                notes.append("no trained model: similarity from the stored encoder vectors")
            else:
                notes.append("the trained model has no vector for this item (new since "
                             "training?): similarity from the stored encoder vectors")
        if not spaces:
            names = _basis_encoders(basis, list(state.vectors), modalities, skip)
            used = "encoders" if basis in ("auto", "encoders") else basis
            found = (srch.pgvector.similar(s, {n: state.vectors[n][3] for n in names}, target,
                                           k, allowed, exclude=retired)
                     if srch.pgvector is not None else None)
            if found is not None:  # answered in PostgreSQL (pgvector), nothing loaded here
                if not found[1]:
                    raise NotFoundError(f"item '{item}' has no vectors to compare: run "
                                        "`polyrec encode` (or train a model) first")
                return SimilarResponse(str(item), [
                    SimilarItem(snap.external[i], v, snap.titles.get(i), by,
                                snap.attributes.get(i, {})) for i, v, by in found[0]],
                    used, found[1], notes)
            for name in names:
                space = srch.space(s, name, state)
                if space is not None and space.has(target):
                    spaces[name] = space
    if not spaces:
        raise NotFoundError(f"item '{item}' has no vectors to compare: run `polyrec encode` "
                            "(or train a model) first")
    ids, pos = srch.memo(("positions", snap.signature), lambda: _positions(snap.external))
    total = torch.zeros(len(ids))
    count = torch.zeros(len(ids))
    per: dict[str, torch.Tensor] = {}
    for name, space in spaces.items():
        scores = space.matrix @ space.matrix[space.row[target]]
        where, keep = srch.memo(("align", space.signature, snap.signature),
                                lambda: _align(space, pos))
        if space.invalid is not None:  # items without a vector here: no opinion
            scores = scores.masked_fill(space.invalid, float("nan"))
        full = torch.full((len(ids),), float("nan"))
        full[where] = scores[keep]
        per[name] = full
        known = ~torch.isnan(full)
        total[known] += full[known]
        count[known] += 1
    final = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("-inf")))
    final[pos[target]] = float("-inf")
    if retired:
        final[srch.memo(("retired-rows", snap.signature, state.lifecycle),
                        lambda: torch.tensor([pos[i] for i in retired if i in pos],
                                             dtype=torch.long))] = float("-inf")
    if allowed is not None:
        mask = torch.zeros(len(ids), dtype=torch.bool)
        rows = [pos[i] for i in allowed if i in pos]
        if rows:
            mask[rows] = True
        final[~mask] = float("-inf")
    vals, idx = torch.topk(final, min(k, len(ids)))
    results = []
    for v, j in zip(vals.tolist(), idx.tolist()):
        if v == float("-inf"):
            break
        iid = ids[j]
        by = {n: float(t[j]) for n, t in per.items() if not torch.isnan(t[j])}
        results.append(SimilarItem(snap.external[iid], v, snap.titles.get(iid), by,
                                   snap.attributes.get(iid, {})))
    return SimilarResponse(str(item), results, used, list(spaces), notes)
