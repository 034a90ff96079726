"""`/docs` and `/redoc` without the internet: the pages' scripts come from the `fastapi-offline` package's files,
served by the app itself.

FastAPI's default pages load Swagger UI and ReDoc from a CDN, so on an offline cluster they stay blank. Here the same
pages point at `/docs-assets/…` (Swagger UI 5, which reads the OpenAPI 3.1 that FastAPI writes).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"


def mount_offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc with local assets (build the app with docs_url=None, redoc_url=None)."""
    import fastapi_offline

    app.mount(ASSETS, StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static"), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} — API",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} — API",
                              redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js", redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
                              with_google_fonts=False)
