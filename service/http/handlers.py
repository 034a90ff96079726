"""The exception handlers: every refusal is `{"error": {"code": ..., "message": ...}}` with its 4xx status, FastAPI's
own validation errors and Starlette's HTTP errors (404, 405, ...) included; a 500 only ever means a bug, logged."""
from __future__ import annotations

import logging
import traceback

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import STATUS_CODES, ApiError, error_body, printable, summarise

log = logging.getLogger(__name__)
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away first (also Ray's proxy's)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, internal_error)


async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status_code, headers=exc.headers)


async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = STATUS_CODES.get(exc.status_code, "error")
    return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body("validation_error", summarise(exc.errors())), status_code=422)


async def client_gone(request: Request, _exc: ClientDisconnect) -> Response:
    """The client hung up before its body was read: nobody to answer, and no bug. Counted as nginx's 499 ("client
    closed request"), not logged as an internal error (any client could fill the log and the 5xx rate with them)."""
    log.debug("client closed the connection before sending its body: %s %s", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED)


async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
    # made printable first: a message carrying a lone surrogate must not break the logging of the bug too
    log.error("internal error: %s", printable("".join(traceback.format_exception(exc))))
    return JSONResponse(error_body("internal_error", f"internal error ({type(exc).__name__})"), status_code=500)
