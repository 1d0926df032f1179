"""Training data shared by every ranker: dense index maps and interaction tensors.

Rankers see users and items as dense indices 0..n-1; ``user_ids[u]`` and ``item_ids[i]``
give the store's internal ids back.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


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
    #: How this data was split from the full data ({"split": "random", "seed": 0, ...});
    #: polyrec.rank.evaluation.validation_split carves validation data with the same protocol.
    protocol: dict[str, Any] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
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
        order = torch.argsort(self.users, stable=True)
        counts = torch.bincount(self.users, minlength=self.n_users).tolist()
        return list(torch.split(self.items[order], counts))

    def item_counts(self) -> torch.Tensor:
        """Interactions per item index (long [n_items]); zero marks a cold item."""
        return torch.bincount(self.items, minlength=self.n_items)

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
