"""The HTTP API, by concern; `service.api.create_app` puts it together.

    deps.py      what the routes share (engine, settings, metrics, batcher, the engine thread), from `app.state`
    body.py      request bodies: one dependency reads JSON or multipart into the request model and the image bytes
    common.py    what the image endpoints share: task names, engine refusals as HTTP errors, decoding images
    classify.py  POST /v1/classify
    embed.py     POST /v1/embed
    gallery.py   POST /v1/gallery, POST /v1/search
    tasks.py     /v1/tasks (list, show; delete and rollback with the admin token)
    health.py    /healthz, /metrics, the root redirect
    guard.py     the middleware: body size limit, HEAD, request metrics
    handlers.py  the exception handlers: every refusal as `{"error": {"code", "message"}}`
    openapi.py   what the schema documents beyond what FastAPI infers (error responses, the hand-read bodies)
"""
from __future__ import annotations

from . import classify, embed, gallery, health, tasks

ROUTERS = (classify.router, embed.router, gallery.router, tasks.router, health.router)

__all__ = ["ROUTERS"]
