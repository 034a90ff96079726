"""The API's middleware (pure ASGI, around every route): the body size limit, HEAD, and the request metrics."""
from __future__ import annotations

import asyncio
import time

from fastapi.responses import JSONResponse

from ..errors import ApiError, echo, error_body
from ..metrics import ServiceMetrics
from .handlers import CLIENT_CLOSED

NOT_ANSWERED = 500  # what a request that ends without a response counts as: an error, unless its client left


class Guard:
    """Refuses bodies over the byte limit before reading them (Content-Length) or while streaming them (chunked);
    answers HEAD like GET without the body (FastAPI registers GET routes for GET only); records request count and
    latency by endpoint (route template), method and status."""

    def __init__(self, app, max_body_bytes: int, metrics: ServiceMetrics):
        self.app, self.limit, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, method = time.perf_counter(), [NOT_ANSWERED], scope.get("method", "")
        if method == "HEAD":  # a copy: the server still reads HEAD in its own scope (and so expects no body)
            scope = {**scope, "method": "GET"}

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
        except asyncio.CancelledError:  # the server gave up on the request: its client went away
            if status[0] == NOT_ANSWERED:
                status[0] = CLIENT_CLOSED
            raise
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
