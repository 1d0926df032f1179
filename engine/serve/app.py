"""The HTTP API: a FastAPI app over one shared Engine, served by uvicorn.

Endpoints (JSON; the OpenAPI schema is at ``/openapi.json``, interactive docs at ``/docs``
and ``/redoc``, served from packaged files with no network: engine/serve/offline_docs.py;
the admin pages at ``/``: engine/serve/admin/):

    GET  /health                       liveness and catalogue counts
    POST /recommend                    {user, k, filters, exclude_seen, explain}
    POST /search                       {query, k, user, filters, understanding, weights}
    POST /similar                      {item, k, filters, basis}
    GET  /models                       versions of the trained pipeline, the live one
    GET  /models/{version}             one version: ranker, options, metrics, gate
    GET  /items/{item}                 one item (with its lifecycle state: retired, retired_at)
    PUT  /items            (write)     {items: [{external_id, title, text, image, attributes,
                                                 active}]}  (active: false retires, true restores)
    POST /items/retire     (write)     {items: [id, ...]}: never served again (kept, history counts)
    POST /items/restore    (write)     {items: [id, ...]}: served again
    POST /items/{item}/retire, /items/{item}/restore  (write)  the same for one item
    PUT  /users            (write)     {users: [{external_id, attributes}]}
    DELETE /users/{user}   (write)     forget a user (engine/feedback/forget.py)
    POST /feedback         (write)     {user, item, kind, value, ts, context}
    POST /feedback/batch   (write)     {events: [...]}

Input is validated by pydantic models (strict types, unknown fields refused): a bad
request gets 422 with a message naming the field; a body over ``max_body_bytes`` gets
413; unknown items 404. Unknown users get popular items (``"basis": "popular"``), not an
error. With ``token`` set, write endpoints need ``Authorization: Bearer <token>``.

Request handlers are plain functions, so uvicorn runs them on a thread pool against one
Engine: reads are thread-safe (a session per call, immutable snapshots swapped by
reference; see engine/retrieve/search.py).
"""

import hmac
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from polyrec.errors import (ConfigError, ModelNotTrainedError, NotFoundError, PolyrecError,
                           ValidationError)
from polyrec.retrieve.search import DEFAULT_WEIGHTS, MAX_K, MAX_QUERY_CHARS, searcher
from polyrec.store.ids import ID_CHARS, ID_PATTERN, shown

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from polyrec.engine import Engine

log = logging.getLogger("polyrec.serve")

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_BATCH = 10_000
MAX_VERSION = 2**31 - 1
#: what a refused id is told (ids and the search query are the schema's only patterns)
ID_RULE = (f"not an id (1..{ID_CHARS} characters, no control characters, not only spaces)")


def _message(error: dict[str, Any]) -> str:
    """A pydantic error's message, in words rather than a regular expression."""
    if error.get("type") != "string_pattern_mismatch":
        return str(error.get("msg", ""))
    loc = list(error.get("loc", ()))
    return "the query is empty (only spaces)" if loc[-1:] == ["query"] else ID_RULE


def _integral(value: Any) -> Any:
    """An integral float (``10.0``, an integer by JSON Schema) as an int; anything else as is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _models() -> dict[str, Any]:
    """The pydantic request models (built lazily: fastapi is an optional dependency)."""
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

    Id = Annotated[str, Field(min_length=1, max_length=ID_CHARS, pattern=ID_PATTERN,
                              description=f"an id: 1..{ID_CHARS} characters, no control "
                                          "characters, not only spaces")]
    # JSON Schema's "integer" includes 10.0: an integral float is taken, "10" and 2.5 are not
    K = Annotated[int, Field(ge=1, le=MAX_K, description=f"how many results (1..{MAX_K})"),
                  BeforeValidator(_integral)]
    FilterValue = str | int | float | list[str | int | float]
    Filters = Annotated[dict[str, FilterValue] | None,
                        Field(description="attribute field or slot -> value(s), e.g. "
                                          '{"colour": "Black"}')]

    class Strict(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")

    Weights = create_model(  # the fusion weights search knows, each optional
        "Weights", __config__=ConfigDict(strict=True, extra="forbid", allow_inf_nan=False),
        **{name: (Annotated[float, Field(ge=0)] | None, None) for name in DEFAULT_WEIGHTS})

    class SearchRequest(Strict):
        query: Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS, pattern=r"[^\s\x1c-\x1f]",
                                    description="text with at least one non-space character")]
        k: K = 10
        user: Id | None = None
        filters: Filters = None
        understanding: Literal["boost", "filter", "off"] = "boost"
        weights: Weights | None = None

    class RecommendRequest(Strict):
        user: Id
        k: K = 10
        filters: Filters = None
        exclude_seen: bool = True
        explain: bool = False

    class SimilarRequest(Strict):
        item: Id
        k: K = 10
        filters: Filters = None
        basis: Annotated[str, Field(min_length=1, max_length=64)] = "auto"

    class ItemIn(Strict):
        external_id: Id
        title: str | None = None
        text: str | None = None
        image: str | None = None
        attributes: dict[str, Any] | None = None
        active: bool | None = Field(default=None, description=(
            "false: retire the item (kept, never served), true: restore it; "
            "left out: its state stays as it is"))

    class UserIn(Strict):
        external_id: Id
        attributes: dict[str, Any] | None = None

    class ItemsIn(Strict):
        items: Annotated[list[ItemIn], Field(min_length=1, max_length=MAX_BATCH)]

    class ItemIdsIn(Strict):
        items: Annotated[list[Id], Field(min_length=1, max_length=MAX_BATCH,
                                         description="external ids of stored items")]

    class UsersIn(Strict):
        users: Annotated[list[UserIn], Field(min_length=1, max_length=MAX_BATCH)]

    class EventIn(Strict):
        user: Id
        item: Id
        kind: Annotated[str, Field(min_length=1, max_length=32)] = "click"
        value: float | None = None
        ts: Annotated[float | Annotated[str, Field(min_length=1, max_length=64)] | None,
                      Field(description="epoch seconds or an ISO 8601 time (e.g. "
                                        '"2026-12-01T10:00:00+02:00"), from 1970-01-01 to '
                                        "2200-01-01 UTC; default: when it arrives")] = None
        context: dict[str, Any] | None = None

    class EventsIn(Strict):
        events: Annotated[list[EventIn], Field(min_length=1, max_length=MAX_BATCH)]

    class ErrorBody(BaseModel):
        """Every error answer, whatever its status."""

        error: str = Field(description="a stable code: invalid_request, bad_request, "
                                       "unauthorized, not_found, method_not_allowed, "
                                       "conflict, payload_too_large, internal_error, ...")
        message: str = Field(description="one line for people")
        details: Any = Field(default=None, description="structured detail (the field "
                                                       "errors of a 422), else null")

    return {m.__name__: m for m in (SearchRequest, RecommendRequest, SimilarRequest, ItemsIn,
                                    ItemIdsIn, UsersIn, EventIn, EventsIn, ErrorBody)}


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                await _reject(send, self.limit)
                return
            await self.app(scope, receive, send)  # the server holds it to that length
            return
        # no declared length (chunked): read it all, up to the limit, then replay it
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                await _reject(send, self.limit)
                return
            chunks.append(message)
            if not message.get("more_body", False):
                break
        replay = iter(chunks)

        async def replayed() -> dict:
            try:
                return next(replay)
            except StopIteration:
                return await receive()

        await self.app(scope, replayed, send)


async def _reject(send: Any, limit: int) -> None:
    import json
    body = json.dumps(error_body("payload_too_large", f"request body over {limit:,} bytes "
                                 "(send less, or in batches)")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


#: status -> the ``error`` code of answers that carry no code of their own.
CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
         415: "unsupported_media_type", 422: "invalid_request", 500: "internal_error"}
#: polyrec error class -> (status, code)
_POLYREC = ((NotFoundError, 404, "not_found"), (ValidationError, 422, "validation_error"),
            (ConfigError, 422, "config_error"), (ModelNotTrainedError, 409, "model_not_trained"))


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The one error schema of every status: ``{"error", "message", "details"}``."""
    return {"error": code, "message": message, "details": details}


def _status(exc: PolyrecError) -> tuple[int, str]:
    for cls, status, code in _POLYREC:
        if isinstance(exc, cls):
            return status, code
    return 400, "bad_request"


#: the error statuses every endpoint with a body may answer; writes add 401
READ = (400, 404, 409, 413, 422, 500)
WRITE = (400, 401, 404, 409, 413, 422, 500)


def _responses(M: dict[str, Any], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` declaring the error schema for ``statuses``."""
    text = {400: "malformed request body", 401: "bearer token missing or wrong",
            404: "unknown item, user or model version", 409: "no trained model",
            413: "request body over the limit", 422: "request or data refused by validation",
            500: "internal error (logged; never a traceback)"}
    return {s: {"model": M["ErrorBody"], "description": text[s]} for s in statuses}


def create_app(engine: "Engine", *, token: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, check_interval: float = 1.0,
               encode_on_arrival: bool | None = None, admin: bool = True,
               image_root: str | None = None, warm: bool = False) -> "FastAPI":
    """A FastAPI app serving ``engine``. ``token``: bearer token for write endpoints.

    ``check_interval``: seconds between checks of the store for changes made by other
    processes (writes through this app are seen at once). ``encode_on_arrival``: set the
    engine's option (items written by ``PUT /items`` are encoded in the background);
    None keeps the engine's own setting. ``admin``: the admin pages at ``/``
    (engine/serve/admin/). ``image_root``: the image root (engine/ingest/images.py) of
    ``PUT /items`` (it becomes the engine's) and the only folder the admin serves item
    images from; None: the engine's own, else the roots the store recorded. ``warm``:
    load the live model and the search models on a background thread now, so the first
    requests do not pay for them (engine/serve/warm.py; ``GET /health`` says its state)."""
    from fastapi import Depends, FastAPI, Header, HTTPException, Request
    from fastapi import Path as FPath
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    import polyrec as pkg

    M = _models()
    if encode_on_arrival is not None:
        engine.encode_on_arrival = bool(encode_on_arrival)
    if image_root is not None:
        engine.image_root = str(image_root)
    image_root = engine.image_root
    srch = searcher(engine)
    srch.check_interval = float(check_interval)
    app = FastAPI(title="polyrec", version=pkg.__version__,
                  description="Multimodal recommendations, search and similar items.",
                  docs_url=None, redoc_url=None)  # served from local files below
    app.state.engine = engine
    from polyrec.serve.warm import WarmUp
    app.state.warm = WarmUp().start(engine) if warm else WarmUp()
    from polyrec.serve.offline_docs import add_offline_docs
    add_offline_docs(app)
    if admin:
        from polyrec.serve.admin.routes import mount
        mount(app, engine, token=token, image_root=image_root)

    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(PolyrecError)
    async def polyrec_error(_: Request, exc: PolyrecError) -> JSONResponse:
        status, code = _status(exc)
        details = ({"file": exc.file, "row": exc.row, "field": exc.field}
                   if isinstance(exc, ValidationError) else None)
        return JSONResponse(status_code=status, content=error_body(code, str(exc), details))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "type": e.get("type", ""), "msg": _message(e)}
                  for e in exc.errors()]
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
        return JSONResponse(status_code=422, content=error_body("invalid_request", message[:1000],
                                                                errors[:50]))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return JSONResponse(status_code=exc.status_code, content=error_body(code, message),
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=(type(exc), exc, exc.__traceback__))
        return JSONResponse(status_code=500, content=error_body(
            "internal_error", "internal error; the server logged it"))

    def writer(authorization: str | None = Header(default=None)) -> None:
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            raise HTTPException(401, "a valid bearer token is required for write endpoints",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health", responses=_responses(M, 500))
    def health() -> dict[str, Any]:
        """Liveness plus catalogue counts; ``pid``: the process that answered (one of the
        workers of ``polyrec serve --workers N``), ``model``: the version it serves (None
        before its first recommendation), having followed the live pointer; ``warm``: the
        start-up warm-up (off, running, done; seconds per part, parts skipped and why)."""
        stats = engine.stats()
        rec = engine.services.started("recommender")
        if rec is not None:
            rec.check_live()
        return {"status": "ok", "version": pkg.__version__, "items": stats["items"],
                "retired_items": stats["retired_items"], "users": stats["users"], "interactions": stats["interactions"],
                "vectors": stats["vectors_by_encoder"], "artifacts": stats["artifacts"],
                "pid": os.getpid(),
                "model": None if rec is None else {"live": rec.live, "serving": rec.version},
                "warm": app.state.warm.as_dict()}

    @app.post("/search", responses=_responses(M, *READ))
    def search(req: M["SearchRequest"]) -> dict[str, Any]:  # type: ignore[valid-type]
        """Hybrid search with query understanding; personalised with ``user``."""
        options: dict[str, Any] = {"understanding": req.understanding}
        if req.weights is not None:
            options["weights"] = req.weights.model_dump(exclude_none=True)
        return engine.search(req.query, req.k, user=req.user, filters=req.filters,
                             **options).as_dict()

    @app.post("/similar", responses=_responses(M, *READ))
    def similar(req: M["SimilarRequest"]) -> dict[str, Any]:  # type: ignore[valid-type]
        """Items similar to ``item``."""
        return engine.similar(req.item, req.k, filters=req.filters, basis=req.basis).as_dict()

    @app.post("/recommend", responses=_responses(M, *READ))
    def recommend(req: M["RecommendRequest"]) -> dict[str, Any]:  # type: ignore[valid-type]
        """Recommendations for ``user``; popular items for users the model does not know."""
        return recommend_or_popular(engine, req.user, req.k, filters=req.filters,
                                    exclude_seen=req.exclude_seen, explain=req.explain)

    @app.get("/models", responses=_responses(M, 500))
    def list_models() -> dict[str, Any]:
        """The stored versions of the pipeline (oldest first), the live one, and what this
        process serves (its fallback and ranker errors, when it loaded a model)."""
        from polyrec.rank import registry
        models = engine.models()
        rec = engine.services.started("recommender")
        serving = None if rec is None else {
            "version": rec.version, "ranker": rec.ranker_name, "fallback": rec.fallback,
            "errors": list(getattr(rec, "errors", []))[-10:]}
        return {"live": registry.live_version(engine), "models": models, "serving": serving}

    @app.get("/models/{version}", responses=_responses(M, 404, 422, 500))
    def get_model(version: Annotated[int, FPath(ge=1, le=MAX_VERSION)]) -> dict[str, Any]:
        """One stored version of the pipeline (404 when absent)."""
        return engine.model(version)

    @app.get("/items/{item}", responses=_responses(M, 404, 422, 500))
    def get_item(item: Annotated[str, FPath(min_length=1, max_length=ID_CHARS,
                                            pattern=ID_PATTERN)]) -> dict[str, Any]:
        """One item as stored, with its lifecycle state (``retired``, ``retired_at``)."""
        from sqlalchemy import select

        from polyrec.store import catalog
        from polyrec.store.models import Item
        with engine.store.session() as s:
            iid = catalog.get_item_id(s, item)
            view = catalog.item_views(s, [iid])[0]
            retired_at = s.execute(select(Item.retired_at).where(Item.id == iid)).scalar()
        return {"item": view.external_id, "title": view.title, "text": view.text,
                "image": view.image, "attributes": view.attributes, "entity": view.entity,
                "retired": retired_at is not None, "retired_at": retired_at}

    @app.put("/items", dependencies=[Depends(writer)], responses=_responses(M, *WRITE))
    def put_items(req: M["ItemsIn"]) -> dict[str, Any]:  # type: ignore[valid-type]
        """Insert or update items (fields left out are kept: an item without ``active``
        keeps its lifecycle state, so re-sending the catalogue never restores a retired
        item); they are encoded in the background when the engine's
        ``encode_on_arrival`` is on."""
        rows = [i.model_dump(exclude_unset=True) for i in req.items]
        n = engine.add_items(rows)
        srch.invalidate()
        return {"written": n}

    @app.post("/items/retire", dependencies=[Depends(writer)], responses=_responses(M, *WRITE))
    def retire_items(req: M["ItemIdsIn"]) -> dict[str, Any]:  # type: ignore[valid-type]
        """Retire items (sold out, discontinued): kept with their history, never served
        again by /recommend, /search or /similar until restored. An unknown id is a 404
        naming it, and nothing changes. ``changed``: the items retired now;
        ``unchanged``: those retired already."""
        return engine.retire_items(req.items).as_dict()  # the Engine tells the searcher

    @app.post("/items/restore", dependencies=[Depends(writer)], responses=_responses(M, *WRITE))
    def restore_items(req: M["ItemIdsIn"]) -> dict[str, Any]:  # type: ignore[valid-type]
        """Serve retired items again (404 naming unknown ids; nothing changes then)."""
        return engine.restore_items(req.items).as_dict()  # the Engine tells the searcher

    @app.post("/items/{item}/retire", dependencies=[Depends(writer)],
              responses=_responses(M, *WRITE))
    def retire_item(item: Annotated[str, FPath(min_length=1, max_length=ID_CHARS,
                                                pattern=ID_PATTERN)]) -> dict[str, Any]:
        """Retire one item (see ``POST /items/retire``)."""
        return engine.retire_items([item]).as_dict()  # the Engine tells the searcher

    @app.post("/items/{item}/restore", dependencies=[Depends(writer)],
              responses=_responses(M, *WRITE))
    def restore_item(item: Annotated[str, FPath(min_length=1, max_length=ID_CHARS,
                                                 pattern=ID_PATTERN)]) -> dict[str, Any]:
        """Serve one retired item again (see ``POST /items/restore``)."""
        return engine.restore_items([item]).as_dict()  # the Engine tells the searcher

    @app.put("/users", dependencies=[Depends(writer)], responses=_responses(M, *WRITE))
    def put_users(req: M["UsersIn"]) -> dict[str, Any]:  # type: ignore[valid-type]
        """Insert or update users."""
        n = engine.add_users([u.model_dump(exclude_unset=True) for u in req.users])
        srch.invalidate()
        return {"written": n}

    @app.delete("/users/{user}", dependencies=[Depends(writer)], responses=_responses(M, *WRITE))
    def delete_user(user: Annotated[str, FPath(min_length=1, max_length=ID_CHARS,
                                               pattern=ID_PATTERN)]) -> dict[str, Any]:
        """Forget a user: their interactions, online state and experiment assignments go
        in one transaction, they leave the served model's data at once, and a tombstone
        keeps old files from bringing them back (404 for an unknown user)."""
        report = engine.forget_user(user)
        srch.invalidate()
        return report

    @app.post("/feedback", dependencies=[Depends(writer)], responses=_responses(M, *WRITE))
    def feedback(req: M["EventIn"]) -> dict[str, Any]:  # type: ignore[valid-type]
        """Store one event and hand it to the feedback learners. A retry of an event whose
        ``context.event_id`` was stored before stores nothing (``stored: 0``,
        ``duplicate: true``) and answers the event as it was stored."""
        event = engine.feedback(req.user, req.item, req.kind, value=req.value, ts=req.ts,
                                context=req.context)
        new = bool(getattr(event, "new", True))
        return {"stored": int(new), "duplicate": not new, "event": _event_dict(event)}

    @app.post("/feedback/batch", dependencies=[Depends(writer)], responses=_responses(M, *WRITE))
    def feedback_batch(req: M["EventsIn"]) -> dict[str, Any]:  # type: ignore[valid-type]
        """Store a batch of events in one transaction: ``stored`` counts the new ones,
        ``duplicates`` those whose dedup key (``context.event_id``, or the same content)
        was stored before."""
        events = engine.feedback_many([e.model_dump() for e in req.events])
        stored = sum(1 for e in events if getattr(e, "new", True))
        return {"stored": stored, "duplicates": len(events) - stored}

    return BodyLimit(app, max_body_bytes) if max_body_bytes else app  # type: ignore[return-value]


def _event_dict(event: Any) -> Any:
    as_dict = getattr(event, "as_dict", None)
    return as_dict() if callable(as_dict) else None


def recommend_or_popular(engine: "Engine", user: str, k: int, *, filters: Any = None,
                         exclude_seen: bool = True, explain: bool = False) -> dict[str, Any]:
    """Engine.recommend for known users; the most popular items (cold start) when the
    user is unknown or no model is trained, with the reason in ``notes``."""
    from polyrec.store import catalog
    notes: list[str] = []
    if filters:  # an unknown filter field is refused as /search refuses it
        searcher(engine).popular(1, filters)
    recommend = getattr(engine, "recommend", None)
    with engine.store.session() as s:
        known = bool(catalog.user_ids(s, [user]))
    if not known:
        notes.append(f"unknown user {shown(user)}: popular items")
        explored = _explored_popular(engine, k, filters, explain)
        if explored is not None:
            notes.append("with the explorer's slots (bandit.serving)")
            return {"user": user, "basis": "popular", "notes": notes, "results": explored}
    elif recommend is None:
        notes.append("no recommender is installed: popular items")
    else:
        try:
            recs = recommend(user, k, filters=filters, exclude_seen=exclude_seen, explain=explain)
            return {"user": user, "basis": "model", "notes": notes,
                    "results": [{"item": r.item, "score": float(r.score),
                                 "explanation": r.explanation} for r in recs]}
        except ModelNotTrainedError as exc:
            notes.append(f"{exc}: popular items")
        except NotFoundError as exc:
            if "user" not in str(exc).lower():
                raise
            notes.append(f"unknown user {shown(user)}: popular items")
    popular = searcher(engine).popular(k, filters)
    return {"user": user, "basis": "popular", "notes": notes,
            "results": [{"item": i, "score": share, "explanation": {"popularity": share}}
                        for i, share in popular]}


def _explored_popular(engine: "Engine", k: int, filters: dict[str, Any] | None,
                      explain: bool) -> list[dict[str, Any]] | None:
    """Popular items for an unknown user with the explorer's slots (new items among
    them), when exploration is on for serving and a model is loaded; None otherwise."""
    from polyrec.feedback.events import serving_explores
    if getattr(engine, "services", None) is None or not serving_explores(engine):
        return None
    try:
        recs = engine.services.recommender().recommend_anonymous(k, filters=filters,
                                                                 explain=explain)
    except ModelNotTrainedError:
        return None
    return [{"item": r.item, "score": float(r.score), "explanation": r.explanation}
            for r in recs]


# -- running -------------------------------------------------------------------------------
def serve(engine: "Engine", host: str = "127.0.0.1", port: int = 8000, *,
          token: str | None = None, log_level: str = "info", **app_options: Any) -> None:
    """Serve ``engine`` over HTTP until interrupted (Ctrl-C)."""
    import uvicorn
    uvicorn.run(create_app(engine, token=token, **app_options), host=host, port=port,
                log_level=log_level)


@dataclass
class RunningServer:
    """A uvicorn server on a background thread (tests, benchmarks, notebooks)."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_background(app: Any, host: str = "127.0.0.1", port: int = 0, *,
                     log_level: str = "warning", timeout: float = 30.0) -> RunningServer:
    """Start ``app`` on ``host``:``port`` (0: a free port) in a daemon thread; returns once
    it accepts connections."""
    import uvicorn
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, host=host, port=bound, log_level=log_level, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"polyrec-http-{bound}")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise PolyrecError(f"the HTTP server did not start on {host}:{bound}")
        time.sleep(0.02)
    return RunningServer(f"http://{host}:{bound}", server, thread)
