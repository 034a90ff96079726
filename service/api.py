"""The HTTP API as a FastAPI app factory, usable in-process (tests, notebooks) or as the Serve ingress.

    app = create_app(ServiceSettings(...))                 # builds and starts its own Engine
    app = create_app(settings, engine=engine, submit=f)    # the Serve deployment passes its engine and @serve.batch

Every refusal is `{"error": {"code": ..., "message": ...}}` with a 4xx status; FastAPI's own validation errors and
Starlette's HTTP errors are reshaped the same way. A 500 only ever means a bug.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
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
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompts_store import (ArtifactIntegrityError, InvalidTaskName, InvalidVersion, StoreError, TaskNotFound,
                          validate_task_name)

from . import schemas as S
from .batching import MicroBatcher
from .engine import ClassifyJob, ClassifyResult, EmbedJob, EmbedResult, Engine, TaskNotLoaded, WeightNotSupported
from .errors import STATUS_CODES, ApiError, error_body
from .gallery import GalleryFull
from .images import decode_base64, decode_image
from .metrics import ServiceMetrics
from .settings import ServiceSettings

log = logging.getLogger(__name__)

Submit = Callable[[Any], Awaitable[Any]]
MAX_TEXT_CHARS = 2000
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
_STRS = {"type": "array", "items": {"type": "string"}}


# ----------------------------------------------------------------------------- body limit + metrics (pure ASGI)
class _Guard:
    """Refuses bodies over the byte limit before reading them (Content-Length) or while streaming them (chunked),
    and records request count and latency by endpoint (route template) and status."""

    def __init__(self, app, max_body_bytes: int, metrics: ServiceMetrics):
        self.app, self.limit, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                too_big = length.isdigit()
                body = error_body(
                    "payload_too_large" if too_big else "bad_request",
                    f"request body is {int(length)} bytes; the limit is {self.limit}" if too_big else "bad Content-Length",
                )
                response = JSONResponse(body, status_code=413 if too_big else 400)
                return await response(scope, receive, send_wrapper)
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.limit:
                        raise ApiError(413, "payload_too_large", f"request body exceeds the limit of {self.limit} bytes")
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            self.metrics.observe_request(_endpoint(scope), scope.get("method", ""), status[0], time.perf_counter() - start)


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
    submit: Submit | None = None,
    executor: ThreadPoolExecutor | None = None,
    metrics: ServiceMetrics | None = None,
) -> FastAPI:
    """The FastAPI app. Without `engine`, one is built from `settings` and started (and closed on shutdown);
    without `submit`, an in-process micro-batcher feeds `engine.run_batch`."""
    settings = settings or ServiceSettings()
    metrics = metrics or (engine.metrics if engine is not None and isinstance(engine.metrics, ServiceMetrics) else ServiceMetrics())
    own_engine = engine is None
    if engine is None:
        engine = Engine.from_settings(settings, metrics=metrics).start()
    own_executor = executor is None
    executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="keepclip-engine")
    batcher = None
    if submit is None:
        batcher = MicroBatcher(engine.run_batch, executor, settings.max_batch_size, settings.batch_wait_timeout_s)
        submit = batcher.submit

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
        description="A frozen CLIP that keeps learning tasks: per-image routing to residual prompts, hot swap.",
        lifespan=lifespan,
    )
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
        log.exception("internal error: %s", exc)
        return JSONResponse(error_body("internal_error", f"internal error ({type(exc).__name__})"), status_code=500)

    # ------------------------------------------------------------------ parsing
    async def parse(request: Request) -> tuple[dict[str, list[Any]] | dict[str, Any], dict[str, list[tuple[str, bytes]]], bool]:
        """-> (fields, uploaded files by field, is_json)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json" or ctype.endswith("+json"):
            raw = await request.body()
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, "invalid_json", f"the body is not valid JSON ({e})") from None
            if not isinstance(data, dict):
                raise ApiError(422, "validation_error", "the JSON body must be an object")
            return data, {}, True
        if ctype == "multipart/form-data":
            form = await request.form(max_files=settings.max_images_per_request, max_fields=1000, max_part_size=settings.max_body_bytes)
            fields: dict[str, list[Any]] = {}
            files: dict[str, list[tuple[str, bytes]]] = {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    files.setdefault(key, []).append((value.filename or "", await value.read()))
                else:
                    fields.setdefault(key, []).append(value)
            await form.close()
            return fields, files, False
        raise ApiError(415, "unsupported_media_type", "send application/json (base64 image) or multipart/form-data (file upload)")

    def one(fields: dict[str, list], name: str, default=None):
        values = fields.pop(name, None)
        if values is None:
            return default
        if len(values) != 1:
            raise ApiError(422, "validation_error", f"form field '{name}' given {len(values)} times")
        return values[0]

    def no_extra(fields: dict, files: dict, allowed_files: tuple[str, ...]) -> None:
        extra = sorted(set(fields) | (set(files) - set(allowed_files)))
        if extra:
            raise ApiError(422, "validation_error", f"unknown form field(s): {', '.join(extra)}")

    def single_file(files: dict, name: str = "file") -> bytes | None:
        got = files.get(name)
        if not got:
            return None
        if len(got) != 1:
            raise ApiError(422, "validation_error", f"send one '{name}' (got {len(got)})")
        return got[0][1]

    async def image_tensor(data: bytes, field: str = "image"):
        def load():
            return engine.preprocess(decode_image(data, settings.max_image_pixels, field))

        return await run_in_threadpool(load)

    def check_top_k(top_k: int) -> int:
        if top_k > settings.max_top_k:
            raise ApiError(422, "validation_error", f"top_k must be <= {settings.max_top_k}")
        return top_k

    def check_labels(labels: list[str] | None) -> tuple[str, ...] | None:
        if labels is None:
            return None
        cleaned = [label.strip() for label in labels]
        if not cleaned:
            raise ApiError(422, "validation_error", "labels must not be empty (omit the field for task classification)")
        if len(cleaned) > settings.max_labels:
            raise ApiError(422, "validation_error", f"too many labels: {len(cleaned)} > {settings.max_labels}")
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
        response_model=S.ClassifyResponse,
        responses=ERRORS,
        summary="Classify one image (by task, by free labels, or task-agnostic)",
        openapi_extra=_body_doc(
            S.ClassifyRequest,
            {"type": "object", "required": ["file"], "properties": {"file": _FILE, "task": {"type": "string"}, "labels": _STRS, "top_k": {"type": "integer", "default": 5}}},
        ),
    )
    async def classify(request: Request) -> S.ClassifyResponse:
        """Modes: `task` (that task's classes, its prompts at w = 1), `labels` (open vocabulary; the routed task's
        prompts still apply, weighted by its gate), or neither (task-agnostic: the routed task's classes). Without
        task or labels, an image that matches no learned task gets `task: null`, empty `scores` and a `message`."""
        fields, files, is_json = await parse(request)
        if is_json:
            req = _validate(S.ClassifyRequest, fields)
            data = decode_base64(req.image)
        else:
            data = single_file(files)
            if data is None:
                raise ApiError(422, "validation_error", "multipart body needs an image in the 'file' field")
            labels = fields.pop("labels", None)
            if labels is not None and len(labels) == 1:
                labels = [part for part in labels[0].split(",")]
            values = {"image": "-", "task": one(fields, "task"), "labels": labels, "top_k": one(fields, "top_k", 5)}
            no_extra(fields, files, ("file",))
            req = _validate(S.ClassifyRequest, {k: v for k, v in values.items() if v is not None})
        if req.task is not None and req.labels is not None:
            raise ApiError(422, "validation_error", "give either 'task' or 'labels', not both")
        labels = check_labels(req.labels)
        top_k = check_top_k(req.top_k)
        image = await image_tensor(data)
        result: ClassifyResult = raise_task_error(await submit(ClassifyJob(image, req.task, labels, top_k)))
        return _classify_response(result)

    @app.post(
        "/v1/embed",
        response_model=S.EmbedResponse,
        responses=ERRORS,
        summary="Embed an image or texts (frozen, or with a task's prompts)",
        openapi_extra=_body_doc(
            S.EmbedRequest,
            {"type": "object", "properties": {"file": _FILE, "text": _STRS, "task": {"type": "string"}, "weight": {"type": "number", "default": 1.0}}},
        ),
    )
    async def embed(request: Request) -> S.EmbedResponse:
        fields, files, is_json = await parse(request)
        if is_json:
            req = _validate(S.EmbedRequest, fields)
            data = decode_base64(req.image) if req.image is not None else None
        else:
            data = single_file(files)
            values = {"text": fields.pop("text", None), "task": one(fields, "task"), "weight": one(fields, "weight")}
            no_extra(fields, files, ("file",))
            req = _validate(S.EmbedRequest, {k: v for k, v in values.items() if v is not None})
        if (data is None) == (req.text is None):
            raise ApiError(422, "validation_error", "give exactly one of an image or text")
        if data is not None:
            image = await image_tensor(data)
            result: EmbedResult = raise_task_error(await submit(EmbedJob(image, req.task, req.weight)))
            return S.EmbedResponse(
                kind="image", embeddings=[result.embedding.tolist()], dim=int(result.embedding.shape[0]),
                task=result.task, version=result.version, weight=result.weight,
            )
        texts = [req.text] if isinstance(req.text, str) else list(req.text)
        if not texts or len(texts) > settings.max_labels or any(not t or len(t) > MAX_TEXT_CHARS for t in texts):
            raise ApiError(422, "validation_error", f"text: 1 to {settings.max_labels} non-empty strings of at most {MAX_TEXT_CHARS} characters")
        try:
            feats, version = await in_engine(engine.embed_texts, texts, req.task, req.weight)
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
            {"type": "object", "required": ["files"], "properties": {"files": {"type": "array", "items": _FILE}, "ids": _STRS}},
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
            uploads = files.get("files") or files.get("file") or []
            ids = fields.pop("ids", None) or [name for name, _ in uploads]
            no_extra(fields, files, ("files", "file"))
            if not uploads:
                raise ApiError(422, "validation_error", "multipart body needs images in 'files'")
            if len(ids) != len(uploads) or any(not i or len(i) > 256 for i in ids):
                raise ApiError(422, "validation_error", "give one non-empty id (at most 256 characters) per file")
            items = [(i, data) for i, (_, data) in zip(ids, uploads)]
        ids = [i for i, _ in items]
        if len(set(ids)) != len(ids):
            raise ApiError(422, "validation_error", "ids must be distinct")
        images = [await image_tensor(data, f"image '{i}'") for i, data in items]
        results = await asyncio.gather(*(submit(EmbedJob(im)) for im in images))  # they share dynamic batches
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
            {"type": "object", "properties": {"file": _FILE, "text": {"type": "string"}, "top_k": {"type": "integer", "default": 5}}},
        ),
    )
    async def search(request: Request) -> S.SearchResponse:
        fields, files, is_json = await parse(request)
        if is_json:
            req = _validate(S.SearchRequest, fields)
            data = decode_base64(req.image) if req.image is not None else None
        else:
            data = single_file(files)
            values = {"text": one(fields, "text"), "top_k": one(fields, "top_k", 5)}
            no_extra(fields, files, ("file",))
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
            raise ApiError(404, "task_not_found", f"no task '{name[:80]}' (not a valid task name)") from None

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
        if loaded is not None and live is not None and loaded.version == live.version:
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
        fields, _, is_json = await parse(request)
        if not is_json:
            fields = {k: v[0] if len(v) == 1 else v for k, v in fields.items()}
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
        metrics.observe_state(engine.state.generation, len(engine.state.tasks))
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
        raise ApiError(422, "validation_error", _summarise(e.errors())) from None


def _summarise(errors) -> str:
    parts = []
    for e in list(errors)[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


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

    _settings = ServiceSettings(ui=False)
    _app = create_app(_settings, engine=_NoEngine(), submit=lambda job: None)  # type: ignore[arg-type]
    json.dump(_app.openapi(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
