"""Intent models (contract ``IntentModel``): training from the store, storing, loading.

``train_intent`` builds an :class:`~polyrec.IntentData` (the catalogue, the text encoder's
stored item vectors, demand and user histories from the interactions), fits the named
intent model and stores it as an artifact (default name ``intent``, kind
``intent_model``) whose meta records the model, its options, the encoder and the
encoder's fingerprint. ``load_intent`` restores the latest version and refuses it
(ConfigError) when the encoder's fingerprint has changed since: the model reads vectors
of one space only. Search uses the loaded model on the query vector it already has.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from sqlalchemy import func, select

from polyrec.contracts import EncoderContext, IntentData, IntentModel, IntentPrediction
from polyrec.errors import ConfigError, NotFoundError
from polyrec.progress import stage
from polyrec.store.artifacts import from_bytes, load_artifact, save_artifact, to_bytes
from polyrec.store.models import Artifact, Interaction

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine

ARTIFACT = "intent"
KIND = "intent_model"
DEFAULT_MODEL = "multitask"
DEFAULT_ENCODER = "bert"


@dataclass
class IntentReport:
    """What ``train_intent`` did: the artifact version, the model's info and timings."""

    name: str
    version: int
    model: str
    encoder: str
    fingerprint: str
    options: dict[str, Any]
    info: dict[str, Any]
    seconds: float
    data_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"artifact": self.name, "version": self.version, "model": self.model,
                "encoder": self.encoder, "fingerprint": self.fingerprint,
                "options": self.options, "info": self.info, "seconds": round(self.seconds, 2),
                "data_seconds": round(self.data_seconds, 2)}


@dataclass
class LoadedIntent:
    """A stored intent model, restored and checked against its encoder."""

    model: IntentModel
    name: str
    version: int
    encoder: str
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def fields(self) -> list[str]:
        return self.model.fields()

    def predict(self, vector: torch.Tensor, top: int = 5) -> IntentPrediction:
        """Soft facets and demand for one query vector of the encoder's space."""
        return self.model.predict(vector.reshape(1, -1), top)[0]


def embedder(encoder: Any, ctx: EncoderContext) -> Any:
    """``embed(texts) -> Tensor[n, d]`` with ``encoder``: its batched ``encode_texts``
    when it has one (bert), else ``encode_query`` text by text."""
    if hasattr(encoder, "encode_texts"):
        return lambda texts: encoder.encode_texts(list(texts), ctx)

    def embed(texts: Sequence[str]) -> torch.Tensor:
        vecs = [encoder.encode_query(t, ctx) for t in texts]
        if any(v is None for v in vecs):
            raise ConfigError(f"encoder '{encoder.name}' cannot embed queries, so it cannot "
                              "carry an intent model")
        return torch.stack([torch.nn.functional.normalize(v.float(), dim=0) for v in vecs])
    return embed


def intent_data(engine: "Engine", encoder: str = DEFAULT_ENCODER, *, seed: int = 0) -> IntentData:
    """The training data of an intent model: items with a vector of ``encoder`` (encoded
    first where missing or stale), their distinct users and the users' histories."""
    from polyrec.store import catalog
    from polyrec.store.vectors import load_vectors
    enc_cls = engine.registry("encoders").get(encoder)
    if getattr(enc_cls, "modality", None) != "text":
        raise ConfigError(f"an intent model needs a text encoder, and '{encoder}' encodes "
                          f"{getattr(enc_cls, 'modality', '?')}")
    report = engine.encode([encoder])  # brings the stored vectors up to date (cheap when they are)
    if report.errors:
        raise ConfigError("; ".join(report.errors.values()))
    enc = engine.encoder(encoder)
    fingerprint = enc.fingerprint()
    with engine.store.session() as s:
        ids, vectors = load_vectors(s, encoder)
        items = {v.id: v for v in catalog.item_views(s, ids)}
        rows = [(u, i, ts) for u, i, ts in s.execute(
            select(Interaction.user_id, Interaction.item_id, Interaction.ts)
            .order_by(Interaction.ts, Interaction.id))]
    keep = [k for k, i in enumerate(ids) if i in items]
    if not keep:
        raise ConfigError(f"no item has a '{encoder}' vector: add items and run polyrec encode")
    ids = [ids[k] for k in keep]
    vectors = torch.nn.functional.normalize(vectors[keep].float(), dim=1)
    row = {i: k for k, i in enumerate(ids)}
    users: dict[int, set[int]] = defaultdict(set)
    histories: dict[int, list[int]] = defaultdict(list)
    for u, i, _ in rows:
        r = row.get(i)
        if r is None:
            continue
        if r not in users[u]:
            histories[u].append(r)
        users[u].add(r)
    demand = torch.zeros(len(ids))
    for seen in users.values():
        for r in seen:
            demand[r] += 1
    ctx = EncoderContext(engine=engine, device=engine.device, progress=engine.progress)
    return IntentData(items=[items[i] for i in ids], vectors=vectors, demand=demand,
                      histories=list(histories.values()), embed=embedder(enc, ctx),
                      encoder=encoder, fingerprint=fingerprint, device=engine.device,
                      progress=engine.progress, seed=seed)


def train_intent(engine: "Engine", model: str = DEFAULT_MODEL, *, encoder: str = DEFAULT_ENCODER,
                 options: Mapping[str, Any] | None = None, name: str = ARTIFACT,
                 seed: int = 0) -> IntentReport:
    """Fit intent model ``model`` on the catalogue and store it as the next version of
    artifact ``name``."""
    started = time.perf_counter()
    cls = engine.registry("intent_models").get(model)
    instance = cls(**dict(options or {}))
    stage(f"intent: building training data from the '{encoder}' vectors", engine.progress)
    data = intent_data(engine, encoder, seed=seed)
    data_s = time.perf_counter() - started
    stage(f"intent: training '{model}' on {len(data.items):,} items", engine.progress)
    instance.fit(data)
    meta = {"model": model, "options": _plain(instance.options), "encoder": encoder,
            "fingerprint": data.fingerprint, "info": _plain(instance.info),
            "items": len(data.items)}
    with engine.store.session() as s:
        version = save_artifact(s, name, KIND, to_bytes(instance.state()), meta)
    return IntentReport(name, version, model, encoder, data.fingerprint, meta["options"],
                        meta["info"], time.perf_counter() - started, data_s)


def latest_version(engine: "Engine", name: str = ARTIFACT) -> int | None:
    """The newest stored version of intent artifact ``name`` (None: never trained). Cheap."""
    with engine.store.session() as s:
        return s.execute(select(func.max(Artifact.version)).where(Artifact.name == name)
                         ).scalar_one()


def load_intent(engine: "Engine", name: str = ARTIFACT, version: int | None = None, *,
                fingerprint: str | None = None) -> LoadedIntent:
    """The stored intent model ``name`` (latest version unless given), restored.

    Refused with ConfigError when the encoder it was trained on now has another
    fingerprint (compared with ``fingerprint`` when given, e.g. the stored vectors'
    fingerprint a searcher already holds; else with the encoder as configured)."""
    with engine.store.session() as s:
        art = load_artifact(s, name, version)
    if art.kind != KIND:
        raise ConfigError(f"artifact '{name}' is a {art.kind}, not an intent model")
    meta = art.meta
    encoder = str(meta.get("encoder", DEFAULT_ENCODER))
    current = fingerprint if fingerprint is not None else engine.encoder(encoder).fingerprint()
    if current != meta.get("fingerprint"):
        raise ConfigError(
            f"intent model '{name}' v{art.version} was trained on {encoder} vectors "
            f"{meta.get('fingerprint')}, but the {encoder} encoder is now {current}; "
            "run polyrec train-intent again")
    cls = engine.registry("intent_models").get(str(meta.get("model", DEFAULT_MODEL)))
    instance = cls(**dict(meta.get("options") or {}))
    instance.load_state(from_bytes(art.data))
    return LoadedIntent(instance, name, art.version, encoder, current, dict(meta))


def intent_status(engine: "Engine", name: str = ARTIFACT,
                  fingerprint: str | None = None) -> tuple[LoadedIntent | None, str | None]:
    """(the loaded model, None), or (None, why not): not trained, or refused."""
    try:
        return load_intent(engine, name, fingerprint=fingerprint), None
    except NotFoundError:
        return None, f"no intent model '{name}' trained (polyrec train-intent)"
    except ConfigError as exc:
        return None, str(exc)


def _plain(value: Any) -> Any:
    """JSON-ready copy (tensors and numbers to floats, tuples to lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
