"""The admin pages: server-rendered HTML (Jinja2 templates in ``templates/``, one CSS file
in ``static/``, charts as inline SVG from :mod:`polyrec.serve.admin.svg`), no JavaScript
and nothing fetched from another host.

    GET  /                     overview: counts, interactions per day, encoders, doctor
    GET  /admin/models         model versions, metrics across versions, the live one
    POST /admin/models/activate   (write) make a version live
    POST /admin/models/rollback   (write) back to the previous good version
    GET  /admin/experiments    variants, CTR and conversion with Wilson intervals, verdict
    GET  /admin/preview        a user's history and recommendations (explained); search
    GET  /admin/image?item=ID  an item's image (local file or data: URI)
    GET  /admin/static/...     the stylesheet

Reading needs nothing; the two POSTs take the server's write token in the form (the
bearer token of the write endpoints) and are open when the server has none, like them.
"""

import hmac
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

from polyrec.errors import PolyrecError
from polyrec.serve.admin import data, svg

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from polyrec.engine import Engine

HERE = Path(__file__).resolve().parent
#: rows per page (history, experiments) and the most recommendations/results a preview shows
PAGE, EXPERIMENTS_PAGE, MAX_PREVIEW_K = 20, 5, 50
#: metrics drawn across model versions (others are listed in the table)
CHART_METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "hit@10", "coverage@10")
#: attributes shown under an item card, when items have them
SHOWN = ("product_type_name", "colour_group_name", "class", "release_year", "department_name")


def templates() -> Any:
    """The Jinja2 environment of the admin templates (autoescaped)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(["html"]), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters.update(num=lambda v: f"{v:,}" if isinstance(v, (int, float)) else ("-" if v is None else v),
                       pct=lambda v, d=1: "-" if v is None else f"{float(v):.{d}%}",
                       fixed=lambda v, d=4: "-" if v is None else f"{float(v):.{d}f}",
                       day=data.day,
                       when=_when,
                       compact=lambda v: json.dumps(v, sort_keys=True, default=str),
                       describe=_describe)
    return env


def _when(ts: float | None) -> str:
    """Epoch seconds as local time, '-' for none, '?' for one no date can show."""
    if not ts:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
    except (ValueError, OverflowError, OSError, TypeError):
        return "?"


def _describe(attributes: dict[str, Any] | None) -> str:
    parts = []
    for name in SHOWN:
        value = (attributes or {}).get(name)
        if value not in (None, "", []):
            parts.append(", ".join(map(str, value)) if isinstance(value, list) else str(value))
    return " · ".join(parts)


def verdict(report: dict[str, Any]) -> list[str]:
    """Plain-words reading of an experiment report: each variant's CTR against the first
    (the baseline) by the report's p-value, and whether their intervals overlap."""
    rows = report.get("variants") or []
    if len(rows) < 2:
        return ["not enough variants with data yet"]
    alpha = 1.0 - float(report.get("confidence", 0.95))
    base, lines = rows[0], []
    for r in rows[1:]:
        p = r.get("ctr_p_value")
        if not r["impressions"] or not base["impressions"] or p is None:
            lines.append(f"{r['variant']} vs {base['variant']}: no impressions yet")
        elif p < alpha:
            better = "higher" if r["ctr"] > base["ctr"] else "lower"
            lines.append(f"{r['variant']} has a {better} CTR than {base['variant']} "
                         f"({r['ctr']:.2%} vs {base['ctr']:.2%}, p = {p:.3f}): significant "
                         f"at {report['confidence']:.0%}")
        else:
            lines.append(f"{r['variant']} vs {base['variant']}: no significant CTR difference "
                         f"yet ({r['ctr']:.2%} vs {base['ctr']:.2%}, p = {p:.3f})")
    return lines


def mount(app: "FastAPI", engine: "Engine", *, token: str | None = None,
          image_root: str | None = None, doctor_ttl: float = 300.0,
          counts_ttl: float = 30.0) -> None:
    """Add the admin pages to ``app`` (none of them is in the OpenAPI schema). The
    overview's counts are kept ``counts_ttl`` s, the doctor's report ``doctor_ttl`` s."""
    from fastapi import Query, Request
    from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool

    import polyrec as pkg
    from polyrec.serve.app import recommend_or_popular

    env = templates()
    doctor = data.DoctorCache(engine, ttl=doctor_ttl)
    counts = data.Recent(lambda: (engine.stats(), data.interactions_per_day(engine)), counts_ttl)
    app.mount("/admin/static", StaticFiles(directory=HERE / "static"), name="admin-static")
    common = {"version": pkg.__version__, "writes_open": token is None}

    def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(f"{name}.html").render(page=name, **common, **context)
        return HTMLResponse(html, status_code=status)

    def allowed(given: str | None) -> bool:
        return token is None or (given is not None and hmac.compare_digest(
            given.strip().encode(), token.encode()))

    @app.get("/", include_in_schema=False)
    def overview() -> HTMLResponse:
        (stats, per_day), age = counts.get()
        registered = engine.registry("encoders")
        doc = doctor.get()
        in_use = {r["encoder"]: r for r in (doc["report"] or {}).get("encoders", [])}
        encoders = []
        names = sorted(set(registered.names()) | set(stats["vectors_by_encoder"]))
        for name in names:
            n = int(stats["vectors_by_encoder"].get(name, 0))
            cls = registered.get(name) if name in registered else None
            encoders.append({"name": name, "modality": str(getattr(cls, "modality", "?")),
                             "vectors": n, "coverage": n / stats["items"] if stats["items"] else 0.0,
                             "pretrained": in_use.get(name, {}).get("pretrained"),
                             "in_use": name in in_use if in_use else None,
                             "registered": cls is not None})
        chart = svg.bars(per_day, label="interactions per day", unit=" interactions")
        return page("overview", stats=stats, chart=chart, days=len(per_day), encoders=encoders,
                    doctor=doc, url=engine.url, counts_age=age)

    def models_page(status: int = 200, message: str | None = None,
                    error: str | None = None) -> HTMLResponse:
        from polyrec.rank import registry
        models = engine.models()
        live = registry.live_version(engine)
        metrics = sorted({m for v in models for m in (v.get("metrics") or {}) if "@" in m})
        drawn = [m for m in CHART_METRICS if m in metrics] or metrics[:4]
        chart = svg.lines([f"v{v['version']}" for v in models],
                          {m: [_number((v.get("metrics") or {}).get(m)) for v in models]
                           for m in drawn}, label="validation metrics by model version")
        return page("models", status, models=list(reversed(models)), live=live,
                    metrics=metrics, chart=chart, message=message, error=error)

    @app.get("/admin/models", include_in_schema=False)
    def models(message: str | None = None) -> HTMLResponse:
        return models_page(message=message)

    async def form(request: Request) -> dict[str, str]:
        body = (await request.body()).decode("utf-8", "replace")
        return {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}

    async def write(request: Request, action: Any, done: Any) -> Response:
        fields = await form(request)
        if not allowed(fields.get("token")):
            return await run_in_threadpool(models_page, 401, None,
                                           "the write token is missing or wrong: nothing changed")
        try:
            result = await run_in_threadpool(action, fields)
        except (PolyrecError, ValueError) as exc:
            return await run_in_threadpool(models_page, 400, None, str(exc))
        return RedirectResponse("/admin/models?" + urlencode({"message": done(result)}),
                                status_code=303)

    @app.post("/admin/models/activate", include_in_schema=False)
    async def activate(request: Request) -> Response:
        return await write(request, lambda f: engine.activate(int(f.get("version", ""))),
                           lambda m: f"version {m['version']} is live")

    @app.post("/admin/models/rollback", include_in_schema=False)
    async def rollback(request: Request) -> Response:
        return await write(request, lambda f: engine.rollback(),
                           lambda r: f"rolled back from version {r['from']} to {r['to']}")

    @app.get("/admin/experiments", include_in_schema=False)
    def experiments(p: int = Query(1, ge=1, le=10**6)) -> HTMLResponse:
        from polyrec.feedback import experiments as exps
        everything = list(reversed(exps.list_experiments(engine)))  # newest first
        pages = max(1, math.ceil(len(everything) / EXPERIMENTS_PAGE))
        shown = []
        for e in everything[(p - 1) * EXPERIMENTS_PAGE:p * EXPERIMENTS_PAGE]:
            rep = exps.report(engine, e["name"])
            rows = rep["variants"]
            shown.append({**e, "report": rep, "verdict": verdict(rep),
                          "ctr_chart": svg.intervals([(r["variant"], r["ctr"], *r["ctr_ci"]) for r in rows],
                                                     label=f"CTR of {e['name']}"),
                          "conv_chart": svg.intervals([(r["variant"], r["conversion"], *r["conversion_ci"])
                                                       for r in rows],
                                                      label=f"conversion of {e['name']}")})
        return page("experiments", experiments=shown, total=len(everything), p=p, pages=pages)

    @app.get("/admin/preview", include_in_schema=False)
    def preview(user: str | None = Query(None, max_length=255),
                q: str | None = Query(None, max_length=1000),
                k: int = Query(10, ge=1, le=MAX_PREVIEW_K),
                p: int = Query(1, ge=1, le=10**6)) -> HTMLResponse:
        user = (user or "").strip() or None
        q = (q or "").strip() or None
        context: dict[str, Any] = {"user": user, "q": q, "k": k, "p": p,
                                   "recent": data.recent_users(engine), "errors": []}
        if user:
            total, rows = data.history(engine, user, limit=PAGE, offset=(p - 1) * PAGE)
            context.update(history=rows, history_total=total,
                           pages=max(1, math.ceil(total / PAGE)))
            try:
                recs = recommend_or_popular(engine, user, k, explain=True)
                found = data.cards(engine, [r["item"] for r in recs["results"]])
                for r in recs["results"]:
                    r["card"] = found.get(r["item"])
                    parts = (r.get("explanation") or {}).get("modalities") or {}
                    r["modality_chart"] = (svg.meter(sorted(parts.items()), label="modality weights")
                                           if parts else None)
                context["recs"] = recs
            except PolyrecError as exc:
                context["errors"].append(f"recommend: {exc}")
        if q:
            try:
                response = engine.search(q, k, user=user)
                found = data.cards(engine, response.ids())
                context["search"] = {"response": response, "understood": response.understood,
                                     "intent": response.understanding.intent,
                                     "hits": [(h, found.get(h.item)) for h in response.results]}
            except PolyrecError as exc:
                context["errors"].append(f"search: {exc}")
        return page("preview", **context)

    @app.get("/admin/image", include_in_schema=False)
    def image(item: str = Query(..., min_length=1, max_length=255)) -> Response:
        found = data.image_file(engine, item, image_root)
        if found is None:
            return Response(status_code=404)
        content, media = found
        headers = {"Cache-Control": "max-age=3600"}
        if isinstance(content, bytes):
            return Response(content, media_type=media, headers=headers)
        return FileResponse(content, media_type=media, headers=headers)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
