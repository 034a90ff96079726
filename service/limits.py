"""Slow-client limits of a replica's HTTP app (pure ASGI middleware; `service.app` puts it around the API).

Ray Serve's proxy hands a request to a replica as soon as its headers have arrived; the replica then pulls the body
from the proxy while the client sends it. So a request whose body never comes holds one of the replica's
`max_ongoing_requests` slots for as long as the client keeps its connection open: Serve has no body-read timeout
(`HTTPOptions.request_timeout_s` is end to end, for every request, and answers in plain text). Each replica therefore
bounds what slow senders can hold:

- the whole body must arrive within `body_timeout_s` of the request reaching the replica, else 408 JSON and the
  connection is closed;
- at most `max_body_reads` requests may be receiving their body at once; a request with a body beyond that is
  refused at once (503 JSON with Retry-After), which keeps the remaining slots for requests that are complete and
  for requests without a body (`/healthz`, the task listing).

The UI holds slots without any body: every open page keeps a heartbeat stream (server-sent events, one line every
15 s, which also keeps HAProxy's client timeout from ever firing), and any client may open one for any session id.
256 of them took all of a replica's slots, and the API answered nobody until they closed (a hostile-client trial).
`UiRequestCap` lets at most `ui_max_requests` UI requests be in flight on a replica at once and refuses more at
once (503 JSON with Retry-After): the UI can be crowded out, the API cannot.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable

from .errors import ApiError, error_body

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTimeout(ApiError):
    """The request body did not arrive in time (an ApiError, so the API's handlers render it as JSON)."""

    def __init__(self, timeout_s: float):
        message = f"the request body did not arrive within {timeout_s:g} s"
        super().__init__(408, "request_timeout", message, headers={"Connection": "close"})


class SlowClientGuard:
    """Body deadline and a cap on concurrent body reads, per replica (see the module docstring)."""

    def __init__(self, app, body_timeout_s: float, max_body_reads: int, retry_after_s: int = 1):
        self.app, self.timeout_s, self.max_reads, self.retry_after_s = app, body_timeout_s, max_body_reads, retry_after_s
        self.reading = 0  # requests on this replica whose body is still arriving

    async def __call__(self, scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope):
            return await self.app(scope, receive, send)
        if self.reading >= self.max_reads:
            message = f"{self.reading} requests are already sending their body to this replica; retry shortly"
            headers = {"Retry-After": str(self.retry_after_s), "Connection": "close"}
            return await send_json(send, 503, error_body("overloaded", message), headers)
        self.reading += 1
        body = _DeadlineReceive(receive, self.timeout_s, on_done=self._read_done)
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, body, send_tracking)
        except BodyTimeout as e:  # raised where no handler turned it into a response
            if started:
                raise
            await send_json(send, e.status_code, error_body(e.code, e.message), e.headers)
        finally:
            body.finish()

    def _read_done(self) -> None:
        self.reading -= 1


class UiRequestCap:
    """At most `max_requests` requests under `prefix` (the UI's mount path) in flight at once on this replica."""

    def __init__(self, app, max_requests: int, prefix: str = "/ui", retry_after_s: int = 1):
        self.app, self.max_requests, self.prefix, self.retry_after_s = app, max_requests, prefix.rstrip("/"), retry_after_s
        self.open = 0  # UI requests in flight on this replica

    async def __call__(self, scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] in ("http", "websocket") else ""
        if not (path == self.prefix or path.startswith(self.prefix + "/")):
            return await self.app(scope, receive, send)
        if self.open >= self.max_requests:
            if scope["type"] == "websocket":  # refused before the handshake: "try again later"
                return await send({"type": "websocket.close", "code": 1013})
            message = f"the UI already has {self.open} requests open on this replica; retry shortly"
            return await send_json(send, 503, error_body("overloaded", message), {"Retry-After": str(self.retry_after_s)})
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1


class _DeadlineReceive:
    """`receive` with a deadline on the body; after the last body chunk (or a disconnect) it passes through, so
    listening for a disconnect later is never cut short."""

    def __init__(self, receive: Receive, timeout_s: float, on_done: Callable[[], None]):
        self.receive, self.timeout_s, self.on_done = receive, timeout_s, on_done
        self.deadline = time.monotonic() + timeout_s
        self.done = False

    async def __call__(self) -> Message:
        if self.done:
            return await self.receive()
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(self.receive(), remaining)
        except TimeoutError:
            self.finish()
            raise BodyTimeout(self.timeout_s) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.finish()
        return message

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.on_done()


def has_body(scope) -> bool:
    """A request announces a body by a non-zero Content-Length or by Transfer-Encoding (chunked)."""
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length")
    return b"transfer-encoding" in headers or (length is not None and length.strip() not in (b"0", b""))


async def send_json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
