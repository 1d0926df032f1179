"""Offline evaluation: splits, full-ranking metrics, and several rankers in one table.

Splits (all seeded, all over the same dense user/item index as the full data):

- ``random``: per user, a random ``test_share`` of the user's positives is held out;
  users with fewer than ``min_positives`` positives stay entirely in training.
- ``time``: leave-last-out, each user's latest positive is held out (same minimum).
- ``cold``: a share of the items with interactions becomes cold: ALL their interactions
  are held out, and by default only those items are candidates for ranking.

Rankers are fitted on ``split.train``; a ranker that tunes itself carves its validation
data from that with :func:`validation_split` (the same protocol applied to the training
data, never the test data). Metrics rank the whole catalogue (or the split's candidates)
with each user's training items masked; an item scored ``-inf`` (a ranker that cannot
score it) is never counted as recommended.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch

from polyrec.contracts import Ranker
from polyrec.errors import ConfigError, PluginError
from polyrec.progress import progress_bar, stage
from polyrec.training_data import TrainingData

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine
    from polyrec.plugin_host import Registry

SPLITS = ("random", "time", "cold")
DEFAULT_KS = (10, 20)


# -- splits -------------------------------------------------------------------------------
@dataclass
class Split:
    """Training data plus what was held out.

    ``test[u]`` holds the held-out item indices of user ``u`` (empty when none);
    ``candidates`` (bool [n_items]) marks the items a ranking may contain (None: all);
    ``cold_items`` lists the item indices whose interactions were all held out.
    """

    name: str
    train: TrainingData
    test: list[torch.Tensor]
    candidates: torch.Tensor | None = None
    cold_items: torch.Tensor | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_users(self) -> torch.Tensor:
        """User indices with at least one held-out item (ascending)."""
        return torch.tensor([u for u, t in enumerate(self.test) if len(t)], dtype=torch.long)

    @property
    def n_test(self) -> int:
        return sum(len(t) for t in self.test)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary of the split."""
        out = {"split": self.name, **self.params, "users": self.train.n_users,
               "items": self.train.n_items, "train_interactions": len(self.train.users),
               "test_interactions": self.n_test, "eval_users": len(self.eval_users)}
        if self.cold_items is not None:
            out["cold_items"] = len(self.cold_items)
        if self.candidates is not None:
            out["n_candidates"] = int(self.candidates.sum())
        return out


def _per_user(data: TrainingData, held: torch.Tensor) -> list[torch.Tensor]:
    """Held-out item indices per user from a bool mask over the interactions."""
    users, items = data.users[held], data.items[held]
    order = torch.argsort(users, stable=True)
    counts = torch.bincount(users, minlength=data.n_users).tolist()
    return list(torch.split(items[order], counts))


def _rank_within_user(users: torch.Tensor, keys: torch.Tensor, n_users: int) -> torch.Tensor:
    """Position (0-based) of each interaction among its user's, ordered by ``keys``."""
    order = torch.argsort(keys, stable=True)
    order = order[torch.argsort(users[order], stable=True)]  # by user, then key
    counts = torch.bincount(users, minlength=n_users)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(order)
    pos[order] = torch.arange(len(order)) - starts[users[order]]
    return pos


def random_split(data: TrainingData, *, test_share: float = 0.2, min_positives: int = 5,
                 seed: int = 0) -> Split:
    """Hold out a random ``test_share`` (rounded, at least one) of each user's positives;
    users with fewer than ``min_positives`` positives keep all of theirs in training."""
    if not 0 < test_share < 1:
        raise ConfigError(f"test share must be between 0 and 1, not {test_share}")
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(len(data.users), generator=gen)
    pos = _rank_within_user(data.users, keys, data.n_users)
    counts = torch.bincount(data.users, minlength=data.n_users)
    n_test = torch.clamp(torch.floor(counts * test_share + 0.5), min=1).long()
    n_test[counts < min_positives] = 0
    held = pos < n_test[data.users]
    params = {"test_share": test_share, "min_positives": min_positives, "seed": seed}
    return Split("random", data.subset(~held, split="random", **params), _per_user(data, held),
                 params=params)


def time_split(data: TrainingData, *, n_last: int = 1, min_positives: int = 5,
               seed: int = 0, test_share: float | None = None) -> Split:
    """Leave-last-out: each user's ``n_last`` latest positives are held out (ties broken
    by item index); with ``test_share`` the latest share of each user's positives
    (rounded, at least one) instead. Users with fewer than ``min_positives`` stay in
    training."""
    if n_last < 1:
        raise ConfigError(f"n_last must be at least 1, not {n_last}")
    if test_share is not None and not 0 < test_share < 1:
        raise ConfigError(f"test share must be between 0 and 1, not {test_share}")
    order = torch.argsort(data.items, descending=True, stable=True)
    order = order[torch.argsort(data.ts[order], descending=True, stable=True)]
    keys = torch.empty_like(order)
    keys[order] = torch.arange(len(order))  # 0 = latest interaction overall
    pos = _rank_within_user(data.users, keys, data.n_users)
    counts = torch.bincount(data.users, minlength=data.n_users)
    eligible = counts >= min_positives
    if test_share is None:
        n_test = torch.full_like(counts, n_last)
        params: dict[str, Any] = {"n_last": n_last, "min_positives": min_positives, "seed": seed}
    else:
        n_test = torch.clamp(torch.floor(counts * test_share + 0.5), min=1).long()
        params = {"test_share": test_share, "min_positives": min_positives, "seed": seed}
    held = (pos < n_test[data.users]) & eligible[data.users]
    return Split("time", data.subset(~held, split="time", **params), _per_user(data, held),
                 params=params)


def cold_item_split(data: TrainingData, *, item_share: float = 0.2, seed: int = 0,
                    candidates: str = "cold") -> Split:
    """Make ``item_share`` of the items that have interactions cold: all their
    interactions are held out. ``candidates``: 'cold' ranks only the cold items (the
    cold-start protocol), 'all' the whole catalogue."""
    if not 0 < item_share < 1:
        raise ConfigError(f"item share must be between 0 and 1, not {item_share}")
    if candidates not in ("cold", "all"):
        raise ConfigError(f"candidates must be 'cold' or 'all', not '{candidates}'")
    gen = torch.Generator().manual_seed(seed)
    active = torch.nonzero(data.item_counts() > 0).flatten()
    n_cold = int(math.floor(len(active) * item_share + 0.5))
    cold = torch.sort(active[torch.randperm(len(active), generator=gen)[:n_cold]]).values
    is_cold = torch.zeros(data.n_items, dtype=torch.bool)
    is_cold[cold] = True
    held = is_cold[data.items]
    params = {"item_share": item_share, "seed": seed, "candidates": candidates}
    return Split("cold", data.subset(~held, split="cold", **params), _per_user(data, held),
                 candidates=is_cold if candidates == "cold" else None, cold_items=cold,
                 params=params)


SPLIT_FUNCTIONS: dict[str, Callable[..., Split]] = {
    "random": random_split, "time": time_split, "cold": cold_item_split}


def make_split(data: TrainingData, name: str = "random", *, seed: int = 0,
               **params: Any) -> Split:
    """Split ``data`` by protocol name ('random', 'time' or 'cold')."""
    if name not in SPLIT_FUNCTIONS:
        raise ConfigError(f"unknown split '{name}' (choose from {', '.join(SPLITS)})")
    return SPLIT_FUNCTIONS[name](data, seed=seed, **params)


def validation_split(train: TrainingData, *, seed: int | None = None,
                     warm_only: bool = False) -> Split:
    """Validation data carved from training data with the protocol that produced it
    (``train.protocol``; per-user random 80/20 when it has none). The seed defaults to
    the protocol's seed + 1, so validation never repeats the test draw. ``warm_only``
    turns a cold-item protocol into the per-user random one: a ranker that cannot score
    cold items learns nothing from cold validation items."""
    proto = dict(train.protocol)
    name = proto.pop("split", "random")
    base = proto.pop("seed", 0)
    if name == "cold":
        proto.pop("candidates", None)
        if warm_only:
            name, proto = "random", {}
    return make_split(train, name, seed=base + 1 if seed is None else seed, **proto)


# -- metrics ------------------------------------------------------------------------------
def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [b, k] of each row's k best scores, best first, ties broken by the lower
    index: the first k columns of a stable descending argsort, without the full sort.

    One ``topk`` of k + 1 per row decides it where no tie crosses the k-th place; the
    rows where one does (unscored items at -inf, a user with all-equal scores) are
    settled by :func:`_top_k_ties`, which reads their whole row again."""
    n = scores.shape[1]
    k = min(k, n)
    vals, idx = torch.topk(scores, min(k + 1, n), dim=1)
    crossing = (vals[:, k] == vals[:, k - 1]) if k < n else \
        torch.ones(len(scores), dtype=torch.bool)
    vals, idx = vals[:, :k], idx[:, :k]
    by_index = torch.argsort(idx, dim=1)  # then stably by value: ties in index order
    vals, idx = torch.gather(vals, 1, by_index), torch.gather(idx, 1, by_index)
    idx = torch.gather(idx, 1, torch.argsort(vals, dim=1, descending=True, stable=True))
    rows = torch.nonzero(crossing).flatten()
    if len(rows):
        idx[rows] = _top_k_ties(scores[rows], k)
    return idx


def _top_k_ties(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`top_k` over whole rows (every item tied with the k-th best is looked at)."""
    threshold = torch.topk(scores, k, dim=1).values[:, -1:]
    above = scores > threshold
    tied = scores == threshold
    room = k - above.sum(1, keepdim=True, dtype=torch.int32)
    chosen = above | (tied & (torch.cumsum(tied, dim=1, dtype=torch.int32) <= room))
    idx = torch.nonzero(chosen)[:, 1].view(-1, k)  # index order within each row
    vals = torch.gather(scores, 1, idx)
    return torch.gather(idx, 1, torch.argsort(vals, dim=1, descending=True, stable=True))


def user_metrics(scores: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                 *, mrr: bool = True) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """Per-user metrics of full rankings.

    scores [b, n] (``-inf`` or NaN: not ranked), relevant bool [b, n]. Ties are broken
    by item index. Returns ({metric: [b]}, {k: top-k item indices [b, k], -1 where the
    ranking ran out of scored items}). Recall@K = hits / min(|relevant|, K); NDCG@K with
    binary gains and the ideal DCG of min(|relevant|, K) hits; MRR = 1 / rank of the
    first relevant item in the full ranking (0 when none is ranked; ``mrr`` False leaves
    it out: it reads every row twice more); HitRate@K = any hit.
    """
    scores = torch.nan_to_num(scores.float(), nan=-math.inf, posinf=math.inf,
                              neginf=-math.inf)
    n = scores.shape[1]
    order = top_k(scores, max(ks))
    ranked = torch.gather(scores, 1, order) > -math.inf
    hits_sorted = torch.gather(relevant, 1, order) & ranked
    n_rel = relevant.sum(1, dtype=torch.int32)
    out: dict[str, torch.Tensor] = {}
    tops: dict[int, torch.Tensor] = {}
    for k in ks:
        kk = min(k, n)
        top_hits = hits_sorted[:, :kk].float()
        hits = top_hits.sum(1)
        denom = torch.clamp(torch.minimum(n_rel, torch.tensor(k)), min=1).float()
        discounts = 1.0 / torch.log2(torch.arange(2, kk + 2, dtype=torch.float32))
        ideal = torch.cumsum(discounts, 0)
        n_ideal = torch.clamp(torch.minimum(n_rel, torch.tensor(kk)), min=1) - 1
        out[f"recall@{k}"] = hits / denom
        out[f"ndcg@{k}"] = (top_hits * discounts).sum(1) / ideal[n_ideal]
        out[f"hitrate@{k}"] = (hits > 0).float()
        tops[k] = torch.where(ranked[:, :kk], order[:, :kk], torch.full_like(order[:, :kk], -1))
    # MRR over the full ranking: the first relevant item is the one with the best score
    # (lowest index among equals); its rank counts the items ahead of it.
    if not mrr:
        return out, tops
    b = len(scores)
    rel_rows, rel_cols = torch.nonzero(relevant, as_tuple=True)
    rel_vals = scores[rel_rows, rel_cols]
    best = torch.full((b,), -math.inf).scatter_reduce(0, rel_rows, rel_vals, "amax")
    is_best = rel_vals == best[rel_rows]
    first_idx = torch.full((b,), n, dtype=torch.long).scatter_reduce(
        0, rel_rows[is_best], rel_cols[is_best], "amin")
    found = best > -math.inf
    ahead = (scores > best[:, None]).sum(1, dtype=torch.int32)  # int32: 2x faster sums
    # other items as good as the first relevant one count when their index is lower; the
    # rows that have any (rare with continuous scores) are looked at again
    level = (scores >= best[:, None]).sum(1, dtype=torch.int32) - ahead
    level = level - torch.bincount(rel_rows[is_best], minlength=b).to(torch.int32)
    tied = found & (first_idx > 0) & (level > 0)
    if bool(tied.any()):
        rows = torch.nonzero(tied).flatten()
        width = int(first_idx[rows].max())
        before = torch.arange(width)[None, :] < first_idx[rows, None]
        same = (scores[rows, :width] == best[rows, None]) & before
        ahead[rows] += same.sum(1, dtype=torch.int32)
    out["mrr"] = torch.where(found, 1.0 / (ahead + 1).float(), torch.zeros(b))
    return out, tops


def mask_scores(scores: torch.Tensor, users: torch.Tensor, train_items: list[torch.Tensor],
                candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Set each user's training items, and items outside ``candidates``, to ``-inf``."""
    scores = scores.float().clone()
    rows = [torch.full((len(train_items[u]),), r, dtype=torch.long)
            for r, u in enumerate(users.tolist())]
    if rows:
        cols = torch.cat([train_items[u] for u in users.tolist()])
        scores[torch.cat(rows), cols] = -math.inf
    if candidates is not None:
        scores[:, ~candidates] = -math.inf
    return scores


def evaluate_ranker(ranker: Ranker, split: Split, *, ks: Sequence[int] = DEFAULT_KS,
                    batch_size: int = 256, progress: bool = False,
                    desc: str | None = None) -> dict[str, float]:
    """Mean metrics of a fitted ranker over the split's evaluated users, plus catalogue
    coverage@K (share of candidate items in at least one user's top K)."""
    users = split.eval_users
    train_items = split.train.user_items()
    n_items = split.train.n_items
    sums: dict[str, float] = {}
    seen = {k: torch.zeros(n_items, dtype=torch.bool) for k in ks}
    batches = range(0, len(users), batch_size)
    for start in progress_bar(batches, desc=desc or f"evaluate {getattr(ranker, 'name', '')}",
                              unit="batch", enabled=progress, leave=False):
        batch = users[start:start + batch_size]
        with torch.no_grad():
            raw = checked_scores(ranker, ranker.score_users(batch, split.train), len(batch),
                               n_items)
        scores = mask_scores(raw.detach().cpu(), batch, train_items, split.candidates)
        relevant = torch.zeros(len(batch), n_items, dtype=torch.bool)
        for r, u in enumerate(batch.tolist()):
            relevant[r, split.test[u]] = True
        per_user, tops = user_metrics(scores, relevant, ks)
        for name, values in per_user.items():
            sums[name] = sums.get(name, 0.0) + float(values.sum())
        for k, top in tops.items():
            top = top[top >= 0]
            seen[k][top] = True
    n_users = max(len(users), 1)
    n_candidates = int(split.candidates.sum()) if split.candidates is not None else n_items
    result = {name: total / n_users for name, total in sums.items()}
    for k in ks:
        result[f"coverage@{k}"] = int(seen[k].sum()) / max(n_candidates, 1)
    return result


def checked_scores(ranker: Ranker, scores: Any, n_users: int, n_items: int,
                 plugin: str | None = None) -> torch.Tensor:
    """``scores`` when it is a tensor [n_users, n_items] (the ``score_users`` contract),
    else a PluginError naming the ranker (and its plugin when given)."""
    shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
    if shape != (n_users, n_items):
        owner = f" (plugin '{plugin}')" if plugin else ""
        raise PluginError(
            f"ranker '{getattr(ranker, 'name', type(ranker).__name__)}'{owner} broke the "
            f"score_users contract: it returned scores of shape {shape}, expected "
            f"{(n_users, n_items)} [len(user_index), data.n_items] (the catalogue may hold "
            f"more items than fit saw)")
    return scores


# -- models -------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """One model of an evaluation: a label for the table, a ranker name and its options."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_models(models: str | Iterable[str | ModelSpec],
                 options: Iterable[str] = (), registry: "Registry | None" = None
                 ) -> list[ModelSpec]:
    """Model specs from 'popular,itemknn,text=two_tower' (LABEL=NAME gives one ranker a
    second label) and options 'LABEL.KEY=VALUE'. With ``registry``, VALUE is converted
    to the type the ranker declares for KEY (``Ranker.check_options(..., text=True)``:
    '0.5' -> 0.5 for a float, '[0.5,1]' -> [0.5, 1.0] for a float grid; an unknown
    option or a bad value is a ConfigError); without, or for an undeclared ranker,
    VALUE is parsed as JSON when it can be."""
    items = models.split(",") if isinstance(models, str) else list(models)
    specs: list[ModelSpec] = []
    for item in items:
        if isinstance(item, ModelSpec):
            specs.append(item)
            continue
        item = item.strip()
        if not item:
            continue
        label, _, name = item.partition("=")
        specs.append(ModelSpec(label.strip(), (name or label).strip()))
    if not specs:
        raise ConfigError("no models to evaluate")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"model labels must be unique: {', '.join(labels)}")
    by_label = {s.label: s for s in specs}
    for opt in options:
        target, eq, raw = opt.partition("=")
        label, dot, key = target.partition(".")
        if not eq or not dot or not key:
            raise ConfigError(f"option '{opt}' must look like LABEL.KEY=VALUE")
        if label not in by_label:
            raise ConfigError(f"option '{opt}' names model '{label}', which is not evaluated "
                              f"(models: {', '.join(labels)})")
        spec = by_label[label]
        cls = registry.get(spec.name) if registry is not None else None
        if cls is not None and hasattr(cls, "check_options"):
            spec.options.update(cls.check_options({key: raw}, text=True))
        else:
            spec.options[key] = _parse_value(raw)
    return specs


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def make_ranker(registry: "Registry", name: str, options: Mapping[str, Any] | None = None
                ) -> Ranker:
    """Instantiate ranker ``name`` with ``options``. Composite rankers (class attribute
    ``composite = True``, e.g. the ensemble) also get ``factory``, a callable
    (name, options) -> Ranker, to build their members from the same registry."""
    cls = registry.get(name)
    opts = cls.check_options(dict(options or {})) if hasattr(cls, "check_options") \
        else dict(options or {})
    if getattr(cls, "composite", False):
        opts.setdefault("factory", lambda n, o=None: make_ranker(registry, n, o))
    return cls(**opts)


# -- reports ------------------------------------------------------------------------------
@dataclass
class EvaluationReport:
    """The outcome of one evaluation run: the split, K values and one row per model."""

    split: dict[str, Any]
    ks: list[int]
    rows: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"split": self.split, "ks": self.ks, "models": self.rows}

    def table(self) -> str:
        """A fixed-width text table: one row per model."""
        cols = [f"{m}@{k}" for k in self.ks for m in ("recall", "ndcg", "hitrate")]
        cols += ["mrr"] + [f"coverage@{k}" for k in self.ks]
        width = max([len("model")] + [len(r["model"]) for r in self.rows])
        head = f"{'model':<{width}}  " + "  ".join(f"{c:>11}" for c in cols) + "  fit_s"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            vals = "  ".join(f"{r['metrics'][c]:>11.4f}" for c in cols)
            lines.append(f"{r['model']:<{width}}  {vals}  {r['fit_seconds']:>5.1f}")
        return "\n".join(lines)


def run_evaluation(engine: "Engine", models: str | Iterable[str | ModelSpec] = "popular,itemknn,ease",
                   *, split: str = "random", ks: Sequence[int] = DEFAULT_KS, seed: int = 0,
                   options: Iterable[str] = (), min_rating: float = 4.0,
                   split_options: Mapping[str, Any] | None = None, batch_size: int = 256,
                   data: TrainingData | None = None) -> EvaluationReport:
    """Build the data, split it, fit every model on the training part (each tunes on
    validation carved from it) and evaluate all on the held-out part."""
    from polyrec.rank.dataset import build_training_data
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError("K values must be positive integers")
    registry = engine.registry("rankers")
    specs = parse_models(models, options, registry)  # unknown names and options fail here
    if data is None:
        data = build_training_data(engine, min_rating=min_rating)
    if len(data.users) == 0:
        raise ConfigError("no positive interactions to evaluate on; ingest interactions first")
    the_split = make_split(data, split, seed=seed, **dict(split_options or {}))
    progress = bool(getattr(engine, "progress", False))
    rows = []
    for n, spec in enumerate(specs, start=1):
        ranker = make_ranker(registry, spec.name, spec.options)
        if "progress" in getattr(ranker, "options", {}):
            ranker.options["progress"] = progress
        stage(f"evaluate: fitting {spec.label} ({n}/{len(specs)}) on "
              f"{len(the_split.train.users):,} interactions", progress)
        start = time.perf_counter()
        ranker.fit(the_split.train)
        fit_seconds = time.perf_counter() - start
        stage(f"evaluate: {spec.label} fitted in {fit_seconds:.1f}s", progress)
        start = time.perf_counter()
        metrics = evaluate_ranker(ranker, the_split, ks=ks, batch_size=batch_size,
                                  progress=progress, desc=f"evaluate {spec.label}")
        rows.append({"model": spec.label, "ranker": spec.name, "options": spec.options,
                     "handles_cold_items": bool(getattr(ranker, "handles_cold_items", False)),
                     "metrics": metrics, "info": dict(getattr(ranker, "info", {}) or {}),
                     "fit_seconds": fit_seconds,
                     "eval_seconds": time.perf_counter() - start})
    return EvaluationReport(the_split.describe(), ks, rows)


# -- tuning -------------------------------------------------------------------------------
def _plain(value: Any) -> str:
    """A grid value as typed on the command line (500, not 500.0)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def tune_on_validation(build: Callable[[dict[str, Any]], Ranker], grid: Mapping[str, Sequence[Any]],
                       train: TrainingData, *, metric: str = "ndcg@20",
                       seed: int | None = None, warm_only: bool = False
                       ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pick the grid point whose ranker, fitted on validation-train, scores best on
    ``metric`` over the validation split carved from ``train`` (never the test data).

    ``warm_only``: see :func:`validation_split`.
    Returns (best parameters, [{"params", metric} for every grid point]). The first grid
    point wins ties, so order the grid from the preferred (simplest) value.
    """
    import itertools
    name, _, k = metric.partition("@")
    ks = [int(k)] if k else list(DEFAULT_KS)
    val = validation_split(train, seed=seed, warm_only=warm_only)
    keys = list(grid)
    if len(val.eval_users) == 0:  # every metric but coverage would be missing
        example = {key: list(grid[key])[len(grid[key]) // 2] for key in keys}
        raise ConfigError(
            f"not enough interactions to carve validation data for tuning {', '.join(keys)}: "
            f"{len(train.users):,} interactions of {train.n_users:,} users leave no user "
            "with a held-out item; give one value instead of the grid, e.g. "
            f"{' '.join(f'--set {k}={_plain(v)}' for k, v in example.items())} "
            f"(Python: options={ {k: v for k, v in example.items()} })")
    tried: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any]] | None = None
    for values in itertools.product(*(grid[key] for key in keys)):
        params = dict(zip(keys, values))
        ranker = build(params)
        ranker.fit(val.train)
        result = evaluate_ranker(ranker, val, ks=ks)
        if metric not in result:
            raise ConfigError(f"unknown tuning metric '{metric}' (known: {', '.join(sorted(result))})")
        tried.append({"params": params, metric: result[metric]})
        if best is None or result[metric] > best[0]:
            best = (result[metric], params)
    assert best is not None
    return best[1], tried
