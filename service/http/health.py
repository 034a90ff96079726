"""Operations: GET /healthz (liveness and what this replica serves), GET /metrics (Prometheus), and / (to the UI or
the API docs)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, RedirectResponse, Response

from .. import schemas as S
from ..engine import Engine
from .deps import EngineDep, MetricsDep, SettingsDep

router = APIRouter()


def own_engine_polls(engine: Engine) -> bool:
    """True when the engine was started with a poller (so a dead poller means a degraded replica)."""
    return engine._thread is not None  # noqa: SLF001 - same package


@router.get("/healthz", response_model=S.Health, summary="Liveness and what this replica serves")
async def healthz(engine: EngineDep) -> JSONResponse:
    h = engine.health()
    ok = h["polling"] or not own_engine_polls(engine)
    body = S.Health(status="ok" if ok else "degraded", gallery_size=len(engine.gallery), **h)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(engine: EngineDep, metrics: MetricsDep) -> Response:
    metrics.observe_state(engine.state.generation, len(engine.state.tasks), len(engine.state.errors))
    return Response(metrics.render(), media_type=metrics.content_type)


@router.get("/", include_in_schema=False)
async def root(settings: SettingsDep) -> RedirectResponse:
    return RedirectResponse("/ui/" if settings.ui else "/docs")
