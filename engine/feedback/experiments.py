"""A/B experiments: deterministic assignment of users to variants, the variant recorded
with every event, and a report of click-through and conversion per variant.

A user's variant is a pure function of (experiment name, user external id): a SHA-256
hash mapped to [0, 1) and cut by the variants' weights, so every process and every
restart agrees without coordination. The first assignment is also written to
``experiment_assignments`` (for counting users), and :mod:`polyrec.feedback.events` tags each
stored event's context with ``{"experiments": {name: variant}}`` for the user's active
experiments. A variant's ``options`` are passed to ``Engine.recommend`` by :func:`serve`.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from sqlalchemy import Connection, distinct, func, select
from sqlalchemy.orm import Session

from polyrec.store import catalog
from polyrec.errors import ConfigError, NotFoundError
from polyrec.store.models import Experiment, ExperimentAssignment, Interaction

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

#: How long (seconds) one process trusts its cached list of active experiments.
CACHE_SECONDS = 2.0
#: Event kinds that count as a conversion.
CONVERSION_KINDS = ("purchase",)


# -- definition ------------------------------------------------------------------------------
def _normalize_variants(variants: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if len(variants) < 2:
        raise ConfigError("an experiment needs at least two variants")
    out: dict[str, dict[str, Any]] = {}
    for name, spec in variants.items():
        name = str(name).strip()
        if not name:
            raise ConfigError("a variant needs a name")
        if isinstance(spec, (int, float)):
            spec = {"weight": spec}
        spec = dict(spec or {})
        weight = float(spec.get("weight", 1.0))
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"variant '{name}' needs a positive weight, not {weight}")
        options = spec.get("options") or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"options of variant '{name}' must be a mapping")
        out[name] = {"weight": weight, "options": dict(options)}
    return out


def create(engine: "Engine", name: str, variants: Mapping[str, Any]) -> dict[str, Any]:
    """Create (or redefine, keeping assignments) an active experiment.

    ``variants`` maps a variant name to its weight or to ``{"weight": w, "options":
    {...recommend options...}}``, e.g. ``{"control": 1, "frozen": {"weight": 1,
    "options": {"online": False}}}``.
    """
    name = str(name).strip()
    if not name:
        raise ConfigError("an experiment needs a name")
    spec = _normalize_variants(variants)
    with engine.store.session() as s:
        row = s.execute(select(Experiment).where(Experiment.name == name)).scalar_one_or_none()
        if row is None:
            s.add(Experiment(name=name, variants=spec, active=True, created_at=time.time()))
        else:
            row.variants, row.active = spec, True
    _invalidate(engine)
    return {"name": name, "variants": spec, "active": True}


def stop(engine: "Engine", name: str) -> None:
    """Stop tagging events with this experiment (its data stays for the report)."""
    with engine.store.session() as s:
        _get(s, name).active = False
    _invalidate(engine)


def list_experiments(engine: "Engine") -> list[dict[str, Any]]:
    """Every experiment with its variants, state and number of assigned users."""
    with engine.store.session() as s:
        counts = dict(s.execute(select(ExperimentAssignment.experiment_id, func.count())
                                .group_by(ExperimentAssignment.experiment_id)).all())
        return [{"name": e.name, "active": bool(e.active), "variants": e.variants,
                 "users": counts.get(e.id, 0), "created_at": e.created_at}
                for e in s.execute(select(Experiment).order_by(Experiment.id)).scalars()]


def _get(s: Session, name: str) -> Experiment:
    row = s.execute(select(Experiment).where(Experiment.name == name)).scalar_one_or_none()
    if row is None:
        known = ", ".join(s.execute(select(Experiment.name)).scalars()) or "none"
        raise NotFoundError(f"no experiment named '{name}' (known: {known})")
    return row


# -- assignment ------------------------------------------------------------------------------
def bucket(experiment: str, user: str) -> float:
    """The user's deterministic position in [0, 1) for this experiment."""
    digest = hashlib.sha256(f"{experiment}\x1f{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def choose(experiment: str, variants: Mapping[str, Mapping[str, Any]], user: str) -> str:
    """The variant of ``user``: its bucket cut by the weights (variants in name order)."""
    names = sorted(variants)
    total = sum(float(variants[n]["weight"]) for n in names)
    point, edge = bucket(experiment, user) * total, 0.0
    for n in names:
        edge += float(variants[n]["weight"])
        if point < edge:
            return n
    return names[-1]


@dataclass
class _Cache:
    """Active experiments (id, name, variants) and the assignments already written."""

    loaded_at: float = -1e18
    active: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    written: set[tuple[int, int]] = field(default_factory=set)


def _cache(engine: "Engine") -> _Cache:
    from polyrec.feedback.events import hub
    h = hub(engine)
    if h.experiment_cache is None:
        h.experiment_cache = _Cache()
    return h.experiment_cache


def _invalidate(engine: "Engine") -> None:
    _cache(engine).loaded_at = -1e18


def _active(engine: "Engine", conn: Connection) -> list[tuple[int, str, dict[str, Any]]]:
    cache = _cache(engine)
    if time.monotonic() - cache.loaded_at > CACHE_SECONDS:
        cache.active = [(i, n, dict(v)) for i, n, v in conn.execute(
            select(Experiment.id, Experiment.name, Experiment.variants)
            .where(Experiment.active.is_(True)).order_by(Experiment.id))]
        cache.loaded_at = time.monotonic()
    return cache.active


def tag_users(engine: "Engine", conn: Connection, users: Mapping[int, str]) -> dict[int, dict[str, str]]:
    """{user id: {experiment: variant}} for the active experiments, recording first
    assignments through ``conn`` (the caller's transaction). ``users`` maps id -> external id."""
    from polyrec.feedback.events import dialect_insert
    active = _active(engine, conn)
    if not active or not users:
        return {}
    cache = _cache(engine)
    out: dict[int, dict[str, str]] = {}
    fresh = []
    for uid, ext in users.items():
        tags = {}
        for exp_id, name, variants in active:
            variant = choose(name, variants, ext)
            tags[name] = variant
            if (exp_id, uid) not in cache.written:
                fresh.append({"experiment_id": exp_id, "user_id": uid, "variant": variant,
                              "assigned_at": time.time()})
        out[uid] = tags
    if fresh:
        stmt = dialect_insert(conn.dialect.name, ExperimentAssignment.__table__)
        conn.execute(stmt.on_conflict_do_nothing(index_elements=["experiment_id", "user_id"]), fresh)
        cache.written.update((r["experiment_id"], r["user_id"]) for r in fresh)
    return out


def assign(engine: "Engine", name: str, user: str) -> str:
    """The variant of ``user`` in experiment ``name`` (recording the assignment)."""
    with engine.store.session() as s:
        exp = _get(s, name)
        variant = choose(exp.name, exp.variants, str(user))
        uid = catalog.ensure_users(s, [str(user)])[str(user)]
        stmt = catalog._insert(s, ExperimentAssignment.__table__).on_conflict_do_nothing(
            index_elements=["experiment_id", "user_id"])
        s.execute(stmt, [{"experiment_id": exp.id, "user_id": uid, "variant": variant,
                          "assigned_at": time.time()}])
    return variant


# -- serving ---------------------------------------------------------------------------------
def serve(engine: "Engine", user: str, k: int = 10, *, experiment: str | None = None,
          log_impressions: bool = True, **options: Any) -> tuple[str | None, list[Any]]:
    """Recommend for ``user`` under an experiment: the user's variant's options are
    passed to ``Engine.recommend``, and each shown item is recorded as an impression
    (tagged with the variant and its rank). Returns (variant or None, recommendations)."""
    variant = None
    if experiment is not None:
        with engine.store.session() as s:
            exp = _get(s, experiment)
            variants = dict(exp.variants)
        variant = choose(experiment, variants, str(user))
        options = {**variants[variant].get("options", {}), **options}
    recs = engine.recommend(user, k=k, **options)
    if log_impressions and recs:
        context = {"experiments": {experiment: variant}} if experiment else {}
        engine.feedback_many([{"user": user, "item": r.item, "kind": "impression",
                               "context": {**context, "rank": rank, "score": float(r.score)}}
                              for rank, r in enumerate(recs)])
    return variant, recs


# -- report ----------------------------------------------------------------------------------
def wilson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (0, 0 when there are no trials)."""
    if trials <= 0:
        return 0.0, 0.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_p(s1: int, n1: int, s2: int, n2: int) -> float | None:
    """Two-sided p-value of a pooled two-proportion z-test (None without data)."""
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (s1 + s2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (s1 / n1 - s2 / n2) / se
    return 2.0 * (1.0 - NormalDist().cdf(abs(z)))


def report(engine: "Engine", name: str, *, confidence: float = 0.95,
           conversion_kinds: Sequence[str] = CONVERSION_KINDS) -> dict[str, Any]:
    """Per variant: assigned users, impressions, clicks, CTR (clicks / impressions) and
    conversion (exposed users with a conversion event / users with an impression), each
    with a Wilson confidence interval, and the p-value against the first variant."""
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be between 0 and 1, not {confidence}")
    with engine.store.session() as s:
        exp = _get(s, name)
        variants = sorted(exp.variants)
        users = dict(s.execute(select(ExperimentAssignment.variant, func.count())
                               .where(ExperimentAssignment.experiment_id == exp.id)
                               .group_by(ExperimentAssignment.variant)).all())
        tag = Interaction.context[("experiments", name)].as_string()
        counts = s.execute(select(tag, Interaction.kind, func.count(),
                                  func.count(distinct(Interaction.user_id)))
                           .where(tag.is_not(None))
                           .where(Interaction.kind.in_(["impression", "click", *conversion_kinds]))
                           .group_by(tag, Interaction.kind)).all()
        exposed_users = {v: set() for v in variants}
        for variant, uid in s.execute(select(tag, Interaction.user_id).distinct()
                                      .where(Interaction.kind == "impression").where(tag.is_not(None))):
            exposed_users.setdefault(variant, set()).add(uid)
        converted_users = {v: set() for v in variants}
        for variant, uid in s.execute(select(tag, Interaction.user_id).distinct()
                                      .where(Interaction.kind.in_(list(conversion_kinds)))
                                      .where(tag.is_not(None))):
            converted_users.setdefault(variant, set()).add(uid)
    table: dict[str, dict[str, int]] = {v: {} for v in variants}
    for variant, kind, n, _ in counts:
        table.setdefault(variant, {})[kind] = int(n)
    rows = []
    for v in sorted(table, key=lambda x: (x not in variants, variants.index(x) if x in variants else 0, x)):
        imps, clicks = table[v].get("impression", 0), table[v].get("click", 0)
        exp_users = exposed_users.get(v, set())
        conv = len(converted_users.get(v, set()) & exp_users)
        rows.append({"variant": v, "users": int(users.get(v, 0)), "impressions": imps,
                     "clicks": clicks, "ctr": clicks / imps if imps else 0.0,
                     "ctr_ci": list(wilson(min(clicks, imps), imps, confidence)),
                     "exposed_users": len(exp_users), "converted_users": conv,
                     "conversion": conv / len(exp_users) if exp_users else 0.0,
                     "conversion_ci": list(wilson(conv, len(exp_users), confidence))})
    if rows:
        base = rows[0]
        for r in rows[1:]:
            r["ctr_p_value"] = two_proportion_p(min(r["clicks"], r["impressions"]), r["impressions"],
                                                min(base["clicks"], base["impressions"]),
                                                base["impressions"])
    return {"experiment": name, "active": bool(exp.active), "confidence": confidence,
            "variants": rows}
