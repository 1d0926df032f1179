"""Classical ID-only rankers: most-popular, item-kNN, EASE, EDLAE and RP3beta (plus a seeded
random baseline).

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

from polyrec import ConfigError, ModelNotTrainedError, Option, Ranker, TrainingData, hookimpl

#: EASE's default regularisation grid, tuned on validation.
EASE_L2_GRID = [10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0]
#: Item-kNN's default grids (neighbourhood size, shrinkage), tuned on validation.
KNN_NEIGHBOR_GRID = [20, 50, 100, 200]
KNN_SHRINK_GRID = [0.0, 10.0, 50.0]
#: EDLAE's default grids (constant regularisation, dropout probability), tuned on validation.
EDLAE_L2_GRID = [10.0, 50.0, 200.0, 500.0]
EDLAE_DROPOUT_GRID = [0.1, 0.25, 0.5]
#: EASE-with-side-information's default grids (l2, weight of the content pseudo-users,
#: EDLAE's dropout), narrowed on the docs split (docs/evaluation.md, "Pushing quality").
SIDE_L2_GRID = [200.0, 500.0]
SIDE_WEIGHT_GRID = [50.0, 100.0]
SIDE_DROPOUT_GRID = [0.25, 0.5]
#: RP3beta's default grids (transition exponent, popularity penalty), tuned on validation.
RP3_ALPHA_GRID = [0.5, 1.0]
RP3_BETA_GRID = [0.0, 0.2, 0.4, 0.6]
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
        self.params = {**self.default_options(), **options}
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


def _binary_matrix(data: TrainingData, what: str) -> torch.Tensor:
    """The float64 user x item 0/1 matrix of ``data`` (refusing catalogues too big for
    the dense item x item models)."""
    if data.n_items > MAX_DENSE_ITEMS:
        raise ConfigError(f"{what} builds an item x item matrix; {data.n_items} items is more "
                          f"than {MAX_DENSE_ITEMS}")
    x = torch.zeros(data.n_users, data.n_items, dtype=torch.float64)
    x[data.users, data.items] = 1.0
    return x


def edlae_weights(gram: torch.Tensor, l2: float, dropout: float, *,
                  zero_diagonal: bool = True) -> torch.Tensor:
    """EDLAE's closed form (Steck 2020, "Autoencoders that don't overfit towards the
    identity") for the Gram matrix G = X^T X: dropout with probability p is
    marginalised into the item-specific penalty Lambda = p / (1 - p) diag(G) + l2 I.
    ``zero_diagonal``: B = I - P diagMat(1 / diag(P)) with P = (G + Lambda)^-1 (EASE with
    Lambda in place of l2 I, the emphasised-denoising limit); else the denoising
    autoencoder B = (G + Lambda)^-1 G = I - P Lambda, whose diagonal is free."""
    if not 0 <= dropout < 1:
        raise ConfigError(f"EDLAE's dropout must be in [0, 1), not {dropout}")
    if l2 <= 0:
        raise ConfigError(f"EDLAE's l2 must be positive, not {l2}")
    lam = dropout / (1.0 - dropout) * gram.diagonal() + l2
    p = torch.linalg.inv(gram + torch.diag(lam))
    if zero_diagonal:
        b = -p / p.diagonal()[None, :]
        b.diagonal().zero_()
        return b
    b = -p * lam[None, :]
    b.diagonal().add_(1.0)
    return b


class EDLAERanker(EASERanker):
    """EDLAE (Steck 2020): EASE whose penalty also grows with each item's popularity,
    Lambda = dropout / (1 - dropout) diag(X^T X) + l2 I, the closed form of a linear
    autoencoder trained with input dropout (:func:`edlae_weights`). ``l2`` and
    ``dropout`` are tuned on validation over their grids unless numbers are given;
    ``zero_diagonal`` (default true) keeps EASE's constraint diag(B) = 0, false gives the
    denoising autoencoder's own closed form."""

    name = "edlae"
    tunable = ("l2", "dropout")
    defaults = {"l2": EDLAE_L2_GRID, "dropout": EDLAE_DROPOUT_GRID, "zero_diagonal": True,
                "metric": "ndcg@20"}

    def _gram(self, x: torch.Tensor, data: TrainingData, params: dict[str, Any]) -> torch.Tensor:
        return x.T @ x

    def _fit(self, data: TrainingData, params: dict[str, Any]) -> None:
        x = _binary_matrix(data, self.name)
        self.l2 = float(params["l2"])
        self.weights = edlae_weights(self._gram(x, data, params), self.l2,
                                     float(params.get("dropout") or 0.0),
                                     zero_diagonal=bool(params.get("zero_diagonal", True))).float()


def content_gram(data: TrainingData, modalities: list[str] | None = None) -> torch.Tensor:
    """The sum over the modalities (all when None) of U U^T (float64 [n, n]), U the unit
    item vectors of ``data.item_features`` with a zero row for an item without one: the
    Gram matrix of the content dimensions taken as pseudo-users (positive semi-definite,
    1 on the diagonal of an item with a vector)."""
    out = torch.zeros(data.n_items, data.n_items, dtype=torch.float64)
    for m, (vec, present) in sorted(data.item_features.items()):
        if modalities is None or m in modalities:
            unit = torch.nn.functional.normalize(vec.double(), dim=-1) * present[:, None].double()
            out += unit @ unit.T
    return out


class SideEASERanker(EDLAERanker):
    """EASE with item side information ("collective" EASE) and EDLAE's penalty: the item
    content vectors join the interactions as pseudo-users, X' = [X; sqrt(side) U^T], so
    the Gram matrix becomes X^T X + side * U U^T (:func:`content_gram` over
    ``modalities``, default the text vectors) and items with few interactions borrow
    weights from their content neighbours; the penalty is :func:`edlae_weights`' with
    ``dropout`` (0: EASE's l2 I) and, by default, a free diagonal. ``l2``, ``side`` and
    ``dropout`` are tuned on validation over their grids unless numbers are given
    (side 0, dropout 0 and zero_diagonal true is plain EASE); with no vectors of the
    modalities in the data, side is 0. The default ``hybrid``'s scorer."""

    name = "ease_side"
    tunable = ("l2", "side", "dropout")
    defaults = {"l2": SIDE_L2_GRID, "side": SIDE_WEIGHT_GRID, "dropout": SIDE_DROPOUT_GRID,
                "zero_diagonal": False,
                "modalities": Option(["text"], str, grid=True,
                                     help='modality names, one name, or "all"'),
                "metric": "ndcg@20"}

    def _modalities(self, data: TrainingData) -> list[str]:
        """The modalities of ``data`` whose vectors join the Gram matrix: ``modalities``
        is a list of names, one name (``--set modalities=kg``) or "all"."""
        wanted = self.params.get("modalities")
        if isinstance(wanted, str):
            wanted = None if wanted == "all" else [wanted]
        return [m for m in sorted(data.item_features) if wanted is None or m in wanted]

    def fit(self, data: TrainingData) -> None:
        if self._modalities(data):
            super().fit(data)
            return
        params = self.params  # nothing to add to the Gram matrix: no side grid to tune
        self.params = {**params, "side": 0.0}
        try:
            super().fit(data)
        finally:
            self.params = params

    def _gram(self, x: torch.Tensor, data: TrainingData, params: dict[str, Any]) -> torch.Tensor:
        gram = x.T @ x
        side = float(params["side"])
        if side < 0:
            raise ConfigError(f"ease_side's side weight must be non-negative, not {side}")
        mods = self._modalities(data)
        return gram + side * content_gram(data, mods) if side and mods else gram


def rp3beta_weights(x: torch.Tensor, alpha: float, beta: float, neighbors: int) -> torch.Tensor:
    """RP3beta (Paudel et al. 2017): the 3-step random walk item -> user -> item with
    transition probabilities raised to ``alpha``, divided by the target item's
    popularity to the power ``beta``; each item keeps its ``neighbors`` largest weights
    (dense [n, n], zero diagonal). ``alpha`` must be positive (0 ** 0 would make every
    pair a step of the walk)."""
    if not alpha > 0:
        raise ConfigError(f"RP3beta's alpha must be positive, not {alpha}")
    deg_u = x.sum(1).clamp(min=1.0)
    deg_i = x.sum(0)
    w = (x / deg_i.clamp(min=1.0)[None, :]).pow(alpha).T @ (x / deg_u[:, None]).pow(alpha)
    w = w / deg_i.clamp(min=1.0).pow(beta)[None, :]
    w.diagonal().zero_()
    k = max(1, min(int(neighbors), w.shape[1] - 1)) if w.shape[1] > 1 else 1
    top = torch.topk(w, k, dim=1)
    return torch.zeros_like(w).scatter_(1, top.indices, top.values)


class RP3betaRanker(_IdRanker):
    """RP3beta: score(u, j) = sum over u's items i of W[i, j], W the popularity-penalised
    3-step random walk of :func:`rp3beta_weights`. ``alpha`` and ``beta`` are tuned on
    validation over their grids unless numbers are given."""

    name = "rp3beta"
    tunable = ("alpha", "beta")
    defaults = {"alpha": RP3_ALPHA_GRID, "beta": RP3_BETA_GRID, "neighbors": 200,
                "metric": "ndcg@20"}

    def _fit(self, data: TrainingData, params: dict[str, Any]) -> None:
        x = _binary_matrix(data, self.name)
        self.weights = rp3beta_weights(x, float(params["alpha"]), float(params["beta"]),
                                       int(params["neighbors"])).float()

    def score_users(self, user_index: torch.Tensor, data: TrainingData) -> torch.Tensor:
        cmap = self._catalogue(data)
        return self._finish(cmap.to_fitted(data.history(user_index)) @ self.weights, cmap)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "weights": self.weights}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.weights = state["weights"]


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
    register(EDLAERanker)
    register(SideEASERanker)
    register(RP3betaRanker)
    register(RandomRanker)
