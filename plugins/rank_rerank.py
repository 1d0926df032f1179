"""The "rerank" ranker: a click-probability model sigma(theta^T f(user, item)) that
re-scores the top candidates of a retrieval ranker.

Features of a (user, candidate) pair: the retrieval score (z-scored per user) and its
rank, the item's popularity and recency in the training data, and for every modality
with item vectors (text, KG, image) the largest and the mean cosine similarity between
the candidate and the user's history; the KG similarity is the knowledge-graph overlap
of the candidate with what the user liked, measured in the KG embedding space.

Training (``fit``): validation data is carved from the training data with its own
protocol; the retrieval ranker is fitted on the rest, its top ``candidates`` for each
validation user are labelled 1 when held out for that user, 0 otherwise, and theta is
fitted by L2-regularised logistic regression (L-BFGS). The retrieval ranker is then
refitted on all the data. Items outside the candidates keep the retrieval order below
every candidate.

A growing catalogue: items added after fitting are scored with no retrain. The retrieval
ranker gives them its cold score (content neighbours, see TrainingData.catalogue_map),
and besides its top ``candidates`` the ``new_candidates`` best-retrieved items the model
never saw are always re-scored too, so a fitting new item can reach the top. An unseen
item with no interactions yet borrows its content neighbours' popularity and recency
features (weighted mean); the content-similarity features come from its own vectors.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from polyrec import (ConfigError, ModelNotTrainedError, Ranker, TrainingData, hookimpl,
                     progress_bar, stage)

DEFAULTS: dict[str, Any] = {
    "base": "two_tower", "base_options": {}, "scorers": [], "candidates": 100, "l2": 1e-3,
    "max_iter": 200, "center": True, "refit": True, "seed": 0, "factory": None,
    "new_candidates": 20, "recent": 5, "recent_retrieval": False, "progress": False,
}
#: Offset that puts every re-scored candidate above every other item.
CANDIDATE_OFFSET = 1e4


def _zscore(scores: torch.Tensor) -> torch.Tensor:
    """Per-row z-scores over finite entries; non-finite entries stay -inf."""
    finite = torch.isfinite(scores)
    vals = torch.where(finite, scores, torch.zeros_like(scores))
    n = finite.sum(1, keepdim=True).clamp(min=1)
    mean = vals.sum(1, keepdim=True) / n
    var = (torch.where(finite, vals - mean, torch.zeros_like(vals)) ** 2).sum(1, keepdim=True) / n
    z = (vals - mean) / var.sqrt().clamp(min=1e-12)
    return torch.where(finite, z, torch.full_like(z, -math.inf))


def _as_unseen(data: TrainingData, mask: torch.Tensor) -> Any:
    """``data``'s catalogue mapped onto itself with the ``mask`` items standing as never
    seen (TrainingData.catalogue_map): each gets its content neighbours among the others,
    whose values ``from_fitted`` then mixes for it."""
    ids = [-(j + 1) if m else int(i) for j, (i, m) in enumerate(zip(data.item_ids, mask.tolist()))]
    return data.catalogue_map(ids, reference=~mask)


def _cold_filled(raw: torch.Tensor, data: TrainingData) -> tuple[torch.Tensor, torch.Tensor]:
    """``raw`` retrieval scores [b, n] where the items the retrieval ranker scores for
    nobody (an ID model's cold items: no training positive) get the weighted mean score
    of their content neighbours, as an item added after fitting does
    (TrainingData.catalogue_map); and the indices of the cold items that got a score.
    Items without content vectors stay -inf."""
    cold = ~torch.isfinite(raw).any(0)
    none = torch.empty(0, dtype=torch.long)
    if not bool(cold.any()) or not data.item_features or bool(cold.all()):
        return raw, none
    filled = _as_unseen(data, cold).from_fitted(raw, cold="-inf")
    scored = cold & torch.isfinite(filled).any(0)
    return filled, torch.nonzero(scored).flatten()


def _centroid_similarity(unit: torch.Tensor, present: torch.Tensor, cand: torch.Tensor,
                         histories: list[torch.Tensor]) -> torch.Tensor:
    """The cosine [b, C] between each row's candidates and the normalised mean of the
    unit vectors of its history items that have one (0 for a row with none)."""
    centroids = torch.zeros(len(histories), unit.shape[1])
    for r, h in enumerate(histories):
        h = h[present[h]] if len(h) else h
        if len(h):
            centroids[r] = F.normalize(unit[h].mean(0), dim=0)
    return torch.bmm(unit[cand], centroids[:, :, None]).squeeze(-1)


def _history_similarity(unit: torch.Tensor, present: torch.Tensor, cand: torch.Tensor,
                        histories: list[torch.Tensor], budget: int = 1 << 24
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest and the mean cosine similarity [b, C] between each row's candidates
    ``cand`` [b, C] and the items of its history that have a vector (``unit``: unit
    item vectors, ``present``: which items have one); 0 for a row with no such item.

    The mean is one dot product with the history's summed vector; the max a batched
    matrix product over histories padded to the longest, in chunks of rows that keep
    the similarity block under ``budget`` entries."""
    b, c = cand.shape
    mx, mean = torch.zeros(b, c), torch.zeros(b, c)
    hist = [h[present[h]] if len(h) else h for h in histories]
    lengths = torch.tensor([len(h) for h in hist], dtype=torch.long)
    rows = torch.nonzero(lengths > 0).flatten()
    if len(rows) == 0:
        return mx, mean
    cand_vecs = unit[cand]  # [b, C, D]
    order = rows[torch.argsort(lengths[rows])]  # similar lengths share a chunk: less padding
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        end = start + 1
        while end < len(order) and (end - start + 1) * c * max(longest, int(lengths[order[end]])) <= budget:
            longest = max(longest, int(lengths[order[end]]))
            end += 1
        chunk = order[start:end].tolist()
        padded = torch.zeros(len(chunk), longest, dtype=torch.long)
        valid = torch.zeros(len(chunk), longest, dtype=torch.bool)
        for j, r in enumerate(chunk):
            padded[j, :len(hist[r])] = hist[r]
            valid[j, :len(hist[r])] = True
        hv = unit[padded] * valid[..., None]  # [n, H, D]
        sims = torch.bmm(cand_vecs[chunk], hv.transpose(1, 2))  # [n, C, H]
        mx[chunk] = sims.masked_fill(~valid[:, None, :], -math.inf).max(2).values
        mean[chunk] = sims.sum(2) / lengths[chunk].float()[:, None]
        start = end
    return mx, mean


class RerankRanker(Ranker):
    """Logistic re-ranking of a retrieval ranker's top candidates.

    Options: ``base`` (ranker name or instance, default two_tower), ``base_options``,
    ``scorers`` (more rankers whose per-user z-scores become features, e.g. two_tower
    over an EASE base: a learned blend),
    ``candidates`` (how many to re-score, 100), ``new_candidates`` (how many more of the
    items added after fitting to re-score per user, by retrieval score; 20), ``l2``, ``max_iter``, ``center`` (features
    relative to the mean of the user's candidates, so the model compares a user's
    candidates rather than users), ``refit``, ``seed``;
    ``factory`` (supplied by the engine) builds the base ranker by name.
    """

    name = "rerank"
    composite: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = DEFAULTS

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ConfigError(f"{self.name}: unknown option(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(self.defaults))})")
        super().__init__(**{**self.defaults, **options})
        self.base = self._build(self.options["base"], self.options["base_options"])
        specs = self.options["scorers"] or []
        if isinstance(specs, str):
            specs = [x for x in specs.replace("+", ",").split(",") if x.strip()]
        self.scorers: list[Ranker] = []
        self.scorer_specs: list[dict[str, Any]] = []
        for spec in specs:
            if isinstance(spec, Ranker):
                self.scorers.append(spec)
                self.scorer_specs.append({"name": spec.name, "options": dict(spec.options)})
                continue
            if isinstance(spec, str):
                spec = {"name": spec.strip(), "options": {}}
            self.scorers.append(self._build(spec["name"], spec.get("options")))
            self.scorer_specs.append({"name": spec["name"],
                                      "options": dict(spec.get("options") or {})})
        self.handles_cold_items = any(getattr(r, "handles_cold_items", False)
                                      for r in [self.base, *self.scorers])
        self.theta: torch.Tensor | None = None
        self.mean = self.std = None
        self.feature_names: list[str] = []
        self.item_ids: list[int] | None = None  # internal ids of the fitted items
        self.info: dict[str, Any] = {}

    def _build(self, spec: Any, options: Any) -> Ranker:
        if isinstance(spec, Ranker):
            return spec
        factory: Callable[..., Ranker] | None = self.options["factory"]
        if factory is None:
            raise ConfigError("rerank needs a factory to build rankers by name; "
                              "build it with engine.evaluation.make_ranker")
        return factory(str(spec), dict(options or {}))

    # -- features ------------------------------------------------------------------------
    def _item_stats(self, data: TrainingData) -> dict[str, torch.Tensor]:
        """Per-item popularity, recent popularity and age features of ``data`` (cached
        per data object: serving scores many requests against one snapshot)."""
        cached = getattr(self, "_stats_cache", None)  # (data, its length, stats)
        if cached is not None and cached[0] is data and cached[1] == len(data.users):
            return cached[2]
        stats = self._compute_item_stats(data)
        self._stats_cache = (data, len(data.users), stats)  # the reference keeps id() unique
        return stats

    def _compute_item_stats(self, data: TrainingData) -> dict[str, torch.Tensor]:
        counts = data.item_counts().float()
        last = torch.full((data.n_items,), -math.inf, dtype=torch.float64)
        if len(data.ts):
            last = last.scatter_reduce(0, data.items, data.ts.double(), reduce="amax")
            now = float(data.ts.max())
        else:
            now = 0.0
        age_days = torch.where(torch.isfinite(last), (now - last) / 86400.0,
                               torch.full_like(last, math.inf))
        # never-seen items are the "oldest": cap them at the largest finite age + 1 day
        finite = torch.isfinite(age_days)
        cap = float(age_days[finite].max()) + 1.0 if bool(finite.any()) else 1.0
        age_days = torch.where(finite, age_days, torch.full_like(age_days, cap))
        recent = torch.zeros(data.n_items)
        if len(data.ts):  # positives in the latest tenth of the interactions: the trend
            ts = data.ts.double()
            cut = torch.kthvalue(ts, max(1, math.ceil(0.9 * len(ts)))).values
            late = ts >= cut
            recent = torch.bincount(data.items[late], minlength=data.n_items).float()
        stats = {"log_popularity": torch.log1p(counts),
                 "log_recent_popularity": torch.log1p(recent),
                 "log_age_days": torch.log1p(age_days.clamp(min=0)).float()}
        zero = counts == 0
        if bool(zero.any()) and bool((~zero).any()) and data.item_features:
            # items with no positive yet (new or cold): their content neighbours' values
            zmap = _as_unseen(data, zero)
            for name, values in list(stats.items()):
                known = values.float().clone()
                known[zero] = math.nan
                prior = zmap.from_fitted(known[None])[0]
                values = values.float().clone()
                values[zero] = torch.where(torch.isfinite(prior[zero]), prior[zero], values[zero])
                stats[name] = values
        return stats

    def _catalogue(self, data: TrainingData) -> Any:
        """data's items against the fitted ones (None when unknown). A state saved before
        the ids were kept uses the retrieval ranker's (or assumes its fitted items come
        first, as many as it knows)."""
        ids = self.item_ids if self.item_ids is not None else getattr(self.base, "item_ids", None)
        if ids is not None:
            return data.catalogue_map(ids)
        known = getattr(self.base, "known", None)
        if known is not None:
            return data.catalogue_map(None, n_fitted=min(len(known), data.n_items))
        return None

    def _features(self, users: torch.Tensor, cand: torch.Tensor, base: torch.Tensor,
                  data: TrainingData, history: list[torch.Tensor],
                  stats: dict[str, torch.Tensor], scorer_z: list[torch.Tensor] | None = None,
                  center: bool = True) -> tuple[torch.Tensor, list[str]]:
        """Features [b, C, F] of each user's candidates and their names; ``scorer_z``:
        the scorers' z-scores [b, n] when already computed; ``center=False`` leaves out
        the centring on the list (option ``center``)."""
        z = _zscore(base)
        cz = torch.gather(z, 1, cand)
        # rank of each candidate in the retrieval order (items scored higher before it)
        descending = -torch.sort(base, dim=1, descending=True).values
        ranks = torch.searchsorted(descending.contiguous(),
                                   (-torch.gather(base, 1, cand)).contiguous()).float()
        cols = [cz.clamp(min=-10), 1.0 / torch.log2(ranks + 2.0),
                stats["log_popularity"][cand], stats["log_recent_popularity"][cand],
                stats["log_age_days"][cand]]
        names = ["retrieval_z", "retrieval_rank", "log_popularity", "log_recent_popularity",
                 "log_age_days"]
        if scorer_z is None:
            scorer_z = self._scorer_z(users, data)
        for spec, sz in zip(self.scorer_specs, scorer_z):
            sz = torch.gather(sz, 1, cand)
            sz = torch.where(torch.isfinite(sz), sz, torch.full_like(sz, -10.0))
            cols.append(sz.clamp(min=-10))
            names.append(f"{spec['name']}_z")
        if self.options.get("recent_retrieval") and int(self.options.get("recent", 0) or 0):
            # the retrieval ranker's scores from the user's latest items alone
            with torch.no_grad():
                rz = _zscore(self.base.score_users(users, self._recent(data)[0]).detach().float().cpu())
            rz = torch.gather(rz, 1, cand)
            cols.append(torch.where(torch.isfinite(rz), rz, torch.full_like(rz, -10.0)).clamp(min=-10))
            names.append("retrieval_recent_z")
        recent = self._recent(data)[1]
        for m, (vec, present) in sorted(data.item_features.items()):
            unit = F.normalize(vec.float(), dim=-1)
            mx, mean = _history_similarity(unit, present, cand,
                                           [history[u] for u in users.tolist()])
            last = _centroid_similarity(unit, present, cand, [recent[u] for u in users.tolist()])
            cols += [mx, mean, last]
            names += [f"{m}_similarity_max", f"{m}_similarity_mean", f"{m}_similarity_recent"]
        feats = torch.stack(cols, dim=-1)
        if self.theta is not None and self.feature_names and names != self.feature_names:
            # a click model fitted by another version of this code: its own features, in
            # its own order (features added since are left out; one it lacks is an error)
            index = {n: j for j, n in enumerate(names)}
            missing = [n for n in self.feature_names if n not in index]
            if missing:
                raise ConfigError(f"{self.name}: the stored click model uses features this "
                                  f"version does not compute ({', '.join(missing)}); train again")
            feats, names = feats[..., [index[n] for n in self.feature_names]], list(self.feature_names)
        if center and self.options["center"]:  # relative to the user's other candidates
            feats = feats - feats.mean(dim=1, keepdim=True)
        return feats, names

    def _recent(self, data: TrainingData) -> tuple[TrainingData, list[torch.Tensor]]:
        """``data`` with only each user's ``recent`` latest interactions by time, and
        those items per user (cached per data object)."""
        cached = getattr(self, "_recent_cache", None)  # (data, its length, result)
        if cached is not None and cached[0] is data and cached[1] == len(data.users):
            return cached[2]
        n = int(self.options.get("recent", 5) or 0)
        order = torch.argsort(data.ts, stable=True)
        order = order[torch.argsort(data.users[order], stable=True)]  # by user, then time
        ends = torch.cumsum(torch.bincount(data.users, minlength=data.n_users), 0)
        from_end = ends[data.users[order]] - torch.arange(len(order)) - 1  # 0: the latest
        keep = torch.zeros(len(order), dtype=torch.bool)
        keep[order[from_end < n]] = True
        latest = data.subset(keep)
        self._recent_cache = (data, len(data.users), (latest, latest.user_items()))
        return self._recent_cache[2]

    def _scorer_z(self, users: torch.Tensor, data: TrainingData) -> list[torch.Tensor]:
        """Per-user z-scores [b, n] of every scorer (-inf where a scorer cannot score)."""
        with torch.no_grad():
            return [_zscore(r.score_users(users, data).detach().float().cpu()) for r in self.scorers]

    def _candidates(self, users: torch.Tensor, data: TrainingData,
                    history: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(raw base scores [b, n], the same with training items at -inf, candidate
        indices [b, C + E], valid [b, C + E]): the top C by retrieval score, then up to E
        (``new_candidates``) more among the items added after fitting, best retrieved
        first; ``valid`` marks the candidates to re-score (finite, not a filler)."""
        with torch.no_grad():
            raw = self.base.score_users(users, data).detach().float().cpu()
        cold = torch.empty(0, dtype=torch.long)
        if not any(getattr(r, "handles_cold_items", False) for r in self.scorers):
            raw, cold = _cold_filled(raw, data)  # else a scorer ranks them (tier two)
        base = raw.clone()
        for r, u in enumerate(users.tolist()):
            if len(history[u]):
                base[r, history[u]] = -math.inf
        c = min(int(self.options["candidates"]), data.n_items)
        pick = base
        if len(cold):  # cold items are not candidates: ordered by their filled score below them
            pick = base.clone()
            pick[:, cold] = -math.inf
        top = torch.topk(pick, c, dim=1).indices
        cand, valid = top, torch.isfinite(torch.gather(pick, 1, top))
        cmap = self._catalogue(data)
        # items added after fitting that have content: up to E of them are re-scored too
        # (no content: ranked last)
        content = cmap.unseen[cmap.has_content] if cmap is not None else cold[:0]
        e = min(int(self.options.get("new_candidates", 0) or 0), len(content))
        if e > 0:
            fresh = torch.full_like(base, -math.inf)
            fresh[:, content] = base[:, content]
            fresh.scatter_(1, top, -math.inf)  # already a candidate
            more = torch.topk(fresh, e, dim=1)
            cand = torch.cat([top, more.indices], dim=1)
            valid = torch.cat([valid, torch.isfinite(more.values)], dim=1)
        return raw, base, cand, valid

    # -- fitting -------------------------------------------------------------------------
    def fit(self, data: TrainingData) -> None:
        from polyrec import validation_split
        self.item_ids = list(data.item_ids)  # validation data keeps every item
        val = validation_split(data, seed=int(self.options["seed"]) + 7)
        if val.n_test == 0:
            raise ConfigError(
                f"{self.name}: not enough interactions to carve validation data for the click "
                f"model: {len(data.users):,} interactions of {data.n_users:,} users leave no "
                "user with a held-out item; train a ranker without a click model, e.g. "
                "--ranker ease_side --set l2=500 --set side=100 --set dropout=0.5")
        show = bool(self.options.get("progress"))
        for ranker in [self.base, *self.scorers]:
            stage(f"{self.name}: fitting {ranker.name} on {len(val.train.users):,} interactions "
                  "(validation held out)", show)
            ranker.fit(val.train)
        history = val.train.user_items()
        stats = self._item_stats(val.train)
        xs, ys = [], []
        users = val.eval_users
        batches = progress_bar(range(0, len(users), 256), desc=f"{self.name}: click-model features",
                               unit="batches", enabled=show, leave=False)
        for start in batches:
            batch = users[start:start + 256]
            _, base, cand, valid, feats, extras = self._tiers(batch, val.train, history, stats)
            finite = valid
            labels = torch.zeros(cand.shape, dtype=torch.float32)
            for r, u in enumerate(batch.tolist()):
                labels[r] = torch.isin(cand[r], val.test[u]).float()
            xs.append(feats[finite])
            ys.append(labels[finite])
            for r, idx, extra in extras:  # items only the scorers can score
                xs.append(extra[0])
                ys.append(torch.isin(idx, val.test[int(batch[r])]).float())
        x, y = torch.cat(xs), torch.cat(ys)
        self.mean, self.std = x.mean(0), x.std(0).clamp(min=1e-6)
        self.theta = self._logistic((x - self.mean) / self.std, y)
        with torch.no_grad():
            p = torch.sigmoid(self._design((x - self.mean) / self.std) @ self.theta)
            loss = float(F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y))
        stage(f"{self.name}: click model learned on {len(y):,} candidates "
              f"({int(y.sum()):,} held-out positives), log loss {loss:.4f}", show)
        if self.options["refit"]:  # on all the data, with what validation chose
            for ranker in [self.base, *self.scorers]:
                stage(f"{self.name}: refitting {ranker.name} on all {len(data.users):,} "
                      "interactions", show)
                ranker.refit(data)
        self.info = {"features": self.feature_names, "examples": int(len(y)),
                     "positives": int(y.sum()), "log_loss": round(loss, 5),
                     "theta": {n: round(float(t), 4) for n, t in
                               zip(["bias"] + self.feature_names, self.theta)},
                     "base": dict(getattr(self.base, "info", {}) or {}),
                     "scorers": {spec["name"]: dict(getattr(r, "info", {}) or {})
                                 for spec, r in zip(self.scorer_specs, self.scorers)}}

    def refit(self, data: TrainingData) -> None:
        """Refit the retrieval ranker and the scorers on ``data`` with what they chose;
        the click model stays (it was learned on validation data)."""
        if self.theta is None:
            self.fit(data)
            return
        self.item_ids = list(data.item_ids)
        for ranker in [self.base, *self.scorers]:
            ranker.refit(data)

    @staticmethod
    def _design(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.ones(len(x), 1), x], dim=1)

    def _logistic(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """theta (bias first) minimising mean log loss + l2/2 |w|^2 with L-BFGS."""
        design = self._design(x).double()
        y = y.double()
        theta = torch.zeros(design.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], max_iter=int(self.options["max_iter"]),
                                line_search_fn="strong_wolfe")
        l2 = float(self.options["l2"])

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(design @ theta, y) + \
                0.5 * l2 * (theta[1:] ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return theta.detach().float()

    # -- scoring -------------------------------------------------------------------------
    def _tiers(self, users: torch.Tensor, data: TrainingData, history: list[torch.Tensor],
               stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor, torch.Tensor,
                                                        list[tuple[int, torch.Tensor,
                                                                   torch.Tensor]]]:
        """(raw base scores, masked base scores, candidates [b, C], which of them to
        re-score [b, C], their features [b, C, F], and per user row the items only the
        scorers can score with their features: [(row, item indices [E], features
        [1, E, F])])."""
        raw, base, cand, valid = self._candidates(users, data, history)
        scorer_z = self._scorer_z(users, data)
        feats, names = self._features(users, cand, base, data, history, stats, scorer_z)
        if self.theta is None:  # fitting: these are the click model's features
            self.feature_names = names
        extras = []
        if scorer_z:
            only = ~torch.isfinite(base) & torch.stack([torch.isfinite(z) for z in scorer_z]).any(0)
            for r, u in enumerate(users.tolist()):
                if len(history[u]):
                    only[r, history[u]] = False
            for r in torch.nonzero(only.any(1)).flatten().tolist():
                idx = torch.nonzero(only[r]).flatten()
                extra, _ = self._features(users[r:r + 1], idx[None, :], base[r:r + 1], data,
                                          history, stats, [z[r:r + 1] for z in scorer_z])
                extras.append((r, idx, extra))
        return raw, base, cand, valid, feats, extras

    def _logits(self, feats: torch.Tensor) -> torch.Tensor:
        b, c, f = feats.shape
        x = (feats.reshape(-1, f) - self.mean) / self.std
        return (self._design(x) @ self.theta).reshape(b, c)

    def warm_start(self, state: dict[str, Any]) -> bool:
        """Hand the stored state's parts to the retrieval ranker and the scorers (by
        position, when the stored scorers are the same rankers); True when any takes it.
        The click model itself is refitted (it is small)."""
        used = bool(state.get("base") is not None and self.base.warm_start(state["base"]))
        stored = state.get("scorers") or []
        if [s.get("name") for s in stored] == [s["name"] for s in self.scorer_specs]:
            for ranker, st in zip(self.scorers, stored):
                used = ranker.warm_start(st["state"]) or used
        return used

    def components(self) -> list[tuple[str, Ranker]]:
        """The retrieval ranker, then the scorers whose scores are click-model features."""
        return [(self.base.name, self.base)] + [(r.name, r) for r in self.scorers]

    def score_users(self, user_index: torch.Tensor, data: TrainingData) -> torch.Tensor:
        """Three tiers: the retrieval ranker's top candidates by click logit (above every
        other item), then items only the scorers can score (cold items) by click logit,
        then the rest in retrieval order."""
        if self.theta is None:
            raise ModelNotTrainedError("rerank is not fitted")
        history = data.user_items()
        raw, base, cand, valid, feats, extras = self._tiers(user_index, data, history,
                                                            self._item_stats(data))
        out = _zscore(raw).clamp(min=-CANDIDATE_OFFSET / 4) - CANDIDATE_OFFSET
        out[~torch.isfinite(raw)] = -math.inf
        rows, cols = torch.nonzero(valid, as_tuple=True)  # fillers stay as they are
        out[rows, cand[rows, cols]] = self._logits(feats)[rows, cols] + CANDIDATE_OFFSET
        for r, idx, extra in extras:
            out[r, idx] = self._logits(extra)[0]
        return out

    def click_probability(self, user_index: torch.Tensor, items: torch.Tensor,
                          data: TrainingData) -> torch.Tensor:
        """sigma(theta^T f(user, item)) for item indices [b, c] of the given users: the
        click logit each item was ranked with (score_users), whichever items are asked
        for. A re-scored candidate's features are centred over the user's candidates, an
        item only the scorers score over those items, as in ranking; an item that was not
        re-scored (a filler, a seen item) is centred over the candidates too."""
        if self.theta is None:
            raise ModelNotTrainedError("rerank is not fitted")
        history = data.user_items()
        stats = self._item_stats(data)
        _, base, cand, valid, feats, extras = self._tiers(user_index, data, history, stats)
        logits = torch.full(base.shape, math.nan)
        rows, cols = torch.nonzero(valid, as_tuple=True)
        logits[rows, cand[rows, cols]] = self._logits(feats)[rows, cols]
        for r, idx, extra in extras:
            logits[r, idx] = self._logits(extra)[0]
        out = torch.gather(logits, 1, items)
        rest = torch.isnan(out)
        if bool(rest.any()):  # not re-scored: features centred over the same candidates
            c = cand.shape[1]
            both, _ = self._features(user_index, torch.cat([cand, items], dim=1), base, data,
                                     history, stats, center=False)
            if self.options["center"]:
                both = both - both[:, :c].mean(dim=1, keepdim=True)
            out = torch.where(rest, self._logits(both[:, c:]), out)
        return torch.sigmoid(out)

    # -- artifacts -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        if self.theta is None:
            raise ModelNotTrainedError("rerank is not fitted")
        return {"theta": self.theta, "mean": self.mean, "std": self.std,
                "features": self.feature_names, "info": self.info, "base": self.base.state(),
                "item_ids": list(self.item_ids) if self.item_ids is not None else None,
                "scorers": [{**spec, "state": r.state()}
                            for spec, r in zip(self.scorer_specs, self.scorers)]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.base.load_state(state["base"])
        stored = state.get("scorers", [])
        if [x["name"] for x in stored] != [x["name"] for x in self.scorer_specs]:
            # the fitted pipeline's own scorers (its click model was fitted on their
            # features): a version saved under other default scorers (a hybrid trained
            # before ease_side became its default scorer, whose saved options name none)
            # loads as it was trained
            self.scorer_specs = [{"name": x["name"], "options": dict(x.get("options") or {})}
                                 for x in stored]
            self.scorers = [self._build(x["name"], x["options"]) for x in self.scorer_specs]
            self.handles_cold_items = any(getattr(r, "handles_cold_items", False)
                                          for r in [self.base, *self.scorers])
        for ranker, st in zip(self.scorers, stored):
            ranker.load_state(st["state"])
        self.theta, self.mean, self.std = state["theta"], state["mean"], state["std"]
        self.feature_names = list(state["features"])
        self.info = dict(state.get("info") or {})
        ids = state.get("item_ids")  # absent in states saved before the catalogue could grow
        self.item_ids = [int(i) for i in ids] if ids is not None else None


class HybridRanker(RerankRanker):
    """The default pipeline: EASE retrieves, and the click model re-scores its top 100
    from the score of EASE with the text vectors as side information and a dropout
    penalty (``ease_side``, a scorer), the content similarity of each candidate to the user's history and latest
    items in every modality (text, KG, image vectors), popularity, recent popularity and
    recency. Items EASE never saw get its content-neighbour cold score and are re-scored
    by the same model (``new_candidates``).

    The two-tower model is not a default scorer: on MovieLens-100k its score added
    nothing to the click model (docs/evaluation.md) while costing most of the training
    time; ``-o scorers=ease_side+two_tower`` puts it back, ``-o scorers=[]`` leaves
    ``ease_side`` out."""

    name = "hybrid"
    # scorers: a name, names joined by "+" or ",", or a JSON list of names or
    # {"name", "options"} specs ([] for none)
    defaults: ClassVar[dict[str, Any]] = {**DEFAULTS, "base": "ease", "scorers": ["ease_side"]}


@hookimpl
def register_rankers(register: Callable[[type], None]) -> None:
    register(RerankRanker)
    register(HybridRanker)
