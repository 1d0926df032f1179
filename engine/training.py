"""Training data shared by every ranker: dense index maps and interaction tensors.

Rankers see users and items as dense indices 0..n-1; ``user_ids[u]`` and ``item_ids[i]``
give the store's internal ids back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
