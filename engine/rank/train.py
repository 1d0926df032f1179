"""Training a ranker into the model registry.

``build_ranker`` instantiates a ranker from the engine's registry with the context
options it declares; ``train`` fits one (the default pipeline unless one is named) on the
store's positive interactions and saves it as the next version of the artifact
``pipeline`` (see polyrec.rank.recommend for serving it).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from sqlalchemy import func, select

from polyrec.contracts import Ranker
from polyrec.errors import ConfigError
from polyrec.progress import stage
from polyrec.rank import registry
from polyrec.rank.registry import HOLDOUT_SHARE
from polyrec.store.artifacts import from_bytes, load_artifact, save_artifact, to_bytes
from polyrec.rank.dataset import build_training_data
from polyrec.store.models import Interaction, Item
from polyrec.training_data import TrainingData

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine


#: The default pipeline ("hybrid", plugins/rank_rerank.py): EASE retrieves, and a click
#: model learned on validation data re-scores its top candidates from content similarity
#: (text, KG, image vectors) to the history and the latest items, popularity and recency.
DEFAULT_RANKER = "hybrid"
DEFAULT_OPTIONS: dict[str, Any] = {}
PIPELINE_ARTIFACT = registry.PIPELINE_ARTIFACT  # "pipeline"
log = logging.getLogger("polyrec.models")
#: Options the engine fills in for rankers that accept them (see ``build_ranker``).
CONTEXT_OPTIONS = ("device", "fusers", "progress")


@dataclass
class TrainReport:
    """What ``train`` did: the ranker and options, the artifact version, data sizes, the
    gate's verdict and whether the version went live."""

    ranker: str
    options: dict[str, Any]
    version: int
    seconds: float
    users: int
    items: int
    interactions: int
    modalities: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    activated: bool = True
    forced: bool = False
    live_version: int | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    warm_start: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

# -- building rankers ---------------------------------------------------------------------
def _accepts(cls: type, key: str) -> bool:
    """True when ranker class ``cls`` declares option ``key`` in its ``defaults``."""
    schema = cls.option_schema() if hasattr(cls, "option_schema") else {}
    return key in schema


def build_ranker(engine: "Engine", name: str, options: Mapping[str, Any] | None = None) -> Ranker:
    """Instantiate ranker ``name`` from the engine's registry. The options are checked and
    converted against the ranker's declared ``defaults`` (``Ranker.check_options``: one
    ConfigError naming ranker, option and expected type); rankers that declare the option
    get the engine's device, fuser registry and progress setting; composite rankers get a
    ``factory`` that builds members the same way."""
    registry = engine.registry("rankers")
    cls = registry.get(name)
    opts = cls.check_options(dict(options or {})) if hasattr(cls, "check_options") \
        else dict(options or {})
    context = {"device": str(engine.device), "fusers": engine.registry("fusers"),
               "progress": bool(engine.progress)}
    for key in CONTEXT_OPTIONS:
        if key not in opts and (_accepts(cls, key) or key == "fusers" and _accepts(cls, "fuser")):
            opts[key] = context[key]
    if getattr(cls, "composite", False):
        opts.setdefault("factory", lambda n, o=None: build_ranker(engine, n, o))
    return cls(**opts)


def with_option(engine: "Engine", name: str, options: dict[str, Any], key: str,
                value: Any) -> dict[str, Any]:
    """Set ``key`` on a ranker's options, or on every member (ensemble ``members``,
    re-ranker ``base`` and ``scorers``) whose ranker declares it; rankers that do not are
    left alone. The value is converted to the option's declared type."""
    registry = engine.registry("rankers")
    cls = registry.get(name)
    out = dict(options)
    if _accepts(cls, key):
        out[key] = cls.check_options({key: value})[key]
    for group in ("members", "scorers"):  # ensemble members, re-ranker scorers
        declared = (getattr(cls, "default_members", None) if group == "members" else None) \
            or cls.default_options().get(group)
        specs = out.get(group, declared)
        if not specs or not isinstance(specs, (list, tuple, str)):
            continue
        new = []
        for m in specs.split("+") if isinstance(specs, str) else specs:
            spec = {"name": m, "options": {}} if isinstance(m, str) else dict(m)
            spec["options"] = with_option(engine, spec["name"], dict(spec.get("options") or {}),
                                          key, value)
            new.append(spec)
        out[group] = new
    base = out.get("base", cls.default_options().get("base") if _accepts(cls, "base") else None)
    if isinstance(base, str):
        out["base_options"] = with_option(engine, base, dict(out.get("base_options") or {}),
                                          key, value)
    return out


def _serialisable(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options without what the engine injects (rebuilt at load time)."""
    drop = set(CONTEXT_OPTIONS) | {"factory"}
    out: dict[str, Any] = {}
    for k, v in options.items():
        if k in drop:
            continue
        if isinstance(v, Mapping):
            v = _serialisable(v)
        elif isinstance(v, (list, tuple)):
            v = [_serialisable(x) if isinstance(x, Mapping) else x for x in v]
        out[k] = v
    return out


# -- training ----------------------------------------------------------------------------
def train(engine: "Engine", ranker: str | None = None, *, options: Mapping[str, Any] | None = None,
          epochs: int | None = None, seed: int | None = None, min_rating: float = 4.0,
          data: TrainingData | None = None, force: bool = False,
          gate: Mapping[str, Any] | None = None, warm_start: int | None = None,
          holdout: float = HOLDOUT_SHARE,
          fit: Callable[[Ranker, TrainingData], None] | None = None) -> TrainReport:
    """Fit ``ranker`` (the default pipeline when None) on the store's positives (less the
    registry's holdout) and save it as the next version of the ``pipeline`` artifact. The
    version goes live only when it passes the gate (polyrec.rank.registry), or with
    ``force``; ``report.activated`` and ``report.gate`` say what happened.

    ``epochs``/``seed`` reach every ranker in the pipeline that takes them; ``options`` go
    to the named ranker; ``gate`` overrides gate settings (``tolerance``, ...);
    ``warm_start`` (a stored version of the same ranker) is handed to a ranker that has
    ``warm_start(state)`` before it is fitted; ``holdout`` is the held-out share (0: none,
    and then no metric comparison is possible later). ``fit(ranker, data)`` fits the
    built ranker in place of ``ranker.fit(data)`` (polyrec.cluster.train: on Ray)."""
    name = ranker or DEFAULT_RANKER
    opts: dict[str, Any] = dict(DEFAULT_OPTIONS) if ranker is None else {}
    opts.update(dict(options or {}))
    for key, value in (("epochs", epochs), ("seed", seed)):
        if value is not None:
            opts = with_option(engine, name, opts, key, value)
    gate_settings = registry.gate_config(engine, gate)  # a bad setting fails before any work
    show = bool(engine.progress)
    stage("train: reading the positive interactions", show)
    with engine.store.snapshot() as s:  # the data and what the store held, in one snapshot:
        seen_up_to = {  # the online learners start after it
            "max_interaction_id": int(s.execute(select(func.max(Interaction.id))).scalar() or 0),
            "max_item_id": int(s.execute(select(func.max(Item.id))).scalar() or 0)}
        if data is None:
            data = build_training_data(engine, min_rating=min_rating, session=s)
    if len(data.users) == 0:
        raise ConfigError("no positive interactions to train on; ingest interactions first")
    fit_data, test, held = registry.split_holdout(engine, data, holdout,
                                                  int(gate_settings["holdout_users"]))
    model = build_ranker(engine, name, opts)
    warm = _warm_start(engine, model, name, warm_start)
    stage(f"train: fitting {name} on {len(fit_data.users):,} positives of {data.n_users:,} users "
          f"over {data.n_items:,} items ({held['pairs']:,} held out for the gate)", show)
    start = time.perf_counter()
    if fit is None:
        model.fit(fit_data)
    else:
        fit(model, fit_data)
    seconds = time.perf_counter() - start
    stage(f"train: {name} fitted in {seconds:.1f}s; measuring it on {_evaluated(held)}", show)
    per_user: dict[str, torch.Tensor] = {}
    try:
        per_user = registry.per_user_metrics(model, fit_data, test)
        metrics: dict[str, Any] = registry.summarise(per_user, test)
        if metrics and held.get("evaluated_users", 0) < held.get("users", 0):
            metrics["held_out_users"] = held["users"]  # the metrics are of a sample of them
    except Exception as exc:  # noqa: BLE001 - the gate reports a broken ranker
        metrics = {"error": f"{type(exc).__name__}: {exc}"}
    info = dict(getattr(model, "info", {}) or {})
    saved_options = _serialisable(opts)
    payload = {"ranker": name, "options": saved_options, "state": model.state(),
               "min_rating": min_rating}
    meta = {"ranker": name, "options": saved_options, "min_rating": min_rating,
            "users": data.n_users, "items": data.n_items, "interactions": int(len(fit_data.users)),
            "modalities": list(data.item_features), "seconds": round(seconds, 2),
            "info": _jsonable(info), "holdout": held, "metrics": metrics, "warm_start": warm,
            # until the gate has run the version is not good (an interrupted gate leaves
            # it so: never a fallback or rollback target)
            "gate": {"passed": False, "pending": True, "reasons": ["the gate has not run"]},
            **seen_up_to}
    live = registry.live_version(engine)
    if not registry.has_pointer(engine):  # storing a version must not make it live, not
        registry.pin_live(engine, live, "registry")  # even for a moment (live may be None)
    with engine.store.session() as s:
        version = save_artifact(s, PIPELINE_ARTIFACT, "pipeline", to_bytes(payload), meta)
    stage(f"train: stored as version {version}; running the gate", show)
    try:
        verdict = registry.run_gate(engine, name=name, model=model, version=version, live=live,
                                    train=fit_data, test=test, holdout=held, metrics=metrics,
                                    config=gate_settings, per_user=per_user)
    except Exception as exc:  # noqa: BLE001 - a gate that cannot run is a failed gate
        verdict = {"passed": False, "checks": {},
                   "reasons": [f"the gate could not run: {type(exc).__name__}: {exc}"]}
    activated = bool(verdict["passed"] or force)
    forced = bool(force and not verdict["passed"])
    registry.update_meta(engine, version, gate=_jsonable(verdict), forced=forced)
    if activated:
        registry.set_live(engine, version, "train --force" if forced else "train")
    else:
        log.info("pipeline v%s stored but not live: %s", version, "; ".join(verdict["reasons"]))
    return TrainReport(name, saved_options, version, seconds, data.n_users, data.n_items,
                       int(len(fit_data.users)), list(data.item_features), _jsonable(info),
                       activated=activated, forced=forced, live_version=registry.live_version(engine),
                       gate=_jsonable(verdict), metrics=metrics, warm_start=warm)


def _evaluated(held: Mapping[str, Any]) -> str:
    """'the N held-out users' or 'N of the M held-out users (gate setting holdout_users)'."""
    users, evaluated = int(held.get("users", 0)), int(held.get("evaluated_users", 0))
    if evaluated < users:
        return (f"{evaluated:,} of the {users:,} held-out users (a fixed sample: gate setting "
                f"holdout_users)")
    return f"the {users:,} held-out users"


def _warm_start(engine: "Engine", model: Ranker, name: str, version: int | None
                ) -> dict[str, Any] | None:
    """Hand the stored state of ``version`` to ``model.warm_start`` when the ranker has
    one and the version holds the same ranker; a record of what happened (None when no
    warm start was asked for)."""
    if version is None:
        return None
    with engine.store.session() as s:
        stored = load_artifact(s, PIPELINE_ARTIFACT, version)
    payload = from_bytes(stored.data)
    if payload.get("ranker") != name:
        return {"from": version, "used": False,
                "reason": f"version {version} holds ranker '{payload.get('ranker')}', not '{name}'"}
    try:
        used = bool(model.warm_start(payload["state"]))
    except Exception as exc:  # noqa: BLE001 - a failed warm start falls back to a cold one
        return {"from": version, "used": False, "reason": f"warm_start raised {type(exc).__name__}: {exc}"}
    if not used:
        return {"from": version, "used": False,
                "reason": f"ranker '{name}' does not warm-start: fitted from scratch"}
    return {"from": version, "used": True}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


