"""The HTTP API as a FastAPI app factory, usable in-process (tests, notebooks) or as the Serve ingress.

    app = create_app(ServiceSettings(...))                           # builds and starts its own Engine
    app = create_app(settings, engine=engine, batcher=b, executor=x)   # the Serve deployment passes its own

The routes, the request bodies, the middleware and the error handlers live in `service.http`, one module per concern;
this module builds the shared objects, keeps them in `app.state` (where the routes' dependencies find them) and puts
the app together. Every refusal is `{"error": {"code": ..., "message": ...}}` with a 4xx status; a 500 only ever means a
bug: hostile bodies (deep nesting, lone surrogates, NaN, huge arrays, loose types) are refused while parsing, before a
model, the engine or a renderer sees them.

`python -m service.api > service/openapi.json` writes the committed OpenAPI contract.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .batching import MicroBatcher, engine_batcher, engine_executor
from .docs_assets import mount_offline_docs
from .engine import Engine
from .http import ROUTERS
from .http.deps import InEngine
from .http.guard import Guard
from .http.handlers import install_error_handlers
from .http.health import own_engine_polls
from .http.openapi import document_request_models
from .metrics import ServiceMetrics
from .settings import ServiceSettings

__all__ = ["create_app", "own_engine_polls"]


def create_app(
    settings: ServiceSettings | None = None,
    engine: Engine | None = None,
    batcher: MicroBatcher | None = None,
    executor: ThreadPoolExecutor | None = None,
    metrics: ServiceMetrics | None = None,
) -> FastAPI:
    """The FastAPI app. Without `engine`, one is built from `settings` and started (and closed on shutdown);
    without `batcher`, one is made that feeds `engine.run_batch` on `executor` (by default a pool of as many threads
    as `engine_batches` may run batches)."""
    settings = settings or ServiceSettings()
    metrics = metrics or (engine.metrics if engine is not None and isinstance(engine.metrics, ServiceMetrics) else ServiceMetrics())
    on_shutdown = []
    if engine is None:
        engine = Engine.from_settings(settings, metrics=metrics).start()
        on_shutdown.append(engine.close)
    if executor is None:
        executor = engine_executor(settings)
        on_shutdown.append(lambda: executor.shutdown(wait=False))
    if batcher is None:
        batcher = engine_batcher(engine, settings, executor)
    metrics.watch_batcher(batcher)

    app = FastAPI(
        title="keepclip",
        version="0.1.0",
        description="A frozen CLIP that keeps learning tasks: per-image routing to each task's head or prompts, hot swap.",
        lifespan=_lifespan,
        docs_url=None,  # served offline below: FastAPI's own page loads Swagger UI from a CDN
        redoc_url=None,
    )
    app.state.engine, app.state.settings, app.state.metrics, app.state.batcher = engine, settings, metrics, batcher
    app.state.in_engine, app.state.on_shutdown = InEngine(executor), on_shutdown
    mount_offline_docs(app)
    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    if settings.ui:
        from .ui import mount_ui

        mount_ui(app, engine, settings)
    document_request_models(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    for close in app.state.on_shutdown:  # what create_app made itself: the engine, the executor
        close()


if __name__ == "__main__":  # python -m service.api > service/openapi.json  (the committed contract)
    import sys

    class _NoEngine:  # the schema needs no model: build the app around a stand-in that is never called
        metrics = None
        state = None
        run_batch = None

    _settings = ServiceSettings(ui=False)
    _app = create_app(_settings, engine=_NoEngine())  # type: ignore[arg-type]
    json.dump(_app.openapi(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
