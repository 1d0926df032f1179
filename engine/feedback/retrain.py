"""Retraining schedule: retrain when enough new events or items arrived since the last
trained model (``polyrec retrain --if-stale``).

Each retrain done here records a marker (setting ``retrain.marker``): the model artifact
it produced and the highest interaction and item ids at that time, so staleness is exact
("N events and M items since"). A model trained another way (``polyrec train``) is
measured from its artifact: its ``meta`` ids when present, else the store as it was when
the model was first seen.

A retrain refits the *live* model's ranker (polyrec.rank.registry) with its stored
options and positives threshold, asks for a warm start from its weights (used by rankers
with ``warm_start(state)``), and goes through the same gate as ``polyrec train``: a
version that fails is stored but the live one keeps serving.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from polyrec.store.models import Artifact, Interaction, Item
from polyrec.store.settings import get_setting, put_setting

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

MARKER_KEY = "retrain.marker"
#: Artifact kinds that are not recommendation models (encoder side products).
NOT_MODELS = ("kg_embeddings",)


def latest_model(engine: "Engine") -> dict[str, Any] | None:
    """{name, version, created_at, meta} of the model staleness is measured from: the
    live version of the pipeline when one is live (what serves: after a rollback to an
    older version, that one), else the newest trained model artifact; None without one."""
    try:  # the serving module names its artifact
        from polyrec.rank.registry import live_version
        from polyrec.rank.train import PIPELINE_ARTIFACT
        names = [PIPELINE_ARTIFACT]
        live = live_version(engine)
    except (ImportError, AttributeError):
        names, live = None, None
    query = select(Artifact.name, Artifact.version, Artifact.created_at, Artifact.meta)
    if names:
        query = query.where(Artifact.name.in_(list(names)))
        if live is not None:
            query = query.where(Artifact.version == int(live))
    else:
        query = query.where(Artifact.kind.notin_(NOT_MODELS))
    order = (Artifact.created_at.desc(), Artifact.id.desc())
    with engine.store.session() as s:
        row = s.execute(query.order_by(*order).limit(1)).first()
        if row is None and live is not None:  # the pointer names no stored version
            row = s.execute(select(Artifact.name, Artifact.version, Artifact.created_at,
                                   Artifact.meta).where(Artifact.name.in_(list(names or [])))
                            .order_by(*order).limit(1)).first()
    if row is None:
        return None
    return {"name": row[0], "version": row[1], "created_at": row[2], "meta": dict(row[3] or {})}


def _marker(engine: "Engine") -> dict[str, Any] | None:
    with engine.store.session() as s:
        value = get_setting(s, MARKER_KEY)
    return dict(value) if value is not None else None


def _save_marker(engine: "Engine", marker: dict[str, Any]) -> None:
    with engine.store.session() as s:
        put_setting(s, MARKER_KEY, marker)


def _store_ids(engine: "Engine") -> tuple[int, int]:
    with engine.store.session() as s:
        return (int(s.execute(select(func.max(Interaction.id))).scalar() or 0),
                int(s.execute(select(func.max(Item.id))).scalar() or 0))


def model_marker(engine: "Engine", model: dict[str, Any]) -> dict[str, Any]:
    """{max_event_id, max_item_id, basis}: what the store held when ``model`` (a
    :func:`latest_model` dict) was trained: from the marker of the retrain that made it,
    else from its metadata, else the store as it is when the model is first seen (that
    marker is then recorded, so the answer stays the same)."""
    ident = {"name": model["name"], "version": model["version"]}
    marker = _marker(engine)
    meta = model.get("meta") or {}
    if marker is not None and marker.get("model") == ident:
        return {"max_event_id": int(marker["max_event_id"]),
                "max_item_id": int(marker["max_item_id"]), "basis": "retrain marker"}
    if "max_interaction_id" in meta:
        return {"max_event_id": int(meta["max_interaction_id"]),
                "max_item_id": int(meta.get("max_item_id", 0)), "basis": "model metadata"}
    events_after, items_after = _store_ids(engine)
    _save_marker(engine, {"model": ident, "max_event_id": events_after,
                          "max_item_id": items_after, "at": time.time(), "first_seen": True})
    return {"max_event_id": events_after, "max_item_id": items_after, "basis": "first seen"}


def staleness(engine: "Engine") -> dict[str, Any]:
    """How much arrived since the last model: {model, new_events, new_items, basis}."""
    model = latest_model(engine)
    if model is None:
        return {"model": None, "new_events": None, "new_items": None, "basis": "no trained model"}
    marker = model_marker(engine, model)
    with engine.store.session() as s:
        new_events = s.execute(select(func.count()).select_from(Interaction)
                               .where(Interaction.id > marker["max_event_id"])).scalar_one()
        if marker["max_item_id"]:
            new_items = s.execute(select(func.count()).select_from(Item)
                                  .where(Item.id > marker["max_item_id"])).scalar_one()
        else:
            new_items = s.execute(select(func.count()).select_from(Item)
                                  .where(Item.created_at > model["created_at"])).scalar_one()
    return {"model": {"name": model["name"], "version": model["version"]},
            "new_events": int(new_events), "new_items": int(new_items), "basis": marker["basis"]}


def live_training(engine: "Engine") -> dict[str, Any] | None:
    """How the live model was trained: {version, ranker, options, min_rating}, or None
    when no model is live (polyrec.rank.registry)."""
    from polyrec.rank import registry
    version = registry.live_version(engine)
    if version is None:
        return None
    try:
        model = registry.show_model(engine, version)
    except Exception:  # noqa: BLE001 - the pointer names a pruned version
        return None
    return {"version": version, "ranker": model["ranker"], "options": dict(model["options"] or {}),
            "min_rating": float(model["data"].get("min_rating") or 4.0)}


def retrain(engine: "Engine", *, if_stale: bool = False, min_new_events: int | None = None,
            min_new_items: int | None = None, train_options: dict[str, Any] | None = None,
            encode: bool = True, force: bool = False, warm_start: bool = True
            ) -> dict[str, Any]:
    """Encode new items (cached vectors reused, unless ``encode`` is False) and refit the
    live model's ranker with its stored options and positives threshold (the default
    pipeline when nothing is live), warm-started from the live weights when the ranker
    has ``warm_start(state)``. The new version goes through the model registry's gate
    like any training (``force`` skips it). With ``if_stale`` only when the new events or
    new items reach their thresholds (defaults from the feedback settings
    ``retrain.*``). ``train_options`` (Engine.train keywords) override what the live
    model used. Returns a report dict with ``summary``."""
    from polyrec.feedback.events import hub
    config = hub(engine).config["retrain"]
    min_events = int(config["min_new_events"] if min_new_events is None else min_new_events)
    min_items = int(config["min_new_items"] if min_new_items is None else min_new_items)
    state = staleness(engine)
    report: dict[str, Any] = {"staleness": state, "thresholds": {"min_new_events": min_events,
                                                                 "min_new_items": min_items}}
    if state["model"] is None:
        reason = "no trained model yet"
    elif state["new_events"] >= min_events:
        reason = f"{state['new_events']:,} new events (threshold {min_events:,})"
    elif state["new_items"] >= min_items:
        reason = f"{state['new_items']:,} new items (threshold {min_items:,})"
    else:
        reason = None
    if if_stale and reason is None:
        report.update(retrained=False, summary=(
            f"up to date: {state['new_events']:,} new events (< {min_events:,}) and "
            f"{state['new_items']:,} new items (< {min_items:,}) since model "
            f"{state['model']['name']} v{state['model']['version']}"))
        return report
    max_event_id, max_item_id = _store_ids(engine)
    start = time.perf_counter()
    encoded = engine.encode() if encode else None
    encode_s = time.perf_counter() - start
    live = live_training(engine)
    kwargs: dict[str, Any] = {}
    if live is not None:
        kwargs = {"ranker": live["ranker"], "options": live["options"],
                  "min_rating": live["min_rating"]}
        if warm_start:
            kwargs["warm_start"] = live["version"]
    kwargs.update(train_options or {})
    start = time.perf_counter()
    trained = engine.train(force=force, **kwargs)
    train_s = time.perf_counter() - start
    model = latest_model(engine)
    ident = {"name": model["name"], "version": model["version"]} if model else None
    _save_marker(engine, {"model": ident, "max_event_id": max_event_id,
                          "max_item_id": max_item_id, "at": time.time()})
    hub(engine).reset_space()
    n_encoded = int(getattr(encoded, "encoded", 0) or 0)
    per_encoder = {e.encoder: {"encoded": e.encoded, "cached": e.cached, "error": e.error}
                   for e in getattr(encoded, "encoders", [])}
    gate_note = ("" if trained.activated else
                 f"; NOT live (gate: {'; '.join(trained.gate.get('reasons', []))}), "
                 f"v{trained.live_version} still serves")
    report.update(retrained=True, reason=reason or "asked to", model=ident,
                  refit_of=live, ranker=trained.ranker, activated=trained.activated,
                  live_version=trained.live_version, gate=trained.gate,
                  metrics=trained.metrics, warm_start=trained.warm_start,
                  encoded_items=n_encoded, encoders=per_encoder, encode_seconds=round(encode_s, 2),
                  train_seconds=round(train_s, 2),
                  summary=(f"retrained ({reason or 'asked to'}): encoded {n_encoded:,} new or "
                           f"changed item vectors in {encode_s:.1f} s, trained "
                           + (f"{ident['name']} v{ident['version']}" if ident else "the model")
                           + f" ({trained.ranker}"
                           + (f", refit of live v{live['version']}" if live else ", default pipeline")
                           + f") in {train_s:.1f} s" + gate_note))
    return report
