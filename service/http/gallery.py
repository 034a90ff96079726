"""This replica's retrieval gallery: POST /v1/gallery adds images under ids, POST /v1/search queries it."""
from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, Depends

from .. import schemas as S
from ..engine import EmbedJob, EmbedResult
from ..errors import ApiError, echo
from ..gallery import GalleryFull
from ..images import decode_base64
from ..settings import ServiceSettings
from .body import Body, Form, json_image, request_body, validate
from .common import MAX_TEXT_CHARS, check_top_k, image_tensors, raise_task_error
from .deps import BatcherDep, EngineDep, InEngineDep, SettingsDep
from .openapi import ERRORS, FILE, FILES, ONE_UPLOAD, STRINGS, body_doc

UPLOAD_FIELDS = ("files", "file", "images", "image")  # the gallery's images: any one of these names

router = APIRouter()


# ----------------------------------------------------------------------------- POST /v1/gallery
def gallery_json(data: dict, settings: ServiceSettings) -> Body[S.GalleryRequest]:
    """The images labelled by their ids."""
    req = validate(S.GalleryRequest, data)
    if len(req.items) > settings.max_images_per_request:
        raise ApiError(422, "validation_error", f"at most {settings.max_images_per_request} items per request")
    return Body(req, [(item.id, decode_base64(item.image, f"items[{n}].image")) for n, item in enumerate(req.items)])


def gallery_form(form: Form, settings: ServiceSettings) -> Body[None]:
    """Repeated `files` (or `images`, `file`, `image`) and as many `ids` (default: the file names), as in JSON."""
    used = form.take_files(UPLOAD_FIELDS)
    if len(used) > 1:
        raise ApiError(422, "validation_error", f"send the images in one field, not in {' and '.join(used)}")
    got = next(iter(used.values()), [])
    ids = form.all("ids") or [name for name, _ in got]
    form.refuse_rest()
    if not got:
        raise ApiError(422, "validation_error", "multipart body needs images in 'files'")
    if len(ids) != len(got) or any(not i or len(i) > 256 for i in ids):
        raise ApiError(422, "validation_error", "give one non-empty id (at most 256 characters) per file")
    return Body(None, [(i, data) for i, (_, data) in zip(ids, got)])


GalleryBody = Annotated[Body[S.GalleryRequest], Depends(request_body(gallery_json, gallery_form))]


@router.post(
    "/v1/gallery",
    response_model=S.GalleryResponse,
    responses={**ERRORS, 409: {"model": S.ErrorResponse}},
    summary="Add images (with ids) to this replica's retrieval gallery",
    openapi_extra=body_doc(S.GalleryRequest, "the images in `files` (or `images`, `file`, `image`: one field of them)", files=FILES, ids=STRINGS),
)
async def gallery(body: GalleryBody, engine: EngineDep, settings: SettingsDep, batcher: BatcherDep) -> S.GalleryResponse:
    """An id given again replaces its embedding. Multipart: repeated `files`, and as many `ids` (default: file names)."""
    ids = [i for i, _ in body.images]
    if len(set(ids)) != len(ids):
        raise ApiError(422, "validation_error", "ids must be distinct")
    images = await image_tensors(engine, settings, [(f"image '{echo(i, 40)}'", data) for i, data in body.images])
    results = await batcher.submit_many([EmbedJob(im) for im in images])  # they share dynamic batches
    feats = torch.stack([raise_task_error(r).embedding for r in results])
    try:
        size = engine.gallery.add(ids, feats)
    except GalleryFull as e:
        raise ApiError(409, "gallery_full", str(e)) from None
    return S.GalleryResponse(added=ids, size=size)


# ----------------------------------------------------------------------------- POST /v1/search
def search_json(data: dict, settings: ServiceSettings) -> Body[S.SearchRequest]:
    req = validate(S.SearchRequest, data)
    return Body(req, json_image(req.image))


def search_form(form: Form, settings: ServiceSettings) -> Body[S.SearchRequest]:
    image = form.image()
    return Body(form.finish(S.SearchRequest, {"text": form.one("text"), "top_k": form.integer("top_k")}), image)


SearchBody = Annotated[Body[S.SearchRequest], Depends(request_body(search_json, search_form))]


@router.post(
    "/v1/search",
    response_model=S.SearchResponse,
    responses=ERRORS,
    summary="Search the gallery with a text or an image",
    openapi_extra=body_doc(S.SearchRequest, ONE_UPLOAD, file=FILE, image=FILE, text={"type": "string"}, top_k={"type": "integer", "default": 5}),
)
async def search(body: SearchBody, engine: EngineDep, settings: SettingsDep, batcher: BatcherDep, in_engine: InEngineDep) -> S.SearchResponse:
    req = body.model
    if (not body.images) == (req.text is None):
        raise ApiError(422, "validation_error", "give exactly one of 'text' or an image")
    top_k = check_top_k(req.top_k, settings)
    if req.text is not None:
        if len(req.text) > MAX_TEXT_CHARS:
            raise ApiError(422, "validation_error", f"text must be at most {MAX_TEXT_CHARS} characters")
        hits = await in_engine(engine.search_text, req.text, top_k)
        kind = "text"
    else:
        [image] = await image_tensors(engine, settings, body.images)
        result: EmbedResult = raise_task_error(await batcher.submit(EmbedJob(image)))
        hits, kind = engine.gallery.search(result.embedding, top_k), "image"
    return S.SearchResponse(query=kind, results=[S.SearchHit(id=i, score=s) for i, s in hits])
