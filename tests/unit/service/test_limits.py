"""SlowClientGuard (service/limits.py), driven over raw ASGI with bodies that stall or dribble: a body deadline that
answers 408 JSON, a cap on concurrent body reads that answers 503 at once, nothing changed for complete requests.
The settings that feed it, and the Serve options the app builder derives from them."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError
from fastapi import FastAPI, Request

from service.app import PrimaryFirstRouter, build_app, resolve_replicas
from service.limits import SlowClientGuard, has_body
from service.settings import ServiceSettings

from .conftest import color_png

pytestmark = pytest.mark.timeout(60)  # a guard that lets a stalled body through would hang, not fail


def guarded(timeout_s: float = 0.3, max_reads: int = 4) -> SlowClientGuard:
    """A small FastAPI app (its default handlers, not keepclip's) behind the guard."""
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    @app.get("/healthz")
    async def health() -> dict:
        return {"status": "ok"}

    return SlowClientGuard(app, body_timeout_s=timeout_s, max_body_reads=max_reads)


def scope(method: str = "POST", path: str = "/echo", headers: dict[str, str] | None = None) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }


def feeder(chunks: list[bytes], then: str = "end", every_s: float = 0.0):
    """An ASGI receive: `chunks` (every `every_s`), then the body's end, a stall ("stall") or endless dribble."""
    sent = 0

    async def receive():
        nonlocal sent
        if every_s:
            await asyncio.sleep(every_s)
        if sent < len(chunks):
            sent += 1
            return {"type": "http.request", "body": chunks[sent - 1], "more_body": sent < len(chunks) or then != "end"}
        if then == "dribble":
            return {"type": "http.request", "body": b"x", "more_body": True}
        await asyncio.Event().wait()  # stalls until cancelled

    return receive


async def call(app, receive, **kwargs) -> tuple[int, dict[str, str], bytes]:
    messages = []

    async def send(message):
        messages.append(message)

    await app(scope(**kwargs), receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def body_headers(length: int) -> dict[str, str]:
    return {"content-type": "application/octet-stream", "content-length": str(length)}


def test_a_body_that_arrives_in_time_passes_through():
    guard = guarded()
    status, _, body = asyncio.run(call(guard, feeder([b"abc", b"defg"]), headers=body_headers(7)))
    assert (status, json.loads(body)) == (200, {"bytes": 7}) and guard.reading == 0


@pytest.mark.parametrize("then", ["stall", "dribble"])
def test_a_stalled_or_dribbled_body_gets_408_json_at_the_deadline(then):
    guard = guarded(timeout_s=0.3)
    start = time.monotonic()
    status, headers, body = asyncio.run(call(guard, feeder([b"0123456789"], then, every_s=0.01), headers=body_headers(100_000)))
    elapsed = time.monotonic() - start
    assert status == 408 and "did not arrive within 0.3 s" in json.loads(body)["detail"]  # FastAPI's own handler
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert 0.3 <= elapsed < 2.0 and guard.reading == 0


def test_beyond_max_body_reads_a_body_is_refused_at_once_and_bodyless_requests_still_pass():
    guard = guarded(timeout_s=0.5, max_reads=2)

    async def scenario():
        stalled = [asyncio.create_task(call(guard, feeder([b"x"], "stall"), headers=body_headers(10))) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert guard.reading == 2
        start = time.monotonic()
        refused = await call(guard, feeder([b"abc"]), headers=body_headers(3))
        refused_in = time.monotonic() - start
        health = await call(guard, feeder([]), method="GET", path="/healthz")
        timed_out = await asyncio.gather(*stalled)
        after = await call(guard, feeder([b"abc"]), headers=body_headers(3))
        return refused, refused_in, health, timed_out, after

    refused, refused_in, health, timed_out, after = asyncio.run(scenario())
    status, headers, body = refused
    assert status == 503 and refused_in < 0.1 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["code"] == "overloaded"
    assert health[0] == 200 and [t[0] for t in timed_out] == [408, 408]
    assert after[0] == 200 and guard.reading == 0  # the slots came back


def test_after_the_body_receive_passes_through_past_the_deadline():
    """Listening for a disconnect after the body (streaming responses do) is not cut by the body deadline."""
    messages = iter([{"type": "http.request", "body": b"ab", "more_body": False}, {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    async def app(_scope, receive, send):
        await receive()
        await asyncio.sleep(0.2)  # past the deadline
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = SlowClientGuard(app, body_timeout_s=0.1, max_body_reads=2)
    assert asyncio.run(call(guard, receive, headers=body_headers(2)))[0] == 200


def test_a_timeout_no_handler_catches_is_answered_by_the_guard():
    async def raw_app(_scope, receive, send):  # a bare ASGI app: nothing turns the exception into a response
        while (await receive()).get("more_body"):
            pass

    guard = SlowClientGuard(raw_app, body_timeout_s=0.1, max_body_reads=2)
    status, _, body = asyncio.run(call(guard, feeder([b"x"], "stall"), headers=body_headers(10)))
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"


@pytest.mark.parametrize("headers, expected", [
    ({}, False), ({"content-length": "0"}, False), ({"content-length": "12"}, True),
    ({"transfer-encoding": "chunked"}, True), ({"content-length": "nope"}, True),
])
def test_which_requests_have_a_body(headers, expected):
    assert has_body(scope(headers=headers)) is expected


def test_the_api_behind_the_guard_answers_a_stalled_upload_with_408_json(settings):
    """The wiring of service/app.py: the API's own app with the guard added outermost; the API's error handler
    renders the timeout, and the API's metrics count it."""
    from service.api import create_app

    app = create_app(settings.model_copy(update={"body_timeout_s": 0.3}))
    app.add_middleware(SlowClientGuard, body_timeout_s=0.3, max_body_reads=4)
    try:
        boundary = "b0undary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + color_png("red")[:20]
        headers = {"content-type": f"multipart/form-data; boundary={boundary}", "content-length": "5000"}
        status, response_headers, body = asyncio.run(call(app, feeder([head], "stall"), path="/v1/classify", headers=headers))
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert response_headers["connection"] == "close"
        exposed = generate_latest(app.state.metrics.registry).decode()
        assert 'keepclip_requests_total{endpoint="/v1/classify",method="POST",status="408"} 1.0' in exposed
    finally:
        app.state.engine.close()


# ----------------------------------------------------------------------------- settings and Serve options
def test_defaults_leave_slots_for_complete_requests():
    s = ServiceSettings()
    assert (s.num_replicas, s.replica_routing, s.body_timeout_s) == (0, "primary", 10.0)
    assert s.max_body_reads < s.max_ongoing_requests and s.max_ongoing_requests - s.max_body_reads >= 64
    with pytest.raises(ValidationError, match="max_body_reads"):
        ServiceSettings(max_ongoing_requests=64, max_body_reads=64)
    with pytest.raises(ValidationError):
        ServiceSettings(body_timeout_s=0)


def test_num_replicas_auto_resolves_from_the_clusters_cpus_and_gpus(monkeypatch, tmp_path):
    import ray

    monkeypatch.setenv("KEEPCLIP_NUM_REPLICAS", "auto")
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)  # Serve's proxy: keepclip's own request routers
    settings = ServiceSettings(store=str(tmp_path), ui=False)
    assert settings.num_replicas == 0
    cluster: dict[str, float] = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(cluster))  # the cluster this test describes, not the session's
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(cluster))
    assert resolve_replicas(settings) == 1  # no Ray yet
    for resources, gpus, expected in [({"CPU": 2.0}, 0, 2), ({"CPU": 1.5}, 0, 1), ({"CPU": 8.0, "GPU": 1.0}, 1, 1),
                                      ({"CPU": 8.0, "GPU": 2.0}, 1, 2)]:
        cluster.clear()
        cluster.update(resources)
        assert resolve_replicas(settings.model_copy(update={"replica_gpus": gpus})) == expected, resources
    assert resolve_replicas(settings.model_copy(update={"num_replicas": 3})) == 3  # explicit wins

    deployment = build_app(settings)._bound_deployment  # CPU 8, GPU 2 above
    assert deployment.num_replicas == 2
    assert deployment._deployment_config.request_router_config.request_router_class.endswith("PrimaryFirstRouter")
    balanced = build_app(settings.model_copy(update={"num_replicas": 3, "replica_routing": "balanced"}))._bound_deployment
    assert balanced.num_replicas == 3
    assert "PowerOfTwoChoices" in balanced._deployment_config.request_router_config.request_router_class


def test_primary_first_router_keeps_one_primary_until_it_is_gone():
    """The selection itself (the e2e replica-loss test runs it inside Serve's proxy): the primary ranks first, the
    standbys after it; a new primary only when the old one has left, and then it stays."""
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentID
    from ray.serve.request_router import ReplicaID

    deployment = DeploymentID(name="KeepclipDeployment", app_name="keepclip")
    a, b, c = (SimpleNamespace(replica_id=ReplicaID(unique_id=u, deployment_id=deployment)) for u in ("a1", "b2", "c3"))
    router = object.__new__(PrimaryFirstRouter)  # the selection needs none of RequestRouter's machinery
    router.initialize_state()

    def ranks(*replicas):
        return [[r.replica_id.unique_id for r in rank] for rank in asyncio.run(router.choose_replicas(list(replicas)))]

    assert ranks() == []
    assert ranks(b, a) == [["a1"], ["b2"]]
    assert ranks(c, b, a) == [["a1"], ["c3", "b2"]]
    assert ranks(c, b) == [["b2"], ["c3"]]  # a died: b takes over at once
    assert ranks(a, c, b) == [["b2"], ["a1", "c3"]]  # a replica with a smaller id comes back: b stays primary


# ----------------------------------------------------------------------------- UI streams
def test_ui_requests_beyond_the_cap_are_refused_at_once_and_the_api_still_answers():
    """Never-ending UI streams (the heartbeat of every open page) hold at most `max_requests` of a replica's slots."""
    from service.limits import UiRequestCap

    app = FastAPI()

    @app.get("/ui/heartbeat")
    async def heartbeat() -> dict:
        await asyncio.Event().wait()  # a stream that never ends

    @app.get("/healthz")
    async def health() -> dict:
        return {"status": "ok"}

    cap = UiRequestCap(app, max_requests=3)

    async def scenario():
        streams = [asyncio.create_task(call(cap, feeder([]), method="GET", path="/ui/heartbeat")) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert cap.open == 3
        refused = await asyncio.wait_for(call(cap, feeder([]), method="GET", path="/ui/heartbeat"), 1)
        api = await asyncio.wait_for(call(cap, feeder([]), method="GET", path="/healthz"), 1)
        not_ui = await asyncio.wait_for(call(cap, feeder([]), method="GET", path="/uix"), 1)  # another path, not the UI's
        closed = []

        async def record(message):
            closed.append(message)

        websocket = {**scope(method="GET", path="/ui/queue/join"), "type": "websocket"}
        await asyncio.wait_for(cap(websocket, feeder([]), record), 1)
        assert closed == [{"type": "websocket.close", "code": 1013}]  # a websocket is held to the cap too
        streams[0].cancel()
        await asyncio.sleep(0.05)
        assert cap.open == 2  # a closed stream gives its slot back
        for s in streams[1:]:
            s.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        return refused, api, not_ui

    (status, headers, body), (api_status, _, _), (other_status, _, _) = asyncio.run(scenario())
    assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["error"]["code"] == "overloaded"
    assert api_status == 200 and other_status == 404
    with pytest.raises(ValidationError, match="ui_max_requests"):
        ServiceSettings(max_ongoing_requests=224)  # 192 body reads + 32 UI requests leave no slot
    assert ServiceSettings(max_ongoing_requests=224, ui=False).ui is False  # without the UI, its cap takes none


def test_a_client_that_hangs_up_before_its_body_is_counted_499_not_as_an_internal_error(settings, caplog):
    """Starlette raises ClientDisconnect where the body was to be read; it used to be logged as a bug (a traceback
    per request) and counted as a 500, so any client could fill the log and the 5xx rate."""
    from service.api import create_app

    app = create_app(settings)
    sent = []

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b'{"image": ', "more_body": True}
        return {"type": "http.disconnect"}

    try:
        headers = {"content-type": "application/json", "content-length": "5000"}
        with caplog.at_level("DEBUG", logger="service"):
            status, _, _ = asyncio.run(call(app, receive, path="/v1/classify", headers=headers))
        assert status == 499
        assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
        exposed = generate_latest(app.state.metrics.registry).decode()
        assert 'keepclip_requests_total{endpoint="/v1/classify",method="POST",status="499"} 1.0' in exposed
        assert 'status="500"' not in exposed
    finally:
        app.state.engine.close()
