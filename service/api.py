"""The HTTP API as a FastAPI app factory, usable in-process (tests, notebooks) or as the Serve ingress.

    app = create_app(ServiceSettings(...))                           # builds and starts its own Engine
    app = create_app(settings, engine=engine, batcher=b, executor=x)   # the Serve deployment passes its own

Every refusal is `{"error": {"code": ..., "message": ...}}` with a 4xx status; FastAPI's own validation errors and
Starlette's HTTP errors are reshaped the same way. A 500 only ever means a bug: hostile bodies (deep nesting, lone
surrogates, NaN, huge arrays, loose types) are refused while parsing, before a model, the engine or a renderer sees them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompts_store import (ArtifactIntegrityError, InvalidTaskName, InvalidVersion, StoreError, TaskNotFound,
                          validate_task_name)

from . import schemas as S
from .batching import MicroBatcher
from .engine import ClassifyJob, ClassifyResult, EmbedJob, EmbedResult, Engine, TaskNotLoaded, WeightNotSupported
from .docs_assets import mount_offline_docs
from .errors import STATUS_CODES, ApiError, echo, error_body, printable
from .gallery import GalleryFull
from .images import decode_base64, decode_image
from .metrics import ServiceMetrics
from .settings import ServiceSettings

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 2000
# Most entries of any JSON array or object within the depth our models read (more is refused before validation:
# pydantic would build one error per entry, ~30 s and 4 GB for 4 M of them). Raised to the label and image limits.
MAX_JSON_ENTRIES = 4096
UPLOAD_FIELDS = ("file", "image")  # the multipart field of one image: README's `curl -F image=@cat.png` works too
# classify also takes several images: repeated `file`/`image` parts, or `images` (plural: the answer is always a list)
CLASSIFY_UPLOAD_FIELDS = (*UPLOAD_FIELDS, "images")
GALLERY_UPLOAD_FIELDS = ("files", "file", "images", "image")
_FORM_INT = re.compile(r"[+-]?[0-9]{1,18}")
ERRORS = {s: {"model": S.ErrorResponse} for s in (400, 404, 413, 415, 422)}
ADMIN_ERRORS = {s: {"model": S.ErrorResponse} for s in (401, 403, 404, 409, 422)}
REQUEST_MODELS = (S.ClassifyRequest, S.EmbedRequest, S.GalleryRequest, S.SearchRequest)


def _body_doc(model: type[BaseModel], multipart: dict) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
                "multipart/form-data": {"schema": multipart},
            },
        }
    }


_FILE = {"type": "string", "format": "binary"}
_ONE_UPLOAD = "the image in `file` or `image` (either name, one image)"
_CLASSIFY_UPLOADS = (
    "one image in `file` or `image` (answer: one result); several images as repeated `file` or `image` parts, or "
    "any number as `images` parts (answer: `{results: [...]}`, in order); at most `max_images_per_request`"
)
_STRS = {"type": "array", "items": {"type": "string"}}


# ----------------------------------------------------------------------------- body limit, HEAD, metrics (pure ASGI)
class _Guard:
    """Refuses bodies over the byte limit before reading them (Content-Length) or while streaming them (chunked);
    answers HEAD like GET without the body (FastAPI registers GET routes for GET only); records request count and
    latency by endpoint (route template), method and status."""

    def __init__(self, app, max_body_bytes: int, metrics: ServiceMetrics):
        self.app, self.limit, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, method = time.perf_counter(), [500], scope.get("method", "")
        if method == "HEAD":
            scope["method"] = "GET"  # in place: the router notes the matched route in this scope (the metrics label)

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif method == "HEAD" and message["type"] == "http.response.body":
                if message.get("more_body"):
                    return
                message = {**message, "body": b""}
            await send(message)

        try:
            refusal = self._length_refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send_wrapper)
            await self.app(scope, self._limited(receive), send_wrapper)
        finally:
            self.metrics.observe_request(_endpoint(scope), method, status[0], time.perf_counter() - start)

    def _length_refusal(self, scope) -> JSONResponse | None:
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is None:
            return None
        if not length.isdigit():
            return JSONResponse(error_body("bad_request", "bad Content-Length"), status_code=400)
        if len(length) > 18 or int(length) > self.limit:  # 19+ digits: over any limit (and int() may refuse them)
            message = f"request body is {echo(length.decode(), 20)} bytes; the limit is {self.limit}"
            return JSONResponse(error_body("payload_too_large", message), status_code=413)
        return None

    def _limited(self, receive):
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise ApiError(413, "payload_too_large", f"request body exceeds the limit of {self.limit} bytes")
            return message

        return limited_receive


def _endpoint(scope) -> str:
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    path = scope.get("path", "")
    return "/ui" if path.startswith("/ui") else "other"


# ----------------------------------------------------------------------------- the app
def create_app(
    settings: ServiceSettings | None = None,
    engine: Engine | None = None,
    batcher: MicroBatcher | None = None,
    executor: ThreadPoolExecutor | None = None,
    metrics: ServiceMetrics | None = None,
) -> FastAPI:
    """The FastAPI app. Without `engine`, one is built from `settings` and started (and closed on shutdown);
    without `batcher`, one is made that feeds `engine.run_batch` on `executor` (a one-thread pool by default)."""
    settings = settings or ServiceSettings()
    metrics = metrics or (engine.metrics if engine is not None and isinstance(engine.metrics, ServiceMetrics) else ServiceMetrics())
    own_engine = engine is None
    if engine is None:
        engine = Engine.from_settings(settings, metrics=metrics).start()
    own_executor = executor is None
    executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="keepclip-engine")
    if batcher is None:
        batcher = MicroBatcher(engine.run_batch, executor, settings.max_batch_size, settings.batch_wait_timeout_s)
    submit, submit_many = batcher.submit, batcher.submit_many

    @asynccontextmanager
    async def lifespan(_app):
        yield
        if own_engine:
            engine.close()
        if own_executor:
            executor.shutdown(wait=False)

    app = FastAPI(
        title="keepclip",
        version="0.1.0",
        description="A frozen CLIP that keeps learning tasks: per-image routing to each task's head or prompts, hot swap.",
        lifespan=lifespan,
        docs_url=None,  # served offline below: FastAPI's own page loads Swagger UI from a CDN
        redoc_url=None,
    )
    mount_offline_docs(app)
    app.state.engine, app.state.settings, app.state.metrics, app.state.batcher = engine, settings, metrics, batcher
    app.add_middleware(_Guard, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    bearer = HTTPBearer(auto_error=False, description="KEEPCLIP_ADMIN_TOKEN")

    async def in_engine(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        code = STATUS_CODES.get(exc.status_code, "error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        return JSONResponse(error_body("validation_error", _summarise(exc.errors())), status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(_request, exc: Exception):
        # made printable first: a message carrying a lone surrogate must not break the logging of the bug too
        log.error("internal error: %s", printable("".join(traceback.format_exception(exc))))
        return JSONResponse(error_body("internal_error", f"internal error ({type(exc).__name__})"), status_code=500)

    # ------------------------------------------------------------------ parsing
    async def parse(request: Request) -> tuple[dict[str, list[Any]] | dict[str, Any], dict[str, list[tuple[str, bytes]]], bool]:
        """-> (fields, uploaded files by field, is_json)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json" or ctype.endswith("+json"):
            return json_body(await request.body()), {}, True
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=settings.max_images_per_request, max_fields=1000, max_part_size=settings.max_body_bytes)
            except StarletteHTTPException as e:
                if "too many files" in str(e.detail).lower():  # Starlette's 400: answer like a JSON list that is too long
                    raise too_many_images(f"more than {settings.max_images_per_request}") from None
                raise
            fields: dict[str, list[Any]] = {}
            files: dict[str, list[tuple[str, bytes]]] = {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    files.setdefault(key, []).append((value.filename or "", await value.read()))
                else:
                    fields.setdefault(key, []).append(value)
            await form.close()
            _check_form_text(fields, files)
            return fields, files, False
        raise ApiError(415, "unsupported_media_type", "send application/json (base64 image) or multipart/form-data (file upload)")

    def json_body(raw: bytes) -> dict[str, Any]:
        """pydantic's parser refuses what json.loads lets through: nesting over 200 deep (json.loads: RecursionError),
        lone surrogates (unrenderable in any reply), NaN/Infinity, invalid UTF-8."""
        try:
            data = from_json(raw, allow_inf_nan=False)
        except ValueError as e:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON ({echo(str(e))})") from None
        if not isinstance(data, dict):
            raise ApiError(422, "validation_error", "the JSON body must be an object")
        _check_entries(data, max(MAX_JSON_ENTRIES, settings.max_labels, settings.max_images_per_request))
        return data

    def one(fields: dict[str, list], name: str):
        values = fields.pop(name, None)
        if values is None:
            return None
        if len(values) != 1:
            raise ApiError(422, "validation_error", f"form field '{name}' given {len(values)} times")
        return values[0]

    def no_extra(fields: dict, files: dict, allowed_files: tuple[str, ...]) -> None:
        extra = sorted(set(fields) | (set(files) - set(allowed_files)))
        if extra:
            shown = ", ".join(echo(name, 40) for name in extra[:5])
            raise ApiError(422, "validation_error", f"unknown form field(s): {shown}{', ...' if len(extra) > 5 else ''}")

    def no_text(fields: dict, names: tuple[str, ...]) -> None:
        if text := [name for name in names if name in fields]:
            raise ApiError(422, "validation_error", f"'{text[0]}' must be a file upload (curl -F {text[0]}=@cat.png), not text")

    def upload(fields: dict, files: dict) -> bytes | None:
        """The image of a one-image request, in `file` or `image`."""
        no_text(fields, UPLOAD_FIELDS)
        got = [item for name in UPLOAD_FIELDS for item in files.get(name, [])]
        if len(got) > 1:
            raise ApiError(422, "validation_error", f"send one image, in 'file' or 'image' (got {len(got)})")
        return got[0][1] if got else None

    def classify_uploads(fields: dict, files: dict) -> tuple[list[tuple[str, bytes]], bool]:
        """(images as [(field label, bytes)], is a list answered) of a multipart classify request."""
        no_text(fields, CLASSIFY_UPLOAD_FIELDS)
        used = [name for name in CLASSIFY_UPLOAD_FIELDS if name in files]
        if len(used) > 1:
            raise ApiError(422, "validation_error", "send one image in 'file' or 'image', or several in one of 'file', "
                           f"'image', 'images'; not in {' and '.join(used)}")
        if not used:
            raise ApiError(422, "validation_error", "multipart body needs an image in the 'file' (or 'image') field")
        field, got = used[0], files[used[0]]
        many = field == "images" or len(got) > 1
        return [(f"{field}[{n}]" if many else "image", data) for n, (_, data) in enumerate(got)], many

    def json_images(req: S.ClassifyRequest) -> tuple[list[tuple[str, bytes]], bool]:
        """(images as [(field label, bytes)], is a list answered) of a JSON classify request."""
        if (req.image is None) == (req.images is None):
            raise ApiError(422, "validation_error", "give 'image' (one base64 image) or 'images' (a list of them), not both or neither")
        if req.image is not None:
            return [("image", decode_base64(req.image))], False
        if not req.images:
            raise ApiError(422, "validation_error", "'images' must hold at least one image")
        check_image_count(len(req.images))
        return [(f"images[{n}]", decode_base64(image, f"images[{n}]")) for n, image in enumerate(req.images)], True

    def check_image_count(count: int) -> None:
        if count > settings.max_images_per_request:
            raise too_many_images(str(count))

    def too_many_images(count: str) -> ApiError:
        return ApiError(422, "too_many_images", f"too many images: {count}; at most {settings.max_images_per_request} "
                        "per request (KEEPCLIP_MAX_IMAGES_PER_REQUEST)")

    def uploads(fields: dict, files: dict) -> tuple[str, list[tuple[str, bytes]]]:
        """(field, [(file name, bytes)]) of a gallery request: any one of the upload field names will do."""
        no_text(fields, GALLERY_UPLOAD_FIELDS)
        used = [name for name in GALLERY_UPLOAD_FIELDS if name in files]
        if len(used) > 1:
            raise ApiError(422, "validation_error", f"send the images in one field, not in {' and '.join(used)}")
        return (used[0], files[used[0]]) if used else ("files", [])

    def served_task(task: str | None) -> str | None:
        """Only a valid task name reaches the engine, whose refusals quote it (a 100,000-character one would come back)."""
        return None if task is None else task_name(task)

    async def image_tensor(data: bytes, field: str = "image"):
        [image] = await image_tensors([(field, data)])
        return image

    async def image_tensors(items: list[tuple[str, bytes]]) -> list[torch.Tensor]:
        """Decoded and preprocessed off the event loop, all of a request's images in one worker-thread call."""
        def load():
            return [engine.preprocess(decode_image(data, settings.max_image_pixels, field)) for field, data in items]

        return await run_in_threadpool(load)

    def check_top_k(top_k: int) -> int:
        if top_k > settings.max_top_k:
            raise ApiError(422, "validation_error", f"top_k must be <= {settings.max_top_k}")
        return top_k

    def form_labels(values: list[str] | None) -> list[str] | None:
        """Repeated `labels` fields, or one comma-separated value (counted before it is split: it may hold millions)."""
        if values is None or len(values) != 1:
            return values
        if (count := values[0].count(",") + 1) > settings.max_labels:
            raise ApiError(422, "validation_error", f"too many labels: {count}; the limit is {settings.max_labels} (KEEPCLIP_MAX_LABELS)")
        return values[0].split(",")

    def check_labels(labels: list[str] | None) -> tuple[str, ...] | None:
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

    def raise_task_error(result):
        if isinstance(result, TaskNotLoaded):
            raise ApiError(404, "task_not_found", str(result))
        if isinstance(result, WeightNotSupported):
            raise ApiError(422, "validation_error", str(result))
        if isinstance(result, Exception):
            raise result
        return result

    # ------------------------------------------------------------------ inference endpoints
    @app.post(
        "/v1/classify",
        response_model=S.ClassifyResponse | S.ClassifyManyResponse,
        responses=ERRORS,
        summary="Classify one image or several (by task, by free labels, or task-agnostic)",
        openapi_extra=_body_doc(
            S.ClassifyRequest,
            {"type": "object", "description": _CLASSIFY_UPLOADS, "properties": {
                "file": _FILE, "image": _FILE, "images": {"type": "array", "items": _FILE}, "task": {"type": "string"},
                "labels": _STRS, "top_k": {"type": "integer", "default": 5}}},
        ),
    )
    async def classify(request: Request) -> S.ClassifyResponse | S.ClassifyManyResponse:
        """Modes: `task` (that task's classes, its prompts at w = 1), `labels` (open vocabulary; the routed task's
        prompts still apply, weighted by its gate), or neither (task-agnostic: the routed task's classes). Without
        task or labels, an image that matches no learned task gets `task: null` and the frozen CLIP answer over the
        service's open vocabulary (setting `vocabulary`, default ImageNet-1k class names), with a `message` saying so.

        Several images (JSON `images`, or several multipart parts) share the request's fields, are routed each on
        its own, and come back as `{results: [...]}` in the order sent; one image (`image`) gets one result."""
        fields, files, is_json = await parse(request)
        if is_json:
            req = _validate(S.ClassifyRequest, fields)
            images, many = json_images(req)
        else:
            images, many = classify_uploads(fields, files)
            check_image_count(len(images))
            labels = form_labels(fields.pop("labels", None))
            values = {"task": one(fields, "task"), "labels": labels, "top_k": _form_int(one(fields, "top_k"), "top_k")}
            no_extra(fields, files, CLASSIFY_UPLOAD_FIELDS)
            req = _validate(S.ClassifyRequest, {k: v for k, v in values.items() if v is not None})
        if req.task is not None and req.labels is not None:
            raise ApiError(422, "validation_error", "give either 'task' or 'labels', not both")
        task, labels, top_k = served_task(req.task), check_labels(req.labels), check_top_k(req.top_k)
        tensors = await image_tensors(images)
        # the images join the dynamic batch together (each routed on its own); a refusal of any fails the request
        results = await submit_many([ClassifyJob(image, task, labels, top_k) for image in tensors])
        answers = [_classify_response(raise_task_error(r)) for r in results]
        return S.ClassifyManyResponse(results=answers) if many else answers[0]

    @app.post(
        "/v1/embed",
        response_model=S.EmbedResponse,
        responses=ERRORS,
        summary="Embed an image or texts (frozen, or with a task's prompts)",
        openapi_extra=_body_doc(
            S.EmbedRequest,
            {"type": "object", "description": _ONE_UPLOAD, "properties": {"file": _FILE, "image": _FILE, "text": _STRS, "task": {"type": "string"}, "weight": {"type": "number", "default": 1.0}}},
        ),
    )
    async def embed(request: Request) -> S.EmbedResponse:
        fields, files, is_json = await parse(request)
        if is_json:
            req = _validate(S.EmbedRequest, fields)
            data = decode_base64(req.image) if req.image is not None else None
        else:
            data = upload(fields, files)
            values = {"text": fields.pop("text", None), "task": one(fields, "task"), "weight": _form_float(one(fields, "weight"), "weight")}
            no_extra(fields, files, UPLOAD_FIELDS)
            req = _validate(S.EmbedRequest, {k: v for k, v in values.items() if v is not None})
        if (data is None) == (req.text is None):
            raise ApiError(422, "validation_error", "give exactly one of an image or text")
        task = served_task(req.task)
        if data is not None:
            image = await image_tensor(data)
            result: EmbedResult = raise_task_error(await submit(EmbedJob(image, task, req.weight)))
            return S.EmbedResponse(
                kind="image", embeddings=[result.embedding.tolist()], dim=int(result.embedding.shape[0]),
                task=result.task, version=result.version, weight=result.weight,
            )
        texts = [req.text] if isinstance(req.text, str) else list(req.text)
        if not texts or len(texts) > settings.max_labels or any(not t or len(t) > MAX_TEXT_CHARS for t in texts):
            raise ApiError(422, "validation_error", f"text: 1 to {settings.max_labels} non-empty strings of at most {MAX_TEXT_CHARS} characters")
        try:
            feats, version = await in_engine(engine.embed_texts, texts, task, req.weight)
        except TaskNotLoaded as e:
            raise ApiError(404, "task_not_found", str(e)) from None
        except WeightNotSupported as e:
            raise ApiError(422, "validation_error", str(e)) from None
        return S.EmbedResponse(
            kind="text", embeddings=feats.tolist(), dim=int(feats.shape[1]), task=req.task, version=version,
            weight=req.weight if req.task else 0.0,
        )

    @app.post(
        "/v1/gallery",
        response_model=S.GalleryResponse,
        responses={**ERRORS, 409: {"model": S.ErrorResponse}},
        summary="Add images (with ids) to this replica's retrieval gallery",
        openapi_extra=_body_doc(
            S.GalleryRequest,
            {"type": "object", "description": "the images in `files` (or `images`, `file`, `image`: one field of them)", "properties": {"files": {"type": "array", "items": _FILE}, "ids": _STRS}},
        ),
    )
    async def gallery(request: Request) -> S.GalleryResponse:
        """An id given again replaces its embedding. Multipart: repeated `files`, and as many `ids` (default: file names)."""
        fields, files, is_json = await parse(request)
        if is_json:
            req = _validate(S.GalleryRequest, fields)
            if len(req.items) > settings.max_images_per_request:
                raise ApiError(422, "validation_error", f"at most {settings.max_images_per_request} items per request")
            items = [(item.id, decode_base64(item.image, f"items[{n}].image")) for n, item in enumerate(req.items)]
        else:
            field, got = uploads(fields, files)
            ids = fields.pop("ids", None) or [name for name, _ in got]
            no_extra(fields, files, (field,))
            if not got:
                raise ApiError(422, "validation_error", "multipart body needs images in 'files'")
            if len(ids) != len(got) or any(not i or len(i) > 256 for i in ids):
                raise ApiError(422, "validation_error", "give one non-empty id (at most 256 characters) per file")
            items = [(i, data) for i, (_, data) in zip(ids, got)]
        ids = [i for i, _ in items]
        if len(set(ids)) != len(ids):
            raise ApiError(422, "validation_error", "ids must be distinct")
        images = await image_tensors([(f"image '{echo(i, 40)}'", data) for i, data in items])
        results = await submit_many([EmbedJob(im) for im in images])  # they share dynamic batches
        feats = torch.stack([raise_task_error(r).embedding for r in results])
        try:
            size = engine.gallery.add(ids, feats)
        except GalleryFull as e:
            raise ApiError(409, "gallery_full", str(e)) from None
        return S.GalleryResponse(added=ids, size=size)

    @app.post(
        "/v1/search",
        response_model=S.SearchResponse,
        responses=ERRORS,
        summary="Search the gallery with a text or an image",
        openapi_extra=_body_doc(
            S.SearchRequest,
            {"type": "object", "description": _ONE_UPLOAD, "properties": {"file": _FILE, "image": _FILE, "text": {"type": "string"}, "top_k": {"type": "integer", "default": 5}}},
        ),
    )
    async def search(request: Request) -> S.SearchResponse:
        fields, files, is_json = await parse(request)
        if is_json:
            req = _validate(S.SearchRequest, fields)
            data = decode_base64(req.image) if req.image is not None else None
        else:
            data = upload(fields, files)
            values = {"text": one(fields, "text"), "top_k": _form_int(one(fields, "top_k"), "top_k")}
            no_extra(fields, files, UPLOAD_FIELDS)
            req = _validate(S.SearchRequest, {k: v for k, v in values.items() if v is not None})
        if (data is None) == (req.text is None):
            raise ApiError(422, "validation_error", "give exactly one of 'text' or an image")
        top_k = check_top_k(req.top_k)
        if req.text is not None:
            if len(req.text) > MAX_TEXT_CHARS:
                raise ApiError(422, "validation_error", f"text must be at most {MAX_TEXT_CHARS} characters")
            hits = await in_engine(engine.search_text, req.text, top_k)
            kind = "text"
        else:
            result: EmbedResult = raise_task_error(await submit(EmbedJob(await image_tensor(data))))
            hits, kind = engine.gallery.search(result.embedding, top_k), "image"
        return S.SearchResponse(query=kind, results=[S.SearchHit(id=i, score=s) for i, s in hits])

    # ------------------------------------------------------------------ tasks
    def task_name(name: str) -> str:
        try:
            return validate_task_name(name)
        except InvalidTaskName:
            raise ApiError(404, "task_not_found", f"no task '{echo(name)}' (not a valid task name)") from None

    def require_admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        token = settings.admin_token_value()
        if token is None:
            raise ApiError(403, "admin_disabled", "admin endpoints are disabled: start the service with KEEPCLIP_ADMIN_TOKEN set")
        if credentials is None:
            raise ApiError(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <admin token>'", headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise ApiError(403, "forbidden", "wrong admin token")

    def store_call(fn, *args):
        try:
            return fn(*args)
        except TaskNotFound as e:
            raise ApiError(404, "task_not_found", str(e)) from None
        except (InvalidTaskName, InvalidVersion) as e:
            raise ApiError(422, "validation_error", str(e)) from None
        except ArtifactIntegrityError as e:
            raise ApiError(409, "artifact_damaged", str(e)) from None
        except (StoreError, OSError) as e:
            raise ApiError(503, "store_unavailable", f"the task store cannot be read: {e}") from None

    @app.get("/v1/tasks", response_model=S.TasksResponse, responses={503: {"model": S.ErrorResponse}}, summary="Live tasks")
    async def list_tasks() -> S.TasksResponse:
        snapshot = await run_in_threadpool(store_call, engine.store.snapshot)
        state = engine.state
        tasks = []
        for info in snapshot.tasks:
            loaded = state.tasks.get(info.name)
            tasks.append(
                S.TaskSummary(
                    name=info.name, version=info.version, loaded_version=loaded.version if loaded else None,
                    kind=info.kind, num_classes=info.num_classes, created_at=info.created_at,
                    error=info.error or state.errors.get(info.name),
                )
            )
        return S.TasksResponse(generation=snapshot.generation, served_generation=state.generation, tasks=tasks)

    @app.get("/v1/tasks/{name}", response_model=S.TaskDetail, responses={404: {"model": S.ErrorResponse}, 422: {"model": S.ErrorResponse}}, summary="One task, with its versions")
    async def show_task(name: str) -> S.TaskDetail:
        name = task_name(name)
        history = await run_in_threadpool(store_call, engine.store.history, name)
        live = next((v for v in history if v.live), None)
        loaded = engine.state.tasks.get(name)
        class_names = templates = None
        if loaded is not None:  # what this replica serves (an older version if the live one was refused)
            class_names, templates = list(loaded.class_names), list(loaded.templates)
        elif live is not None:
            try:
                artifact = await run_in_threadpool(engine.store.get, name)
                class_names, templates = artifact.class_names, artifact.templates
            except StoreError:
                pass
        return S.TaskDetail(
            name=name, version=live.version if live else None, loaded_version=loaded.version if loaded else None,
            kind=live.kind if live else None, num_classes=live.num_classes if live else None,
            created_at=live.created_at if live else None, error=(live.error if live else None) or engine.state.errors.get(name),
            class_names=class_names, templates=templates, metrics=live.metrics if live else None,
            versions=[
                S.TaskVersion(version=v.version, live=v.live, kind=v.kind, num_classes=v.num_classes, created_at=v.created_at, metrics=v.metrics, error=v.error)
                for v in history
            ],
        )

    @app.delete("/v1/tasks/{name}", response_model=S.TaskChanged, responses=ADMIN_ERRORS, dependencies=[Depends(require_admin)], summary="Take a task out of service (admin)")
    async def delete_task(name: str) -> S.TaskChanged:
        """Only the live pointer is cleared: versions stay in the store and rollback revives one."""
        name = task_name(name)
        live = next((v.version for v in await run_in_threadpool(store_call, engine.store.history, name) if v.live), None)
        await run_in_threadpool(store_call, engine.store.delete, name)
        generation = await run_in_threadpool(store_call, engine.store.generation)
        engine.request_sync()
        return S.TaskChanged(name=name, op="delete", version=live, generation=generation)

    @app.post(
        "/v1/tasks/{name}/rollback", response_model=S.TaskChanged, responses=ADMIN_ERRORS, dependencies=[Depends(require_admin)],
        summary="Make an earlier version live again (admin)",
    )
    async def rollback_task(name: str, request: Request) -> S.TaskChanged:
        name = task_name(name)
        fields, files, is_json = await parse(request)
        if not is_json:
            values = {"version": _form_int(one(fields, "version"), "version")}
            no_extra(fields, files, ())
            fields = {k: v for k, v in values.items() if v is not None}
        req = _validate(S.RollbackRequest, fields)
        await run_in_threadpool(store_call, engine.store.rollback, name, req.version)
        generation = await run_in_threadpool(store_call, engine.store.generation)
        engine.request_sync()
        return S.TaskChanged(name=name, op="rollback", version=req.version, generation=generation)

    # ------------------------------------------------------------------ operations
    @app.get("/healthz", response_model=S.Health, summary="Liveness and what this replica serves")
    async def healthz() -> JSONResponse:
        h = engine.health()
        ok = h["polling"] or not own_engine_polls(engine)
        body = S.Health(status="ok" if ok else "degraded", gallery_size=len(engine.gallery), **h)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        metrics.observe_state(engine.state.generation, len(engine.state.tasks), len(engine.state.errors))
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/" if settings.ui else "/docs")

    if settings.ui:
        from .ui import mount_ui

        mount_ui(app, engine, settings)

    _document_request_models(app)
    return app


def own_engine_polls(engine: Engine) -> bool:
    """True when the engine was started with a poller (so a dead poller means a degraded replica)."""
    return engine._thread is not None  # noqa: SLF001 - same package


def _validate(model: type[BaseModel], data: dict) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, "validation_error", _summarise(e.errors(include_url=False, include_input=False))) from None


def _summarise(errors) -> str:
    """The first errors as `field: problem`; field names may be the client's own (unknown fields), so shortened."""
    parts = []
    for e in list(errors)[:5]:
        loc = ".".join(echo(str(p), 40) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {echo(e.get('msg', 'invalid'))}")
    return "; ".join(parts) or "invalid request"


def _check_entries(data: dict, cap: int) -> None:
    """Refuses arrays and objects of over `cap` entries where the request models iterate (the body, its values, their
    items): pydantic reports each bad entry on its own, ~30 s and 4 GB for 4 M of them. Deeper ones fail as one error."""
    level: list[tuple[str, dict | list]] = [("", data)]
    for depth in range(3):
        below = []
        for where, value in level:
            if len(value) > cap:
                raise ApiError(422, "validation_error", f"{where or 'body'}: {len(value)} entries; at most {cap} are accepted")
            if depth < 2:
                entries = value.items() if isinstance(value, dict) else enumerate(value)
                below += [(f"{where}.{echo(str(k), 40)}".lstrip("."), v) for k, v in entries if isinstance(v, (dict, list))]
        level = below


def _check_form_text(fields: dict[str, list], files: dict[str, list]) -> None:
    """Form text decoded with the client's charset (utf-7, unicode_escape, ...) may hold lone surrogates, which no
    reply can carry: refuse them here, like the JSON parser does."""
    texts = [*fields, *files, *(v for vs in fields.values() for v in vs), *(name for vs in files.values() for name, _ in vs)]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "bad_request", "a multipart field name or value is not valid text (lone surrogates)") from None


def _form_int(value: str | None, name: str) -> int | None:
    """A multipart integer: decimal digits only, as strict as the JSON field (no 'true', '1.0', '1e3')."""
    if value is None:
        return None
    if not _FORM_INT.fullmatch(value.strip()):
        raise ApiError(422, "validation_error", f"{name}: must be an integer of at most 18 digits, not '{echo(value, 20)}'")
    return int(value)


def _form_float(value: str | None, name: str) -> float | None:
    """A multipart number: finite (float() would take 'nan' and 'inf')."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ApiError(422, "validation_error", f"{name}: must be a finite number, not '{echo(value, 20)}'")
    return number


def _classify_response(r: ClassifyResult) -> S.ClassifyResponse:
    route = r.route
    return S.ClassifyResponse(
        mode=r.mode,
        task=r.task,
        version=r.version,
        gate=r.gate,
        routed=S.Routing(
            task=route.task, gate=route.weight, best=route.best, best_gate=route.best_weight,
            candidates=[S.Candidate(task=c.task, log_likelihood=c.log_likelihood) for c in route.candidates],
        ),
        scores=[S.Score(label=s.label, score=s.score, logit=s.logit) for s in r.scores],
        message=r.message,
        generation=r.generation,
    )


def _document_request_models(app: FastAPI) -> None:
    """Request bodies are parsed by hand (JSON or multipart); add their JSON schemas to the OpenAPI components."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        if "HTTPValidationError" not in json.dumps(schema.get("paths", {})):
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


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
