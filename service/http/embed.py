"""POST /v1/embed: an image's or texts' embeddings, frozen or with a task's prompts."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from .. import schemas as S
from ..engine import EmbedJob, EmbedResult, Engine, TaskNotLoaded, WeightNotSupported
from ..errors import ApiError
from ..settings import ServiceSettings
from .body import Body, Form, json_image, request_body, validate
from .common import MAX_TEXT_CHARS, image_tensors, raise_task_error, served_task
from .deps import BatcherDep, EngineDep, InEngine, InEngineDep, SettingsDep
from .openapi import ERRORS, FILE, ONE_UPLOAD, STRINGS, body_doc

router = APIRouter()


def embed_json(data: dict, settings: ServiceSettings) -> Body[S.EmbedRequest]:
    req = validate(S.EmbedRequest, data)
    return Body(req, json_image(req.image))


def embed_form(form: Form, settings: ServiceSettings) -> Body[S.EmbedRequest]:
    image = form.image()
    values = {"text": form.all("text"), "task": form.one("task"), "weight": form.number("weight")}
    return Body(form.finish(S.EmbedRequest, values), image)


EmbedBody = Annotated[Body[S.EmbedRequest], Depends(request_body(embed_json, embed_form))]


@router.post(
    "/v1/embed",
    response_model=S.EmbedResponse,
    responses=ERRORS,
    summary="Embed an image or texts (frozen, or with a task's prompts)",
    openapi_extra=body_doc(
        S.EmbedRequest, ONE_UPLOAD, file=FILE, image=FILE, text=STRINGS, task={"type": "string"},
        weight={"type": "number", "default": 1.0},
    ),
)
async def embed(body: EmbedBody, engine: EngineDep, settings: SettingsDep, batcher: BatcherDep, in_engine: InEngineDep) -> S.EmbedResponse:
    req = body.model
    if (not body.images) == (req.text is None):
        raise ApiError(422, "validation_error", "give exactly one of an image or text")
    task = served_task(req.task)
    if body.images:
        [image] = await image_tensors(engine, settings, body.images)
        result: EmbedResult = raise_task_error(await batcher.submit(EmbedJob(image, task, req.weight)))
        return S.EmbedResponse(
            kind="image", embeddings=[result.embedding.tolist()], dim=int(result.embedding.shape[0]),
            task=result.task, version=result.version, weight=result.weight,
        )
    return await embed_texts(req, task, engine, settings, in_engine)


async def embed_texts(req: S.EmbedRequest, task: str | None, engine: Engine, settings: ServiceSettings, in_engine: InEngine) -> S.EmbedResponse:
    texts = [req.text] if isinstance(req.text, str) else list(req.text)
    if not texts or len(texts) > settings.max_labels or any(not t or len(t) > MAX_TEXT_CHARS for t in texts):
        raise ApiError(422, "validation_error", f"text: 1 to {settings.max_labels} non-empty strings of at most {MAX_TEXT_CHARS} characters")
    try:
        feats, version = await in_engine(engine.embed_texts, texts, task, req.weight)
    except (TaskNotLoaded, WeightNotSupported) as e:
        raise_task_error(e)  # the same answers as an image's refusal
    return S.EmbedResponse(
        kind="text", embeddings=feats.tolist(), dim=int(feats.shape[1]), task=req.task, version=version,
        weight=req.weight if req.task else 0.0,
    )
