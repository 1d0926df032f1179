"""Classical ID-only rankers: most-popular, item-kNN and EASE (plus a seeded random baseline).

They learn from interaction IDs alone, so an item that was in the fitted catalogue without
training interactions (a cold item) cannot be scored: it gets ``-inf`` and never ranks
above a scored item. The catalogue may grow after fitting (serving passes the current
TrainingData): an item the model never saw is scored as the similarity-weighted mean of
the scores of its nearest fitted, scorable items in content space
(TrainingData.catalogue_map); one with no content vectors gets the row's smallest finite
score (defined, ranked last). A history item the model never saw counts as its content
neighbours, by their weights. Items are matched to the fitted ones by id, never by
position (states saved before the ids were kept assume the fitted items come first). Any option
given as a list is a grid, tuned on a validation split carved from the training data
(polyrec.rank.evaluation.tune_on_validation; under the cold-item protocol the per-user random
one, since cold validation items say nothing about an ID-only model); the chosen values
are recorded in ``info``.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from polyrec import ConfigError, ModelNotTrainedError, Ranker, TrainingData, hookimpl

#: EASE's default regularisation grid, tuned on validation.
EASE_L2_GRID = [10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0]
#: Item-kNN's default grids (neighbourhood size, shrinkage), tuned on validation.
KNN_NEIGHBOR_GRID = [20, 50, 100, 200]
KNN_SHRINK_GRID = [0.0, 10.0, 50.0]
#: Above this many items the dense item x item models refuse to fit.
MAX_DENSE_ITEMS = 40_000


class _IdRanker(Ranker):
    """Shared parts: tuning of list-valued options, the known-item mask, state checks."""

    handles_cold_items: ClassVar[bool] = False
    #: Options that may be given as a grid (a list) and are then tuned on validation.
    tunable: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {"metric": "ndcg@20"}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.metric = str(options.pop("metric", "ndcg@20"))
        self.params = {**self.defaults, **options}
        self.known: torch.Tensor | None = None  # bool [n_items]: items seen in training
        self.item_ids: list[int] | None = None  # internal ids of the fitted items
        self.info: dict[str, Any] = {}

    def fit(self, data: TrainingData) -> None:
        grid = {k: v for k, v in self.params.items() if k in self.tunable and isinstance(v, (list, tuple))}
        chosen = dict(self.params)
        if grid:
            from polyrec import tune_on_validation
            best, tried = tune_on_validation(lambda p: type(self)(**{**self.params, **p}), grid,
                                             data, metric=self.metric, warm_only=True)
            chosen.update(best)
            proto = data.protocol.get("split", "random")
            self.info = {"tuned_on": "validation", "metric": self.metric, "chosen": best,
                         "validation_split": "random" if proto == "cold" else proto, "grid": tried}
        else:
            self.info = {"chosen": {k: chosen[k] for k in self.tunable if k in chosen}}
        self.chosen = chosen
        self.known = data.item_counts() > 0
        self.item_ids = list(data.item_ids)
        self._fit(data, chosen)

    def refit(self, data: TrainingData) -> None:
        """Fit on ``data`` with the parameters the last ``fit`` chose (no tuning)."""
        chosen = getattr(self, "chosen", None)
        if chosen is None:
            self.fit(data)
            return
        self.known = data.item_counts() > 0
        self.item_ids = list(data.item_ids)
        self._fit(data, chosen)
        self.info = {**self.info, "refit": True}

    def _fit(self, data: TrainingData, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def _check(self) -> torch.Tensor:
        if self.known is None:
            raise ModelNotTrainedError(f"ranker '{self.name}' is not fitted")
        return self.known

    def _catalogue(self, data: TrainingData):
        """Where ``data``'s items sit among the fitted ones, with content neighbours
        (among the fitted items this ranker can score) for the items it never saw."""
        known = self._check()
        return data.catalogue_map(self.item_ids, reference=known, n_fitted=len(known))

    def _finish(self, scores: torch.Tensor, cmap: Any = None) -> torch.Tensor:
        """Scores over the fitted items -> over ``cmap``'s catalogue. Cold (unknown)
        fitted items get -inf: this ranker cannot score them; unseen items get their
        content neighbours' weighted mean (row minimum when they have no content)."""
        scores = scores.float()
        scores[:, ~self._check()] = -math.inf
        return scores if cmap is None else cmap.from_fitted(scores)

    def state(self) -> dict[str, Any]:
        return {"known": self._check(), "chosen": self.chosen, "info": self.info,
                "item_ids": list(self.item_ids) if self.item_ids is not None else None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.known = state["known"]
        ids = state.get("item_ids")  # absent in states saved before the catalogue could grow
        self.item_ids = [int(i) for i in ids] if ids is not None else None
        self.chosen = dict(state["chosen"])
        self.info = dict(state.get("info") or {})


class PopularRanker(_IdRanker):
    """Most popular: every user gets the items with the most training interactions."""

    name = "popular"

    def _fit(self, data: TrainingData, params: dict[str, Any]) -> None:
        self.counts = data.item_counts().float()

    def score_users(self, user_index: torch.Tensor, data: TrainingData) -> torch.Tensor:
        cmap = self._catalogue(data)
        return self._finish(self.counts.expand(len(user_index), -1).clone(), cmap)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "counts": self.counts}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.counts = state["counts"]


class ItemKNNRanker(_IdRanker):
    """Item-based kNN: cosine similarity of items' user sets with shrinkage,
    sim(i, j) = |U_i & U_j| / (sqrt(|U_i|) sqrt(|U_j|) + shrink), keeping each item's
    ``neighbors`` most similar items. score(u, j) = sum over u's items i of sim(i, j)."""

    name = "itemknn"
    tunable = ("neighbors", "shrink")
    defaults = {"neighbors": KNN_NEIGHBOR_GRID, "shrink": KNN_SHRINK_GRID, "block": 2048,
                "metric": "ndcg@20"}

    def _fit(self, data: TrainingData, params: dict[str, Any]) -> None:
        n = data.n_items
        if n > MAX_DENSE_ITEMS:
            raise ConfigError(f"itemknn builds item blocks of {n} items; more than {MAX_DENSE_ITEMS} is too many")
        k = max(1, min(int(params["neighbors"]), n - 1)) if n > 1 else 1
        shrink = float(params["shrink"])
        x = torch.zeros(data.n_users, n)
        x[data.users, data.items] = 1.0
        norms = x.sum(0).sqrt()
        rows_i, cols_j, vals = [], [], []
        for start in range(0, n, int(params["block"])):  # target items j in blocks
            stop = min(start + int(params["block"]), n)
            co = x.T @ x[:, start:stop]  # [n, block]: co-counts of every i with j
            sim = co / (norms[:, None] * norms[None, start:stop] + shrink + 1e-12)
            sim[torch.arange(start, stop), torch.arange(stop - start)] = 0.0
            top = torch.topk(sim, k, dim=0)
            keep = top.values > 0
            j = torch.arange(start, stop).expand(k, -1)
            rows_i.append(top.indices[keep])
            cols_j.append(j[keep])
            vals.append(top.values[keep])
        self.neighbors = (torch.cat(rows_i), torch.cat(cols_j), torch.cat(vals))
        self._build(n)

    def _build(self, n: int) -> None:
        i, j, v = self.neighbors
        # stored transposed (j, i) so scores = (S^T @ X^T)^T with one sparse product
        self._sim_t = torch.sparse_coo_tensor(torch.stack([j, i]), v, (n, n),
                                              check_invariants=False).coalesce()

    def score_users(self, user_index: torch.Tensor, data: TrainingData) -> torch.Tensor:
        cmap = self._catalogue(data)
        hist = cmap.to_fitted(data.history(user_index))
        return self._finish(torch.sparse.mm(self._sim_t, hist.T).T, cmap)

    def state(self) -> dict[str, Any]:
        i, j, v = self.neighbors
        return {**super().state(), "i": i, "j": j, "v": v}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.neighbors = (state["i"], state["j"], state["v"])
        self._build(len(self.known))


class EASERanker(_IdRanker):
    """EASE (Steck 2019): the closed-form item-item model
    B = I - P diagMat(1 / diag(P)), P = (X^T X + l2 I)^-1; score(u) = x_u B.
    ``l2`` is tuned on validation over :data:`EASE_L2_GRID` unless a number is given."""

    name = "ease"
    tunable = ("l2",)
    defaults = {"l2": EASE_L2_GRID, "metric": "ndcg@20"}

    def _fit(self, data: TrainingData, params: dict[str, Any]) -> None:
        n = data.n_items
        if n > MAX_DENSE_ITEMS:
            raise ConfigError(f"EASE inverts an item x item matrix; {n} items is more than {MAX_DENSE_ITEMS}")
        l2 = float(params["l2"])
        if l2 <= 0:
            raise ConfigError(f"EASE's l2 must be positive, not {l2}")
        x = torch.zeros(data.n_users, n, dtype=torch.float64)
        x[data.users, data.items] = 1.0
        gram = x.T @ x
        gram.diagonal().add_(l2)
        p = torch.linalg.inv(gram)
        b = -p / p.diagonal()[None, :]
        b.diagonal().zero_()
        self.l2 = l2
        self.weights = b.float()

    def score_users(self, user_index: torch.Tensor, data: TrainingData) -> torch.Tensor:
        cmap = self._catalogue(data)
        return self._finish(cmap.to_fitted(data.history(user_index)) @ self.weights, cmap)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "weights": self.weights, "l2": self.l2}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.weights, self.l2 = state["weights"], float(state["l2"])


class RandomRanker(Ranker):
    """Uniformly random scores, fixed per (seed, user): the chance level.
    It 'scores' every item, cold ones included."""

    name = "random"
    handles_cold_items = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.seed = int(options.get("seed", 0))
        self.info: dict[str, Any] = {}

    def fit(self, data: TrainingData) -> None:
        self.n_items = data.n_items

    def score_users(self, user_index: torch.Tensor, data: TrainingData) -> torch.Tensor:
        gen = torch.Generator()
        rows = []
        for u in user_index.tolist():
            gen.manual_seed(self.seed * 1_000_003 + int(u))
            rows.append(torch.rand(data.n_items, generator=gen))
        return torch.stack(rows) if rows else torch.empty(0, data.n_items)

    def state(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])


@hookimpl
def register_rankers(register) -> None:
    register(PopularRanker)
    register(ItemKNNRanker)
    register(EASERanker)
    register(RandomRanker)
