"""Swagger UI at ``/docs`` and ReDoc at ``/redoc`` with no network: their scripts, styles
and favicon come from the ``fastapi-offline`` package (part of the ``serve`` extra) and
are served by this app under ``/docs-static``, instead of FastAPI's default CDN links.

The app must be made with ``docs_url=None, redoc_url=None`` (engine/serve/app.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

#: where the files are served from
STATIC_URL = "/docs-static"
#: what ReDoc's bundle points at on the internet by itself: its sidebar logo (fetched) and
#: a link to its site; replaced by the local favicon and an in-page anchor
REDOC_EXTERNAL = {'src:"https://cdn.redoc.ly/redoc/logo-mini.svg"': f'src:"{STATIC_URL}/favicon.png"',
                  'href:"https://redocly.com/redoc/"': 'href:"#"'}


def assets_dir() -> Path:
    """The folder of swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and
    favicon.png shipped by fastapi-offline."""
    import fastapi_offline
    return Path(fastapi_offline.__file__).resolve().parent / "static"


def add_offline_docs(app: "FastAPI") -> None:
    """Add ``/docs``, ``/docs/oauth2-redirect`` and ``/redoc`` backed by local files."""
    from fastapi.openapi.docs import (get_redoc_html, get_swagger_ui_html,
                                      get_swagger_ui_oauth2_redirect_html)
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    from fastapi.responses import Response

    redoc_js = (assets_dir() / "redoc.standalone.js").read_bytes()
    for external, local in REDOC_EXTERNAL.items():
        redoc_js = redoc_js.replace(external.encode(), local.encode())

    @app.get(f"{STATIC_URL}/redoc.standalone.js", include_in_schema=False)
    def redoc_script() -> Response:  # registered before the mount, so it wins
        return Response(redoc_js, media_type="text/javascript",
                        headers={"Cache-Control": "max-age=86400"})

    app.mount(STATIC_URL, StaticFiles(directory=assets_dir()), name="docs-static")
    openapi, title = app.openapi_url or "/openapi.json", app.title

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi, title=f"{title} - Swagger UI",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_URL}/favicon.png",
            # the online validator badge would call validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None})

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=openapi, title=f"{title} - ReDoc",
                              redoc_js_url=f"{STATIC_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{STATIC_URL}/favicon.png",
                              with_google_fonts=False)
