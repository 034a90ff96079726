"""What the routes share, built once by `service.api.create_app` and kept in `app.state`; a route asks for what it
uses by type, e.g. `async def search(engine: EngineDep, in_engine: InEngineDep)`. The getters are `async`: FastAPI
runs a plain `def` dependency in its thread pool, a thread hop per dependency per request."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Callable

from fastapi import Depends, Request

from ..batching import MicroBatcher
from ..engine import Engine
from ..metrics import ServiceMetrics
from ..settings import ServiceSettings


class InEngine:
    """Runs a call on the engine's executor (the threads that run its batches), off the event loop, one call at a
    time: text requests (embed, search) then hold one engine thread at most, and a batch of images waits for one of
    them at most, not for every text request queued before it (20 clients embedding 256 long texts each, 0.65 s a
    request, held a one-image client up for 10.9 s (p50) in a hostile-client trial)."""

    def __init__(self, executor: ThreadPoolExecutor):
        self.executor = executor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._one: asyncio.Semaphore | None = None  # per event loop (TestClients move the app to a new one)

    async def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._one = loop, asyncio.Semaphore(1)
        async with self._one:
            return await loop.run_in_executor(self.executor, fn, *args)


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def get_batcher(request: Request) -> MicroBatcher:
    """Images go to the engine through the batcher: a request's images join the dynamic batch together."""
    return request.app.state.batcher


async def get_in_engine(request: Request) -> InEngine:
    return request.app.state.in_engine


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
InEngineDep = Annotated[InEngine, Depends(get_in_engine)]
