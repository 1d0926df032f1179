"""The ensemble ranker: a weighted sum of member rankers' per-user standardised scores.

Members are given by name and options (``members=["ease", {"name": "itemknn", "options":
{"neighbors": 100}}]``) and built from the engine's ranker registry through the
``factory`` that polyrec.rank.evaluation.make_ranker supplies. Weights are chosen on a
validation split carved from the training data (a grid over per-member weights), then
the members are refitted on all of the training data. An item a member cannot score
(``-inf``) gets no contribution from that member, so cold items are scored by the members
that handle them; the ensemble handles cold items when any member does.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, ClassVar, Sequence

import torch

from polyrec import ConfigError, ModelNotTrainedError, Ranker, TrainingData, hookimpl

#: Per-member weights tried on validation (all-zero and scaled duplicates are skipped).
WEIGHT_GRID = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """Per-row z-scores over the finite entries; non-finite entries become NaN."""
    finite = torch.isfinite(scores)
    vals = torch.where(finite, scores, torch.zeros_like(scores)).double()
    n = finite.sum(1, keepdim=True).clamp(min=1)
    mean = vals.sum(1, keepdim=True) / n
    var = (torch.where(finite, vals - mean, torch.zeros_like(vals)) ** 2).sum(1, keepdim=True) / n
    z = (vals - mean) / var.sqrt().clamp(min=1e-12)
    return torch.where(finite, z, torch.full_like(z, math.nan)).float()


def combine(zs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_m w_m z_m over the members that scored an item; -inf where none did."""
    total = torch.zeros_like(zs[0])
    scored = torch.zeros_like(zs[0], dtype=torch.bool)
    for z, w in zip(zs, weights):
        ok = ~torch.isnan(z)
        if w != 0:
            total = total + torch.where(ok, z * w, torch.zeros_like(z))
        scored |= ok
    return torch.where(scored, total, torch.full_like(total, -math.inf))


def weight_grid(n_members: int, grid: Sequence[float] = WEIGHT_GRID) -> list[tuple[float, ...]]:
    """Weight vectors over ``grid``, without the all-zero one and without vectors that
    are a positive multiple of an earlier one (the ranking would be identical)."""
    out: list[tuple[float, ...]] = []
    seen: set[tuple[float, ...]] = set()
    for combo in itertools.product(grid, repeat=n_members):
        total = sum(combo)
        if total <= 0:
            continue
        key = tuple(round(c / total, 6) for c in combo)
        if key not in seen:
            seen.add(key)
            out.append(tuple(float(c) for c in combo))
    return out


class EnsembleRanker(Ranker):
    """Weighted sum of standardised member scores, weights tuned on validation.

    Options: ``members`` (names, {"name", "options"} dicts or Ranker instances),
    ``weights`` (fixed weights: no tuning), ``grid`` (per-member weight values),
    ``metric`` (validation metric, default ndcg@20), ``refit`` (refit members on all
    training data after tuning, default true), ``factory`` (supplied by make_ranker).
    """

    name = "ensemble"
    #: make_ranker passes ``factory`` to composite rankers.
    composite: ClassVar[bool] = True
    #: Members used when the ``members`` option is absent (for preset subclasses).
    default_members: ClassVar[list[Any]] = []

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        factory: Callable[..., Ranker] | None = options.get("factory")
        specs = options.get("members", self.default_members)
        if isinstance(specs, str):
            specs = [s for s in specs.split("+") if s.strip()]
        if not specs:
            raise ConfigError("the ensemble needs at least one member (option 'members')")
        self.members: list[Ranker] = []
        self.member_specs: list[dict[str, Any]] = []
        for spec in specs:
            if isinstance(spec, Ranker):
                self.members.append(spec)
                self.member_specs.append({"name": spec.name, "options": dict(spec.options)})
                continue
            if isinstance(spec, str):
                spec = {"name": spec.strip(), "options": {}}
            if not isinstance(spec, dict) or "name" not in spec:
                raise ConfigError(f"ensemble member {spec!r} must be a name, a dict with 'name' "
                                  "(and 'options') or a Ranker")
            if factory is None:
                raise ConfigError("ensemble members given by name need a factory; build the "
                                  "ensemble with engine.evaluation.make_ranker")
            self.members.append(factory(spec["name"], dict(spec.get("options") or {})))
            self.member_specs.append({"name": spec["name"], "options": dict(spec.get("options") or {})})
        self.handles_cold_items = any(getattr(m, "handles_cold_items", False) for m in self.members)
        fixed = options.get("weights")
        if fixed is not None and len(fixed) != len(self.members):
            raise ConfigError(f"{len(fixed)} weights for {len(self.members)} ensemble members")
        self.fixed = [float(w) for w in fixed] if fixed is not None else None
        self.grid = [float(g) for g in options.get("grid", WEIGHT_GRID)]
        self.metric = str(options.get("metric", "ndcg@20"))
        self.refit_members = bool(options.get("refit", True))
        self.weights: list[float] | None = None
        self.info: dict[str, Any] = {}

    def _labels(self) -> list[str]:
        return [s["name"] for s in self.member_specs]

    def fit(self, data: TrainingData) -> None:
        if self.fixed is not None or len(self.members) == 1:
            self.weights = self.fixed or [1.0]
            for m in self.members:
                m.fit(data)
            self.info = {"weights": dict(zip(self._labels(), self.weights))}
            return
        from polyrec import validation_split
        val = validation_split(data)
        for m in self.members:
            m.fit(val.train)
        candidates = weight_grid(len(self.members), self.grid)
        results = self._validate(val, candidates)
        best = max(range(len(candidates)), key=lambda c: (results[c], -c))
        self.weights = list(candidates[best])
        member_info = [dict(getattr(m, "info", {}) or {}) for m in self.members]
        if self.refit_members:  # on all the data, with what validation chose
            for m in self.members:
                m.refit(data)
            member_info = [dict(getattr(m, "info", {}) or {}) for m in self.members]
        self.info = {"tuned_on": "validation", "metric": self.metric,
                     "weights": dict(zip(self._labels(), self.weights)),
                     "grid": [{"weights": list(c), self.metric: r} for c, r in zip(candidates, results)],
                     "members": dict(zip(self._labels(), member_info))}

    def refit(self, data: TrainingData) -> None:
        """Refit every member on ``data`` with what it chose; the weights stay."""
        if self.weights is None:
            self.fit(data)
            return
        for m in self.members:
            m.refit(data)

    def _validate(self, val: Any, candidates: list[tuple[float, ...]]) -> list[float]:
        """Mean validation ``metric`` of every weight vector, scoring members once per batch."""
        from polyrec import mask_scores, user_metrics
        _, _, k = self.metric.partition("@")
        ks = [int(k)] if k else [20]
        users = val.eval_users
        train_items = val.train.user_items()
        totals = [0.0] * len(candidates)
        for start in range(0, len(users), 256):
            batch = users[start:start + 256]
            with torch.no_grad():
                zs = [standardise(m.score_users(batch, val.train).detach().float().cpu())
                      for m in self.members]
            relevant = torch.zeros(len(batch), val.train.n_items, dtype=torch.bool)
            for r, u in enumerate(batch.tolist()):
                relevant[r, val.test[u]] = True
            for c, weights in enumerate(candidates):
                scores = mask_scores(combine(zs, weights), batch, train_items, val.candidates)
                per_user, _ = user_metrics(scores, relevant, ks)
                if self.metric not in per_user:
                    raise ConfigError(f"unknown tuning metric '{self.metric}'")
                totals[c] += float(per_user[self.metric].sum())
        return [t / max(len(users), 1) for t in totals]

    def components(self) -> list[tuple[str, Ranker]]:
        """The members, labelled by ranker name (their scores explain the blend)."""
        return [(spec["name"], m) for spec, m in zip(self.member_specs, self.members)]

    def score_users(self, user_index: torch.Tensor, data: TrainingData) -> torch.Tensor:
        if self.weights is None:
            raise ModelNotTrainedError("the ensemble is not fitted")
        zs = [standardise(m.score_users(user_index, data).detach().float().cpu()) for m in self.members]
        return combine(zs, self.weights)

    def state(self) -> dict[str, Any]:
        if self.weights is None:
            raise ModelNotTrainedError("the ensemble is not fitted")
        return {"weights": self.weights, "info": self.info,
                "members": [{**spec, "state": m.state()}
                            for spec, m in zip(self.member_specs, self.members)]}

    def load_state(self, state: dict[str, Any]) -> None:
        stored = [m["name"] for m in state["members"]]
        if stored != self._labels():
            raise ConfigError(f"stored ensemble has members {stored}, this one {self._labels()}")
        for m, s in zip(self.members, state["members"]):
            m.load_state(s["state"])
        self.weights = [float(w) for w in state["weights"]]
        self.info = dict(state.get("info") or {})


@hookimpl
def register_rankers(register) -> None:
    register(EnsembleRanker)
