"""What the endpoints share once a body is read: task names, the engine's refusals as HTTP errors, images decoded off
the event loop, the top_k limit."""
from __future__ import annotations

import asyncio
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from backbone.loading import available_cores
from prompts_store import InvalidTaskName, validate_task_name

from ..engine import Engine, TaskNotLoaded, WeightNotSupported
from ..errors import ApiError, echo
from ..images import decode_image, decoding_budget
from ..settings import ServiceSettings
from .body import Image

MAX_TEXT_CHARS = 2000


def task_name(name: str) -> str:
    """A task name from the client, valid (else 404): only such a name reaches the store or the engine, whose
    refusals quote it (a 100,000-character one would come back). Also the `{name}` path parameter of /v1/tasks."""
    try:
        return validate_task_name(name)
    except InvalidTaskName:
        raise ApiError(404, "task_not_found", f"no task '{echo(name)}' (not a valid task name)") from None


def served_task(task: str | None) -> str | None:
    return None if task is None else task_name(task)


def check_top_k(top_k: int, settings: ServiceSettings) -> int:
    if top_k > settings.max_top_k:
        raise ApiError(422, "validation_error", f"top_k must be <= {settings.max_top_k}")
    return top_k


def raise_task_error(result: Any) -> Any:
    """One result of the engine's batch, or the refusal it holds as an HTTP error."""
    if isinstance(result, TaskNotLoaded):
        raise ApiError(404, "task_not_found", str(result))
    if isinstance(result, WeightNotSupported):
        raise ApiError(422, "validation_error", str(result))
    if isinstance(result, Exception):
        raise result
    return result


CORES = available_cores()


async def image_tensors(engine: Engine, settings: ServiceSettings, images: list[Image]) -> list[torch.Tensor]:
    """Decoded and preprocessed off the event loop: a request's images in one worker-thread call per core at most
    (Pillow decodes without the GIL), in order. The first image that cannot be read, in the order sent, is the error."""
    budget = decoding_budget(settings)

    def load(part: list[Image]) -> list[torch.Tensor]:
        return [decode_image(data, settings.max_image_pixels, label, budget, engine.preprocess, engine.reading)
                for label, data in part]

    parts = min(len(images), CORES)
    if parts <= 1:
        return await run_in_threadpool(load, images)
    size = -(-len(images) // parts)
    chunks = [images[i : i + size] for i in range(0, len(images), size)]
    done = await asyncio.gather(*(run_in_threadpool(load, chunk) for chunk in chunks), return_exceptions=True)
    for result in done:  # chunks are in order, and each stops at its first bad image
        if isinstance(result, BaseException):
            raise result
    return [tensor for result in done for tensor in result]
