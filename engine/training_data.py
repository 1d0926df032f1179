"""Training data shared by every ranker: dense index maps and interaction tensors.

Rankers see users and items as dense indices 0..n-1; ``user_ids[u]`` and ``item_ids[i]``
give the store's internal ids back.

The catalogue grows after a model is fitted: serving hands ``score_users`` a TrainingData
with more (or fewer) items than ``fit`` saw. :meth:`TrainingData.catalogue_map` tells a
ranker where each current item sits in its fitted catalogue (by id, never by position)
and, for the items it never saw, their nearest fitted items in content space.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: Neighbours per unseen item and softmax temperature over their cosine similarities.
COLD_NEIGHBOURS = 10
COLD_TEMPERATURE = 0.02


@dataclass(frozen=True)
class CatalogueMap:
    """How a model fitted on the items ``fitted_ids`` sees a (possibly larger) catalogue.

    ``position`` (long [n_items]): each current item's index in the fitted catalogue, -1
    for an item the model never saw. ``unseen`` (long [m]): dense indices of those items.
    ``neighbours`` (long [m, k]): for each unseen item, the *fitted positions* of its
    nearest reference items in content space; ``weights`` (float [m, k]): their softmax
    weights (each row sums to 1, or is all zero when the item has no content vector, or
    no reference item has one). ``has_content`` (bool [m]): the row has neighbours.
    ``identical``: the catalogue is exactly the fitted one (no remapping needed).
    """

    position: torch.Tensor
    unseen: torch.Tensor
    neighbours: torch.Tensor
    weights: torch.Tensor
    has_content: torch.Tensor
    identical: bool
    n_fitted: int

    @property
    def seen(self) -> torch.Tensor:
        """Dense indices of the current items the model was fitted on."""
        return torch.nonzero(self.position >= 0).flatten()

    def to_fitted(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows over the current items [b, n_items] -> rows over the fitted items
        [b, n_fitted]. An unseen item's value is spread over its content neighbours
        (by their weights), so a history with a new item still says something."""
        if self.identical:
            return rows
        out = rows.new_zeros(rows.shape[0], self.n_fitted)
        seen = self.seen
        out[:, self.position[seen]] = rows[:, seen]
        if len(self.unseen):
            vals = rows[:, self.unseen]  # [b, m]
            if bool((vals != 0).any()):
                spread = vals[:, :, None] * self.weights[None].to(rows.dtype)  # [b, m, k]
                out.index_add_(1, self.neighbours.flatten(), spread.flatten(1))
        return out

    def from_fitted(self, scores: torch.Tensor, cold: str = "min") -> torch.Tensor:
        """Scores over the fitted items [b, n_fitted] -> scores over the current items
        [b, n_items]. A seen item keeps its score; an unseen item with content gets the
        weighted mean of its neighbours' scores; one without content gets the row's
        smallest finite score (``cold="min"``: defined, ranked last) or -inf
        (``cold="-inf"``). Rows with no finite score stay -inf."""
        if self.identical:
            return scores
        b = scores.shape[0]
        out = torch.full((b, len(self.position)), -torch.inf, dtype=scores.dtype)
        seen = self.seen
        out[:, seen] = scores[:, self.position[seen]]
        if len(self.unseen):
            nb = scores[:, self.neighbours]  # [b, m, k]
            w = self.weights.to(scores.dtype)
            finite = torch.isfinite(nb) & (w[None] > 0)
            wf = torch.where(finite, w[None].expand_as(nb), torch.zeros_like(nb))
            total = wf.sum(-1)
            mixed = torch.where(finite, nb, torch.zeros_like(nb)).mul(wf).sum(-1) / total.clamp(min=1e-12)
            mixed = torch.where(total > 0, mixed, torch.full_like(mixed, -torch.inf))
            if cold == "min":
                fin = torch.isfinite(scores)
                row_min = torch.where(fin, scores, torch.full_like(scores, torch.inf)).min(1).values
                row_min = torch.where(torch.isfinite(row_min), row_min,
                                      torch.full_like(row_min, -torch.inf))
                mixed = torch.where(torch.isfinite(mixed), mixed, row_min[:, None].expand_as(mixed))
            out[:, self.unseen] = mixed
        return out


_MAP_CACHE: "OrderedDict[tuple, tuple[Any, CatalogueMap]]" = OrderedDict()
_MAP_LOCK = threading.Lock()
_MAP_CACHE_SIZE = 8


@dataclass
class TrainingData:
    """Interactions as tensors over dense user/item indices.

    users[k], items[k], weights[k], ts[k] describe interaction k. ``item_features`` holds
    per-modality item vectors aligned with the item index: modality -> (vectors
    [n_items, d] float32, present [n_items] bool).
    """

    user_ids: list[int]
    item_ids: list[int]
    users: torch.Tensor
    items: torch.Tensor
    weights: torch.Tensor
    ts: torch.Tensor
    item_features: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: modality key of ``item_features`` -> name of the encoder whose vectors it holds.
    feature_encoders: dict[str, str] = field(default_factory=dict)
    #: modality key of ``item_features`` -> digest of the stored vectors it was read from
    #: (their count, newest row and write time): equal digests, equal vectors. Lets a
    #: server reuse what it derived from the features (polyrec.rank.retrieval).
    feature_keys: dict[str, str] = field(default_factory=dict)
    #: How this data was split from the full data ({"split": "random", "seed": 0, ...});
    #: polyrec.rank.evaluation.validation_split carves validation data with the same protocol.
    protocol: dict[str, Any] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        """Number of users (dense user indices are 0..n_users-1)."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Number of catalogue items (dense item indices are 0..n_items-1)."""
        return len(self.item_ids)

    def user_index(self) -> dict[int, int]:
        """internal user id -> dense index."""
        return {u: i for i, u in enumerate(self.user_ids)}

    def item_index(self) -> dict[int, int]:
        """internal item id -> dense index."""
        return {it: i for i, it in enumerate(self.item_ids)}

    def matrix(self, binary: bool = True) -> torch.Tensor:
        """Dense user x item matrix of the interactions (float32)."""
        m = torch.zeros(self.n_users, self.n_items)
        vals = torch.ones_like(self.weights) if binary else self.weights
        m.index_put_((self.users, self.items), vals.float(), accumulate=not binary)
        return m

    def subset(self, keep: torch.Tensor, **protocol: Any) -> "TrainingData":
        """The same users, items and features with only the interactions where ``keep``
        (bool [n_interactions]) is true; ``protocol`` entries are recorded on the copy."""
        return replace(self, users=self.users[keep], items=self.items[keep],
                       weights=self.weights[keep], ts=self.ts[keep],
                       protocol={**self.protocol, **protocol})

    def user_items(self) -> list[torch.Tensor]:
        """For each user index, the item indices of that user's interactions."""
        users = self.users.cpu().numpy()
        # numpy's stable sort: torch's took 0.3 s for 55k rows on two busy cores (its
        # thread pool), numpy's a millisecond; rows sorted by user (build_training_data's
        # order) need no sort at all
        if len(users) > 1 and not (users[1:] >= users[:-1]).all():
            items = self.items[torch.from_numpy(np.argsort(users, kind="stable"))]
        else:
            items = self.items
        counts = np.bincount(users, minlength=self.n_users).tolist()
        return list(torch.split(items, counts))

    def item_counts(self) -> torch.Tensor:
        """Interactions per item index (long [n_items]); zero marks a cold item."""
        return torch.from_numpy(np.bincount(self.items.cpu().numpy(), minlength=self.n_items))

    def history(self, users: torch.Tensor, binary: bool = True) -> torch.Tensor:
        """Dense rows [len(users), n_items] of the given users' interactions (1.0 each when
        ``binary``, else the interaction's weight; build_training_data stores each pair
        once). The per-user index is built once per object."""
        indptr, items, weights = self._csr()
        users = users.long().cpu()
        starts, ends = indptr[users], indptr[users + 1]
        lengths = ends - starts
        rows = torch.repeat_interleave(torch.arange(len(users)), lengths)
        offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths)
        flat = torch.repeat_interleave(starts, lengths) + offsets
        out = torch.zeros(len(users), self.n_items)
        vals = torch.ones(len(flat)) if binary else weights[flat].float()
        out.index_put_((rows, items[flat]), vals, accumulate=False)
        return out

    def content_space(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors [n_items, D], present [n_items, M]): the concatenation of every
        modality vector in ``item_features`` (sorted by modality), each modality
        L2-normalised and zero where absent, and which modalities each item has.
        :meth:`content_similarity` compares items in this space."""
        parts, present = [], []
        for _, (vec, pres) in sorted(self.item_features.items()):
            pres = pres.bool()
            parts.append(F.normalize(vec.float(), dim=-1) * pres[:, None])
            present.append(pres)
        if not parts:
            return torch.zeros(self.n_items, 0), torch.zeros(self.n_items, 0, dtype=torch.bool)
        return torch.cat(parts, dim=1), torch.stack(present, dim=1)

    @staticmethod
    def content_similarity(space: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor,
                           cols: torch.Tensor) -> torch.Tensor:
        """Similarity [len(rows), len(cols)] of items in :meth:`content_space`: the mean
        cosine over the modalities both items have (-inf when they share none). An item
        known only by its text is thus compared on text alone, not penalised for the
        knowledge-graph vector it lacks."""
        vecs, present = space
        dots = vecs[rows] @ vecs[cols].T  # sum of the shared modalities' cosines
        shared = present[rows].float() @ present[cols].float().T
        return torch.where(shared > 0, dots / shared.clamp(min=1), torch.full_like(dots, -torch.inf))

    def catalogue_map(self, fitted_ids: Sequence[int] | None, reference: torch.Tensor | None = None,
                      *, n_fitted: int | None = None, k: int = COLD_NEIGHBOURS,
                      temperature: float = COLD_TEMPERATURE) -> CatalogueMap:
        """Map this catalogue onto the one a model was fitted on (see :class:`CatalogueMap`).

        ``fitted_ids``: the internal item ids the model was fitted on, in its own index
        order (None for a model saved before ids were recorded: its ``n_fitted`` items are
        then assumed to be the first ``n_fitted`` items here, ids being dense in id order).
        ``reference`` (bool [len(fitted_ids)]): fitted items that may serve as neighbours
        (those the model can score; default all). Items the model never saw get their ``k``
        nearest reference items by cosine similarity in :meth:`content_space`, weighted
        by a softmax of similarity / ``temperature`` (similarity: the mean cosine over the
        modalities the two items share, :meth:`content_similarity`); an item without
        content vectors (or sharing no modality with any reference item) gets none.

        The result is cached per (item ids, fitted ids, reference, feature tensors, k,
        temperature), so serving pays for it once per catalogue change, not per request.
        """
        if fitted_ids is None:
            if n_fitted is None:
                raise ValueError("catalogue_map needs fitted_ids or n_fitted")
            fitted = tuple(self.item_ids[:n_fitted])
            total = int(n_fitted)
        else:
            fitted = tuple(int(i) for i in fitted_ids)
            total = len(fitted)
        current = tuple(self.item_ids)
        ref = None if reference is None else reference.bool().cpu()
        ref_key = None if ref is None else ref.numpy().tobytes()
        feats = tuple((m, v, p) for m, (v, p) in sorted(self.item_features.items()))
        key = (hash(current), hash(fitted), total, ref_key, tuple((m, id(v), id(p)) for m, v, p in feats),
               int(k), float(temperature))
        with _MAP_LOCK:
            hit = _MAP_CACHE.get(key)
            tensors = [t for _, v, p in feats for t in (v, p)]
            if hit is not None and hit[0][0] == current and hit[0][1] == fitted and \
                    len(hit[0][2]) == len(tensors) and all(
                        ref() is t for ref, t in zip(hit[0][2], tensors)):
                _MAP_CACHE.move_to_end(key)
                return hit[1]
        result = self._build_map(current, fitted, total, ref, k, temperature)
        with _MAP_LOCK:
            # weak references: the cache never keeps a catalogue's features alive
            _MAP_CACHE[key] = ((current, fitted, [weakref.ref(t) for _, v, p in feats
                                                  for t in (v, p)]), result)
            while len(_MAP_CACHE) > _MAP_CACHE_SIZE:
                _MAP_CACHE.popitem(last=False)
        return result

    def _build_map(self, current: tuple, fitted: tuple, n_fit: int, ref: torch.Tensor | None,
                   k: int, temperature: float) -> CatalogueMap:
        empty = torch.empty(0, dtype=torch.long)
        if current == fitted and len(fitted) == n_fit:
            return CatalogueMap(torch.arange(n_fit), empty, empty.view(0, 0),
                                torch.empty(0, 0), torch.empty(0, dtype=torch.bool), True, n_fit)
        index = {it: p for p, it in enumerate(fitted)}
        position = torch.tensor([index.get(it, -1) for it in current], dtype=torch.long)
        unseen = torch.nonzero(position < 0).flatten()
        m = len(unseen)
        space = self.content_space()
        has = space[1].any(dim=1)
        seen = torch.nonzero(position >= 0).flatten()
        # reference items: fitted, present now, allowed, with content
        cand = seen[has[seen]]
        if ref is not None and len(cand):
            cand = cand[ref[position[cand]]]
        kk = max(0, min(int(k), len(cand)))
        if m == 0 or kk == 0 or space[0].shape[1] == 0:
            return CatalogueMap(position, unseen, torch.zeros(m, 0, dtype=torch.long),
                                torch.zeros(m, 0), torch.zeros(m, dtype=torch.bool), False, n_fit)
        neighbours = torch.zeros(m, kk, dtype=torch.long)
        weights = torch.zeros(m, kk)
        for start in range(0, m, 1024):
            rows = unseen[start:start + 1024]
            sims = self.content_similarity(space, rows, cand)
            top = torch.topk(sims, kk, dim=1)
            neighbours[start:start + len(rows)] = position[cand[top.indices]]
            w = torch.softmax(top.values / temperature, dim=1)  # -inf (nothing shared): 0
            weights[start:start + len(rows)] = torch.nan_to_num(w, nan=0.0)
        has_content = weights.sum(1) > 0
        weights[~has_content] = 0.0
        return CatalogueMap(position, unseen, neighbours, weights, has_content, False, n_fit)

    def _csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indptr [n_users + 1], items, weights) of the interactions grouped by user."""
        cached = self.__dict__.get("_csr_cache")
        if cached is None or cached[0] is not self.users:
            order = torch.argsort(self.users, stable=True)
            counts = torch.bincount(self.users, minlength=self.n_users)
            indptr = torch.zeros(self.n_users + 1, dtype=torch.long)
            indptr[1:] = torch.cumsum(counts, 0)
            cached = (self.users, indptr, self.items[order], self.weights[order])
            self.__dict__["_csr_cache"] = cached
        return cached[1], cached[2], cached[3]
