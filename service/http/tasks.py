"""/v1/tasks: the store's live tasks and what this replica serves of them; delete and rollback need the admin token
(`Authorization: Bearer <KEEPCLIP_ADMIN_TOKEN>`) and only move the store's live pointers, which replicas follow."""
from __future__ import annotations

import logging
import re
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from prompts_store import ArtifactIntegrityError, InvalidTaskName, InvalidVersion, StoreError, StoreWriteFailed, TaskNotFound

from .. import schemas as S
from ..errors import ApiError
from ..settings import ServiceSettings
from .body import Body, Form, request_body, validate
from .common import task_name
from .deps import EngineDep, SettingsDep
from .openapi import ADMIN_ERRORS, body_doc

log = logging.getLogger(__name__)
router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="KEEPCLIP_ADMIN_TOKEN")
TaskName = Annotated[str, Depends(task_name)]  # the `{name}` of the path, valid (else 404)


def require_admin(settings: SettingsDep, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    token = settings.admin_token_value()
    if token is None:
        raise ApiError(403, "admin_disabled", "admin endpoints are disabled: start the service with KEEPCLIP_ADMIN_TOKEN set")
    if credentials is None:
        raise ApiError(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <admin token>'", headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
        raise ApiError(403, "forbidden", "wrong admin token")


def store_call(fn, *args):
    """A call to the task store, its refusals as HTTP errors (run it in a worker thread: the store may be remote)."""
    try:
        return fn(*args)
    except TaskNotFound as e:
        raise ApiError(404, "task_not_found", without_store(e)) from None
    except (InvalidTaskName, InvalidVersion) as e:
        raise ApiError(422, "validation_error", without_store(e)) from None
    except ArtifactIntegrityError as e:
        raise ApiError(409, "artifact_damaged", without_store(e)) from None
    except (StoreError, OSError) as e:  # the cause goes to the log: its paths and URLs are not the client's business
        log.warning("task store call %s failed: %s", getattr(fn, "__name__", fn), e)
        verb = "written (a full disk, a read-only store?); nothing changed" if isinstance(e, StoreWriteFailed) else "read"
        raise ApiError(503, "store_unavailable", f"the task store cannot be {verb} ({type(e).__name__}); see the service log") from None


def without_store(error: Exception) -> str:
    """The store's refusal without where the store is (a path or bucket URL of the server)."""
    return _STORE_PLACE.sub("", str(error))


_STORE_PLACE = re.compile(r" in store .*\Z", re.S)  # the store's messages end with "in store <url>"


@router.get("/v1/tasks", response_model=S.TasksResponse, responses={503: {"model": S.ErrorResponse}}, summary="Live tasks")
async def list_tasks(engine: EngineDep) -> S.TasksResponse:
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


@router.get("/v1/tasks/{name}", response_model=S.TaskDetail, responses={404: {"model": S.ErrorResponse}, 422: {"model": S.ErrorResponse}}, summary="One task, with its versions")
async def show_task(name: TaskName, engine: EngineDep) -> S.TaskDetail:
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


@router.delete("/v1/tasks/{name}", response_model=S.TaskChanged, responses=ADMIN_ERRORS, dependencies=[Depends(require_admin)], summary="Take a task out of service (admin)")
async def delete_task(name: TaskName, engine: EngineDep) -> S.TaskChanged:
    """Only the live pointer is cleared: versions stay in the store and rollback revives one."""
    live = next((v.version for v in await run_in_threadpool(store_call, engine.store.history, name) if v.live), None)
    await run_in_threadpool(store_call, engine.store.delete, name)
    generation = await run_in_threadpool(store_call, engine.store.generation)
    engine.request_sync()
    return S.TaskChanged(name=name, op="delete", version=live, generation=generation)


def rollback_json(data: dict, settings: ServiceSettings) -> Body[S.RollbackRequest]:
    return Body(validate(S.RollbackRequest, data))


def rollback_form(form: Form, settings: ServiceSettings) -> Body[S.RollbackRequest]:
    return Body(form.finish(S.RollbackRequest, {"version": form.integer("version")}))


RollbackBody = Annotated[Body[S.RollbackRequest], Depends(request_body(rollback_json, rollback_form))]


@router.post(
    "/v1/tasks/{name}/rollback", response_model=S.TaskChanged, responses=ADMIN_ERRORS, dependencies=[Depends(require_admin)],
    summary="Make an earlier version live again (admin)", openapi_extra=body_doc(S.RollbackRequest, version={"type": "integer"}),
)
async def rollback_task(name: TaskName, body: RollbackBody, engine: EngineDep) -> S.TaskChanged:
    version = body.model.version
    await run_in_threadpool(store_call, engine.store.rollback, name, version)
    generation = await run_in_threadpool(store_call, engine.store.generation)
    engine.request_sync()
    return S.TaskChanged(name=name, op="rollback", version=version, generation=generation)
