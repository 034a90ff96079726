"""POST /v1/classify: one image or several, within a task's classes, over free labels, or task-agnostic."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from .. import schemas as S
from ..engine import ClassifyJob
from ..errors import ApiError
from ..images import decode_base64
from ..settings import ServiceSettings
from .body import Body, Form, check_image_count, request_body, validate
from .common import check_top_k, image_tensors, raise_task_error, served_task
from .deps import BatcherDep, EngineDep, InEngineDep, SettingsDep
from .openapi import ERRORS, FILE, FILES, STRINGS, body_doc

# one image in `file` or `image`; several as repeated `file`/`image` parts, or `images` (plural: the answer is a list)
UPLOAD_FIELDS = ("file", "image", "images")

router = APIRouter()


def classify_json(data: dict, settings: ServiceSettings) -> Body[S.ClassifyRequest]:
    req = validate(S.ClassifyRequest, data)
    if (req.image is None) == (req.images is None):
        raise ApiError(422, "validation_error", "give 'image' (one base64 image) or 'images' (a list of them), not both or neither")
    if req.image is not None:
        return Body(req, [("image", decode_base64(req.image))])
    if not req.images:
        raise ApiError(422, "validation_error", "'images' must hold at least one image")
    check_image_count(len(req.images), settings)
    return Body(req, [(f"images[{n}]", decode_base64(image, f"images[{n}]")) for n, image in enumerate(req.images)], many=True)


def classify_form(form: Form, settings: ServiceSettings) -> Body[S.ClassifyRequest]:
    used = form.take_files(UPLOAD_FIELDS)
    if len(used) > 1:
        raise ApiError(422, "validation_error", "send one image in 'file' or 'image', or several in one of 'file', "
                       f"'image', 'images'; not in {' and '.join(used)}")
    if not used:
        raise ApiError(422, "validation_error", "multipart body needs an image in the 'file' (or 'image') field")
    [(field, got)] = used.items()
    many = field == "images" or len(got) > 1
    check_image_count(len(got), settings)
    values = {"labels": form_labels(form.all("labels"), settings), "task": form.one("task"), "top_k": form.integer("top_k")}
    images = [(f"{field}[{n}]" if many else "image", data) for n, (_, data) in enumerate(got)]
    return Body(form.finish(S.ClassifyRequest, values), images, many)


def form_labels(values: list[str] | None, settings: ServiceSettings) -> list[str] | None:
    """Repeated `labels` fields, or one comma-separated value (counted before it is split: it may hold millions)."""
    if values is None or len(values) != 1:
        return values
    if (count := values[0].count(",") + 1) > settings.max_labels:
        raise ApiError(422, "validation_error", f"too many labels: {count}; the limit is {settings.max_labels} (KEEPCLIP_MAX_LABELS)")
    return values[0].split(",")


def check_labels(labels: list[str] | None, settings: ServiceSettings) -> tuple[str, ...] | None:
    if labels is None:
        return None
    cleaned = [label.strip() for label in labels]
    if not cleaned:
        raise ApiError(422, "validation_error", "labels must not be empty (omit the field for task classification)")
    if len(cleaned) > settings.max_labels:
        raise ApiError(422, "validation_error", f"too many labels: {len(cleaned)}; the limit is {settings.max_labels} (KEEPCLIP_MAX_LABELS)")
    if any(not label for label in cleaned):
        raise ApiError(422, "validation_error", "labels must be non-empty strings")
    if any(len(label) > settings.max_label_chars for label in cleaned):
        raise ApiError(422, "validation_error", f"labels must be at most {settings.max_label_chars} characters")
    if len(set(cleaned)) != len(cleaned):
        raise ApiError(422, "validation_error", "labels must be distinct")
    return tuple(cleaned)


ClassifyBody = Annotated[Body[S.ClassifyRequest], Depends(request_body(classify_json, classify_form))]
_FORM_DOC = (
    "one image in `file` or `image` (answer: one result); several images as repeated `file` or `image` parts, or "
    "any number as `images` parts (answer: `{results: [...]}`, in order); at most `max_images_per_request`"
)


@router.post(
    "/v1/classify",
    response_model=S.ClassifyResponse | S.ClassifyManyResponse,
    responses=ERRORS,
    summary="Classify one image or several (by task, by free labels, or task-agnostic)",
    openapi_extra=body_doc(
        S.ClassifyRequest, _FORM_DOC, file=FILE, image=FILE, images=FILES, task={"type": "string"}, labels=STRINGS,
        top_k={"type": "integer", "default": 5},
    ),
)
async def classify(body: ClassifyBody, engine: EngineDep, settings: SettingsDep, batcher: BatcherDep,
                   in_engine: InEngineDep) -> S.ClassifyResponse | S.ClassifyManyResponse:
    """Modes: `task` (that task's classes, its prompts at w = 1), `labels` (open vocabulary; the routed task's
    prompts still apply, weighted by its gate), or neither (task-agnostic: the routed task's classes). Without
    task or labels, an image that matches no learned task gets `task: null` and the frozen CLIP answer over the
    service's open vocabulary (setting `vocabulary`, default ImageNet-1k class names), with a `message` saying so.

    Several images (JSON `images`, or several multipart parts) share the request's fields, are routed each on
    its own, and come back as `{results: [...]}` in the order sent; one image (`image`) gets one result."""
    req = body.model
    if req.task is not None and req.labels is not None:
        raise ApiError(422, "validation_error", "give either 'task' or 'labels', not both")
    task, labels, top_k = served_task(req.task), check_labels(req.labels, settings), check_top_k(req.top_k, settings)
    tensors = await image_tensors(engine, settings, body.images)
    if labels is not None and not engine.labels_cached(labels):  # new labels: on the text lane, not in a shared batch
        await in_engine(engine.encode_labels, labels)
    # the images join the dynamic batch together (each routed on its own); a refusal of any fails the request
    results = await batcher.submit_many([ClassifyJob(image, task, labels, top_k) for image in tensors])
    answers = [S.ClassifyResponse.from_result(raise_task_error(r)) for r in results]
    return S.ClassifyManyResponse(results=answers) if body.many else answers[0]
