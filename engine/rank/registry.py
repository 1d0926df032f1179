"""The model registry: which version of the ``pipeline`` artifact is live, the gate a new
version passes before it goes live, rollback and pruning.

- **Live pointer**: the setting ``models.live`` (``{"version": N, "at": ..., "previous":
  M, "by": "train" | "activate" | "rollback" | ...}``). Absent (a database from before the
  registry), the latest version is live.
- **Holdout**: a deterministic share (``HOLDOUT_SHARE``, 2%) of the positive (user, item)
  pairs, chosen by a stable hash of the user's and the item's external ids, is left out
  of the training of every model and used to measure it (Recall@20, NDCG@20). A pair
  held out once is held out for ever, so a new model and the live one are compared on
  pairs neither was trained on.
- **Gate** (:func:`run_gate`): (a) scores of shape [users, n_items] without NaN for a
  sample of users over the whole current catalogue; (b) a smoke recommendation for a
  sample of users through the serving code; (c) when a live model exists whose meta
  records the same holdout rule, the new model's mean Recall@20 over the held-out users
  is not below the live one's by more than max(``tolerance``, 2 x the standard error
  of the paired per-user difference) (``tolerance`` 0.02 absolute by default; setting
  ``models.gate``): on a small holdout the noise, not the tolerance, decides. A version
  that fails is stored but not made live. The held-out users measured are at most
  ``holdout_users`` (2,000 by default; 0: all): beyond that, those with the smallest
  stable hash of their external id (:func:`evaluated_users`), so the metrics and check
  (c) of a large catalogue cost a bounded time and the sample does not depend on the
  seed, the order of the data or the run.
- **Good** versions (:func:`is_good`): the gate passed, or the version predates the gate
  (no verdict recorded). Rollback and the serving fallback only go to good versions.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
import traceback
from typing import TYPE_CHECKING, Any, Mapping

import torch
from sqlalchemy import delete, func, select, update

from polyrec.errors import ConfigError, NotFoundError
from polyrec.progress import stage
from polyrec.store.models import Artifact, Item, Setting, User
from polyrec.store.postgres import lock_named
from polyrec.store.settings import get_setting, put_setting
from polyrec.training_data import TrainingData

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.contracts import Ranker
    from polyrec.engine import Engine

log = logging.getLogger("polyrec.models")

PIPELINE_ARTIFACT = "pipeline"
LIVE_KEY = "models.live"
GATE_KEY = "models.gate"
#: Share of positive (user, item) pairs held out of every model's training.
HOLDOUT_SHARE = 0.02
HOLDOUT_RULE = "blake2b-8(user_external_id \\x1f item_external_id) / 2**64 < share"
#: Gate settings (override per database with the setting ``models.gate``, or per call).
GATE_DEFAULTS: dict[str, Any] = {
    "metric": "recall@20",   # compared between the new and the live model on the holdout
    "tolerance": 0.02,       # absolute: fails when live - new > max(tolerance, 2 * SE)
    "sample_users": 64,      # users of checks (a) and (b)
    "k": 10,                 # recommendations asked for in the smoke test (b)
    "holdout_users": 2000,   # held-out users measured (metrics, check (c)); 0: all of them
}


# -- holdout -------------------------------------------------------------------------------
def _pair_hash(user: str, item: str) -> float:
    digest = hashlib.blake2b(f"{user}\x1f{item}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def _user_hash(user: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"eval\x1f{user}".encode(), digest_size=8).digest(),
                          "big")


def _user_external_ids(engine: "Engine", data: TrainingData) -> list[str]:
    with engine.store.session() as s:
        users = dict(s.execute(select(User.id, User.external_id)).all())
    return [str(users[u]) for u in data.user_ids]


def holdout_mask(engine: "Engine", data: TrainingData, share: float = HOLDOUT_SHARE,
                 user_external: list[str] | None = None) -> torch.Tensor:
    """bool [n_interactions]: the pairs of ``data`` in the deterministic holdout
    (``user_external``: the users' external ids when the caller has them)."""
    if share <= 0 or len(data.users) == 0:
        return torch.zeros(len(data.users), dtype=torch.bool)
    uext = user_external if user_external is not None else _user_external_ids(engine, data)
    with engine.store.session() as s:
        items = dict(s.execute(select(Item.id, Item.external_id)).all())
    iext = [str(items[i]) for i in data.item_ids]
    flags = [_pair_hash(uext[u], iext[i]) < share
             for u, i in zip(data.users.tolist(), data.items.tolist())]
    return torch.tensor(flags, dtype=torch.bool)


def evaluated_users(held_users: torch.Tensor, user_external: list[str],
                    max_users: int) -> torch.Tensor:
    """The ``max_users`` of ``held_users`` (user indices with held-out pairs) whose
    blake2b hash of the external id is smallest, ascending; all of them when they are
    no more than ``max_users`` or ``max_users`` is 0. Depends on the ids only: the same
    users for any seed or data order, and mostly the same as the data grows."""
    if max_users <= 0 or len(held_users) <= max_users:
        return held_users
    keyed = sorted(held_users.tolist(), key=lambda u: (_user_hash(user_external[u]), u))
    return torch.tensor(sorted(keyed[:max_users]), dtype=torch.long)


def holdout_record(share: float, pairs: int, users: int | None = None,
                   evaluated: int | None = None, max_users: int = 0) -> dict[str, Any]:
    """The holdout rule and sizes stored in a version's meta: held-out ``pairs`` and
    ``users``, the ``evaluated_users`` measured and the cap ``max_users`` (0: none)."""
    record: dict[str, Any] = {"rule": HOLDOUT_RULE, "share": share, "pairs": int(pairs)}
    if users is not None:
        record.update(users=int(users), evaluated_users=int(evaluated if evaluated is not None
                                                            else users),
                      max_users=int(max_users))
    return record


def split_holdout(engine: "Engine", data: TrainingData, share: float = HOLDOUT_SHARE,
                  max_users: int = 0
                  ) -> tuple[TrainingData, list[torch.Tensor], dict[str, Any]]:
    """(training data without the holdout, held-out item indices per user, record).
    Every held-out pair is left out of the training; with ``max_users`` > 0 only the
    pairs of at most that many users (:func:`evaluated_users`) are kept in the test
    lists, the others' lists are empty (not measured)."""
    uext = _user_external_ids(engine, data) if share > 0 and len(data.users) else []
    held = holdout_mask(engine, data, share, uext)
    train = data.subset(~held)
    test = [torch.empty(0, dtype=torch.long) for _ in range(data.n_users)]
    n_users = n_evaluated = 0
    if bool(held.any()):
        hu, hi = data.users[held], data.items[held]
        order = torch.argsort(hu, stable=True)
        counts = torch.bincount(hu, minlength=data.n_users)
        test = list(torch.split(hi[order], counts.tolist()))
        users = torch.nonzero(counts > 0).flatten()
        keep = evaluated_users(users, uext, max_users)
        n_users, n_evaluated = len(users), len(keep)
        if n_evaluated < n_users:
            dropped = torch.ones(data.n_users, dtype=torch.bool)
            dropped[keep] = False
            for u in torch.nonzero(dropped & (counts > 0)).flatten().tolist():
                test[u] = torch.empty(0, dtype=torch.long)
    return train, test, holdout_record(share, int(held.sum()), n_users, n_evaluated, max_users)


def per_user_metrics(ranker: "Ranker", train: TrainingData, test: list[torch.Tensor],
                     batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Recall@K and NDCG@K (K = 10, 20) of ``ranker`` for each user with held-out pairs
    (ascending user index), the user's training positives masked. ConfigError when the
    ranker's scores have the wrong shape."""
    from polyrec.rank.evaluation import mask_scores, user_metrics
    users = torch.tensor([u for u, t in enumerate(test) if len(t)], dtype=torch.long)
    train_items = train.user_items()
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        with torch.no_grad():
            raw = ranker.score_users(batch, train)
        problem = check_scores(raw, len(batch), train.n_items)
        if problem:
            raise ConfigError(f"ranker '{getattr(ranker, 'name', ranker)}' {problem}")
        scores = mask_scores(raw.detach().float().cpu(), batch, train_items)
        relevant = torch.zeros(len(batch), train.n_items, dtype=torch.bool)
        for r, u in enumerate(batch.tolist()):
            relevant[r, test[u]] = True
        per_user, _ = user_metrics(scores, relevant, (10, 20), mrr=False)
        for name in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
            parts.setdefault(name, []).append(per_user[name])
    return {k: torch.cat(v) for k, v in parts.items()}


def summarise(per_user: Mapping[str, torch.Tensor], test: list[torch.Tensor]) -> dict[str, float]:
    """Means of :func:`per_user_metrics`, with the numbers of users and pairs."""
    if not per_user:
        return {}
    out: dict[str, Any] = {k: round(float(v.mean()), 5) for k, v in per_user.items()}
    out["users"] = int(len(next(iter(per_user.values()))))
    out["pairs"] = int(sum(len(t) for t in test))
    return out


def holdout_metrics(ranker: "Ranker", train: TrainingData, test: list[torch.Tensor]
                    ) -> dict[str, float]:
    """Mean Recall@K, NDCG@K (K = 10, 20) of ``ranker`` on the held-out pairs."""
    return summarise(per_user_metrics(ranker, train, test), test)


# -- settings --------------------------------------------------------------------------------
def _get_setting(engine: "Engine", key: str) -> dict[str, Any] | None:
    with engine.store.session() as s:
        value = get_setting(s, key)
    return dict(value) if value is not None else None


def _set_setting(engine: "Engine", key: str, value: dict[str, Any]) -> None:
    with engine.store.session() as s:
        put_setting(s, key, value)


def gate_config(engine: "Engine", overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """GATE_DEFAULTS, then the setting ``models.gate``, then ``overrides``."""
    config = {**GATE_DEFAULTS, **(_get_setting(engine, GATE_KEY) or {}), **dict(overrides or {})}
    unknown = set(config) - set(GATE_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown gate setting(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(GATE_DEFAULTS))})")
    for key, kind in (("tolerance", float), ("sample_users", int), ("holdout_users", int)):
        try:
            config[key] = kind(config[key])
        except (TypeError, ValueError):
            raise ConfigError(f"gate setting '{key}' must be a {kind.__name__} number, "
                              f"not {config[key]!r}") from None
    if config["holdout_users"] < 0:
        raise ConfigError(f"gate setting 'holdout_users' must be 0 (all held-out users) or "
                          f"a positive number, not {config['holdout_users']}")
    return config


# -- the live pointer -----------------------------------------------------------------------
def _versions(engine: "Engine") -> list[int]:
    with engine.store.session() as s:
        return list(s.execute(select(Artifact.version).where(Artifact.name == PIPELINE_ARTIFACT)
                              .order_by(Artifact.version)).scalars())


def live_version(engine: "Engine") -> int | None:
    """The live version: the pointer's, else (no pointer: an older database) the latest;
    None when nothing is trained. One or two small queries (cheap enough per request)."""
    with engine.store.session() as s:
        return _live_in(s)


def has_pointer(engine: "Engine") -> bool:
    return _get_setting(engine, LIVE_KEY) is not None


def pin_live(engine: "Engine", version: int | None, by: str) -> None:
    """Record the pointer without checks or resets (e.g. pin "latest" before a new
    version is stored, so storing it does not make it live)."""
    _set_setting(engine, LIVE_KEY, {"version": version, "previous": None, "by": by,
                                    "at": time.time()})


def _lock_pointer(session: Any) -> None:
    """Begin the session's transaction with a write to the pointer row, so that what it
    reads next (the pointer, the versions) cannot change before it commits: SQLite takes
    its write lock here, PostgreSQL locks the row. Activate, rollback and prune run
    their read-check-write under it, so they never leave the pointer on a deleted version.
    On PostgreSQL an advisory lock comes first: before the first pointer is written there
    is no row to lock."""
    lock_named(session, LIVE_KEY)
    session.execute(update(Setting).where(Setting.key == LIVE_KEY).values(key=LIVE_KEY))


def _live_in(session: Any) -> int | None:
    """``live_version`` inside the caller's session."""
    pointer = get_setting(session, LIVE_KEY)
    if pointer and "version" in pointer:  # None: nothing is live (no model passed the gate)
        return int(pointer["version"]) if pointer["version"] is not None else None
    latest = session.execute(select(func.max(Artifact.version))
                             .where(Artifact.name == PIPELINE_ARTIFACT)).scalar()
    return int(latest) if latest is not None else None


def set_live(engine: "Engine", version: int, by: str) -> dict[str, Any]:
    """Point ``models.live`` at ``version`` (which must exist); resets the loaded
    recommender of this engine (other processes notice the pointer within a second)."""
    with engine.store.session() as s:
        _lock_pointer(s)
        exists = s.execute(select(func.count()).select_from(Artifact)
                           .where(Artifact.name == PIPELINE_ARTIFACT)
                           .where(Artifact.version == int(version))).scalar_one()
        if not exists:
            raise NotFoundError(f"no version {version} of the model '{PIPELINE_ARTIFACT}' "
                                f"(run `polyrec models list`)")
        previous = _live_in(s)
        pointer = {"version": int(version), "previous": previous, "by": by, "at": time.time()}
        put_setting(s, LIVE_KEY, pointer)
    engine.services.reset_recommender()
    log.info("model %s v%s is live (%s; previous: v%s)", PIPELINE_ARTIFACT, version, by, previous)
    return pointer


# -- versions --------------------------------------------------------------------------------
def is_good(meta: Mapping[str, Any]) -> bool:
    """A version that passed the gate, or one from before the gate (no verdict)."""
    gate = meta.get("gate")
    return gate is None or bool(gate.get("passed"))


def _describe(row: Any, live: int | None) -> dict[str, Any]:
    version, size, meta, created = row
    meta = dict(meta or {})
    gate = meta.get("gate")
    return {"version": int(version), "live": version == live, "ranker": meta.get("ranker"),
            "options": meta.get("options", {}), "created_at": float(created or 0.0),
            "bytes": int(size or 0),
            "data": {k: meta.get(k) for k in ("users", "items", "interactions", "modalities",
                                              "min_rating")},
            "metrics": meta.get("metrics", {}), "holdout": meta.get("holdout"),
            "gate": gate, "verdict": ("unchecked" if gate is None else
                                      "passed" if gate.get("passed") else "failed"),
            "forced": bool(meta.get("forced", False)), "good": is_good(meta),
            "seconds": meta.get("seconds"), "info": meta.get("info", {}),
            "warm_start": meta.get("warm_start")}


def list_models(engine: "Engine") -> list[dict[str, Any]]:
    """Every stored version of the pipeline, oldest first (see :func:`_describe`)."""
    live = live_version(engine)
    with engine.store.session() as s:
        rows = s.execute(select(Artifact.version, func.length(Artifact.data), Artifact.meta,
                                Artifact.created_at).where(Artifact.name == PIPELINE_ARTIFACT)
                         .order_by(Artifact.version)).all()
    return [_describe(r, live) for r in rows]


def show_model(engine: "Engine", version: int) -> dict[str, Any]:
    """One version (NotFoundError when absent)."""
    for model in list_models(engine):
        if model["version"] == int(version):
            return model
    raise NotFoundError(f"no version {version} of the model '{PIPELINE_ARTIFACT}' "
                        f"(run `polyrec models list`)")


def update_meta(engine: "Engine", version: int, **entries: Any) -> None:
    with engine.store.session() as s:
        row = s.execute(select(Artifact).where(Artifact.name == PIPELINE_ARTIFACT)
                        .where(Artifact.version == int(version))).scalars().one()
        row.meta = {**dict(row.meta or {}), **entries}


def activate(engine: "Engine", version: int) -> dict[str, Any]:
    """Make ``version`` live (an operator's choice: allowed whatever its gate verdict)."""
    set_live(engine, int(version), "activate")
    return show_model(engine, int(version))


def good_before(engine: "Engine", version: int | None, exclude: set[int] | None = None
                ) -> int | None:
    """The newest good version older than ``version`` (any version when None)."""
    exclude = exclude or set()
    for model in reversed(list_models(engine)):
        if (version is None or model["version"] < version) and model["good"] \
                and model["version"] not in exclude:
            return model["version"]
    return None


def rollback(engine: "Engine") -> dict[str, Any]:
    """Make the previous good version (before the live one) live."""
    live = live_version(engine)
    if live is None:
        raise NotFoundError("no trained model to roll back; run `polyrec train` first")
    target = good_before(engine, live)
    if target is None:
        raise NotFoundError(f"no good version before the live version {live} to roll back to "
                            f"(see `polyrec models list`)")
    set_live(engine, target, "rollback")
    return {"from": live, "to": target, "model": show_model(engine, target)}


def prune(engine: "Engine", keep: int) -> dict[str, Any]:
    """Delete all but the ``keep`` newest versions; the live version is always kept."""
    if keep < 1:
        raise ConfigError(f"--keep must be at least 1, not {keep}")
    freed = 0
    with engine.store.session() as s:  # the pointer cannot move until the deletes commit
        _lock_pointer(s)
        live = _live_in(s)
        versions = sorted(s.execute(select(Artifact.version)
                                    .where(Artifact.name == PIPELINE_ARTIFACT)).scalars(),
                          reverse=True)
        kept = set(versions[:keep]) | ({live} if live is not None else set())
        gone = sorted(v for v in versions if v not in kept)
        if gone:
            freed = int(s.execute(select(func.coalesce(func.sum(func.length(Artifact.data)), 0))
                                  .where(Artifact.name == PIPELINE_ARTIFACT)
                                  .where(Artifact.version.in_(gone))).scalar() or 0)
            s.execute(delete(Artifact).where(Artifact.name == PIPELINE_ARTIFACT)
                      .where(Artifact.version.in_(gone)))
        if live is not None and get_setting(s, LIVE_KEY) is None:
            # with no pointer, "latest" must not change meaning
            put_setting(s, LIVE_KEY, {"version": live, "previous": None, "by": "prune",
                                      "at": time.time()})
    return {"deleted": gone, "kept": sorted(kept), "live": live, "bytes_freed": freed}


# -- the gate ----------------------------------------------------------------------------------
def ranker_label(engine: "Engine", name: str) -> str:
    """'ranker NAME (plugin P)' for messages."""
    try:
        plugin = engine.registry("rankers").owner(name)
    except Exception:  # noqa: BLE001 - a label must never fail
        plugin = None
    return f"ranker '{name}'" + (f" (plugin '{plugin}')" if plugin else "")


def check_scores(scores: Any, n_users: int, n_items: int) -> str | None:
    """Why ``scores`` are not usable ([n_users, n_items], float, no NaN), or None."""
    if not isinstance(scores, torch.Tensor):
        return f"returned {type(scores).__name__}, not a tensor"
    if tuple(scores.shape) != (n_users, n_items):
        return (f"returned scores of shape {tuple(scores.shape)}, expected "
                f"[{n_users}, {n_items}] (users in the batch, items in the catalogue)")
    if bool(torch.isnan(scores.float()).any()):
        return f"returned NaN scores for {int(torch.isnan(scores.float()).any(1).sum())} user(s)"
    return None


def sample_users(data: TrainingData, n: int) -> torch.Tensor:
    """A deterministic, spread-out sample of up to ``n`` user indices with a history."""
    counts = torch.bincount(data.users, minlength=data.n_users)
    users = torch.nonzero(counts > 0).flatten()
    if len(users) <= n:
        return users
    pick = torch.linspace(0, len(users) - 1, n).round().long()
    return users[pick]


def _error(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


def run_gate(engine: "Engine", *, name: str, model: "Ranker", version: int,
             live: int | None, train: TrainingData, test: list[torch.Tensor], holdout: dict[str, Any],
             metrics: dict[str, float], config: dict[str, Any],
             per_user: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Checks (a), (b), (c) of the module docstring for the stored ``version``
    (``per_user``: the new model's :func:`per_user_metrics`). Returns {passed, checks:
    {scores, smoke, metric}, reasons: [...]}."""
    label = ranker_label(engine, name)
    checks: dict[str, Any] = {}
    reasons: list[str] = []
    users = sample_users(train, int(config["sample_users"]))
    show = bool(getattr(engine, "progress", False))
    # (a) shape and NaN over the whole current catalogue
    stage(f"gate: scores of {len(users)} users over {train.n_items:,} items", show)
    try:
        with torch.no_grad():
            scores = model.score_users(users, train)
        problem = check_scores(scores, len(users), train.n_items)
    except Exception as exc:  # noqa: BLE001 - any plugin failure is a gate failure
        problem = f"raised {_error(exc)}"
    checks["scores"] = {"passed": problem is None, "users": int(len(users)),
                        "items": train.n_items, **({"error": f"{label} {problem}"} if problem else {})}
    if problem:
        reasons.append(f"{label} {problem}")
    # (b) smoke recommendations through the serving code (the stored version, reloaded)
    smoke: dict[str, Any] = {"passed": False, "users": 0}
    if problem is None:
        stage(f"gate: {len(users)} recommendations through the serving code", show)
        smoke = smoke_test(engine, version, users, train, int(config["k"]))
        if not smoke["passed"]:
            reasons.append(smoke["error"])
    else:
        smoke["skipped"] = "the score check failed"
    checks["smoke"] = smoke
    # (c) the holdout metric against the live model's
    checks["metric"] = compare_to_live(engine, version, live, train, test, holdout,
                                       metrics, config, per_user)
    if checks["metric"].get("passed") is False:
        reasons.append(checks["metric"]["reason"])
    return {"passed": not reasons, "checks": checks, "reasons": reasons,
            "config": {k: config[k] for k in GATE_DEFAULTS}, "at": time.time()}


def smoke_test(engine: "Engine", version: int, users: torch.Tensor, train: TrainingData,
               k: int) -> dict[str, Any]:
    """Load ``version`` as serving does (strict: no fallback) and recommend to ``users``."""
    from polyrec.rank.recommend import Recommender
    with engine.store.session() as s:
        ext = dict(s.execute(select(User.id, User.external_id)).all())
    externals = [str(ext[train.user_ids[u]]) for u in users.tolist()]
    empty: list[str] = []
    try:
        rec = Recommender(engine, version, strict=True)
        for user in externals:
            if not rec.recommend(user, k):
                empty.append(user)
    except Exception as exc:  # noqa: BLE001
        label = ranker_label(engine, _ranker_of(engine, version))
        return {"passed": False, "users": len(externals),
                "error": f"smoke recommendation failed for {label}: {_error(exc)}"}
    if empty:
        return {"passed": False, "users": len(externals), "empty": empty[:10],
                "error": f"smoke recommendation returned nothing for {len(empty)} of "
                         f"{len(externals)} users (e.g. user {empty[0]})"}
    return {"passed": True, "users": len(externals), "k": k}


def _ranker_of(engine: "Engine", version: int) -> str:
    try:
        return str(show_model(engine, version)["ranker"])
    except NotFoundError:
        return "?"


def compare_to_live(engine: "Engine", version: int, live: int | None, train: TrainingData,
                    test: list[torch.Tensor], holdout: dict[str, Any],
                    metrics: dict[str, float], config: dict[str, Any],
                    per_user: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Check (c): {passed: True/False/None (skipped), reason, new, live, ...}."""
    metric = str(config["metric"])
    if live is None or live == version:
        return {"passed": None, "reason": "no live model to compare with", "metric": metric,
                "new": metrics.get(metric)}
    live_meta = show_model(engine, live)
    recorded = live_meta.get("holdout") or {}
    if recorded.get("rule") != holdout.get("rule") or recorded.get("share") != holdout.get("share"):
        return {"passed": None, "live_version": live, "metric": metric, "new": metrics.get(metric),
                "reason": f"skipped: the live version {live} was trained without the holdout "
                          f"rule (trained before the gate), so it cannot be compared fairly"}
    if metric not in metrics:
        return {"passed": None, "live_version": live, "metric": metric,
                "reason": "skipped: no held-out pairs to measure"}
    try:
        from polyrec.rank.recommend import load_ranker
        stage(f"gate: version {version} against the live version {live} on "
              f"{sum(1 for t in test if len(t)):,} held-out users",
              bool(getattr(engine, "progress", False)))
        ranker, _ = load_ranker(engine, live)
        live_users = per_user_metrics(ranker, train, test)[metric]
    except Exception as exc:  # noqa: BLE001 - the live model no longer fits the data
        return {"passed": None, "live_version": live, "metric": metric, "new": metrics[metric],
                "reason": f"skipped: the live version {live} could not be evaluated on the "
                          f"current data ({_error(exc)})"}
    new_users = per_user.get(metric) if per_user else None
    if new_users is None or len(new_users) != len(live_users):
        return {"passed": None, "live_version": live, "metric": metric,
                "reason": "skipped: the new model's per-user metrics are missing"}
    diff = live_users - new_users  # paired over the same held-out users
    new, old = float(new_users.mean()), float(live_users.mean())
    se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    tol = float(config["tolerance"])
    allowed = max(tol, 2.0 * se)
    ok = not (old - new > allowed)
    return {"passed": ok, "live_version": live, "metric": metric, "new": round(new, 5),
            "live": round(old, 5), "tolerance": tol, "standard_error": round(se, 5),
            "allowed_drop": round(allowed, 5), "users": int(len(diff)),
            "reason": (f"{metric} {new:.4f} vs live version {live} {old:.4f} on "
                       f"{len(diff)} held-out users (allowed drop {allowed:.4f} = max("
                       f"tolerance {tol:g}, 2 x SE {se:.4f})): "
                       + ("ok" if ok else "worse than the live model"))}
