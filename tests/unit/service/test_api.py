"""The FastAPI app in-process (no Ray): every endpoint, every kind of bad input -> 4xx JSON, admin auth, metrics."""
import base64
import json
import zlib

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from tests.unit.service.conftest import color_png, png, publish_colors


LIMITS = {"max_body_bytes": 256 * 1024, "max_image_pixels": 512 * 512, "max_labels": 8}
_JSON = {"content-type": "application/json"}


@pytest.fixture
def client(settings, store, task_maker):
    """A fresh app over a fresh store with the red and green tasks (for tests that change state)."""
    publish_colors(store, task_maker, "red", "green")
    with TestClient(create_app(settings.model_copy(update=LIMITS))) as c:
        yield c


def colors_client(tmp_path_factory, tiny_checkpoint, task_maker, **client_options) -> TestClient:
    """A TestClient of the app over a fresh store with the red and green tasks (enter it with `with`)."""
    from prompts_store import open_store
    from service.settings import ServiceSettings
    from tests.unit.service.conftest import TINY_JSON

    store = open_store(tmp_path_factory.mktemp("ro") / "store")
    publish_colors(store, task_maker, "red", "green")
    settings = ServiceSettings(model=TINY_JSON, pretrained=tiny_checkpoint, device="cpu", store=store.url, ui=False,
                               admin_token="s3cret", poll_interval_s=0.05, **LIMITS)
    return TestClient(create_app(settings), **client_options)


@pytest.fixture(scope="module")
def ro_client(tmp_path_factory, tiny_checkpoint, task_maker):
    """One app for the module's read-only tests (bad input must not change anything anyway)."""
    with colors_client(tmp_path_factory, tiny_checkpoint, task_maker) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error(response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]["message"]


def solid_png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def png_header_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (CRC fixed), with 4x4 worth of pixel data."""
    data = bytearray(png(size=4))
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


# ----------------------------------------------------------------------------- happy paths
def test_classify_modes_over_multipart_and_json(client):
    auto = client.post("/v1/classify", files={"file": ("r.png", color_png("red"), "image/png")}).json()
    assert auto["mode"] == "auto" and auto["task"] == "red" and auto["version"] == 1
    assert auto["routed"]["task"] == "red" and 0.5 < auto["gate"] <= 1 and len(auto["scores"]) == 2
    assert auto["routed"]["candidates"][0]["task"] == "red"
    by_task = client.post("/v1/classify", json={"image": b64(color_png("red")), "task": "green", "top_k": 1}).json()
    assert by_task["mode"] == "task" and by_task["task"] == "green" and by_task["gate"] == 1.0 and len(by_task["scores"]) == 1
    labels = client.post("/v1/classify", files={"file": ("g.png", color_png("green"), "image/png")}, data={"labels": "cat, dog ,bird"}).json()
    assert labels["mode"] == "labels" and labels["task"] == "green"
    assert sorted(s["label"] for s in labels["scores"]) == ["bird", "cat", "dog"]
    repeated = client.post("/v1/classify", files={"file": ("g.png", color_png("green"), "image/png")}, data={"labels": ["a, b", "c"]}).json()
    assert sorted(s["label"] for s in repeated["scores"]) == ["a, b", "c"]
    nothing = client.post("/v1/classify", json={"image": b64(color_png("blue"))}).json()
    assert nothing["task"] is None and nothing["gate"] == 0.0 and "no learned task" in nothing["message"]
    assert len(nothing["scores"]) >= 1 and "vocabulary imagenet-1k" in nothing["message"]  # the frozen answer over it
    frozen_labels = client.post("/v1/classify", json={"image": b64(color_png("blue")), "labels": ["sky", "sea"]}).json()
    assert frozen_labels["task"] is None and len(frozen_labels["scores"]) == 2
    jpeg = client.post("/v1/classify", json={"image": "data:image/jpeg;base64," + b64(png(fmt="JPEG"))})
    assert jpeg.status_code == 200


def test_embed_gallery_search(client):
    image = client.post("/v1/embed", files={"file": ("r.png", color_png("red"), "image/png")}).json()
    assert image["kind"] == "image" and image["dim"] == 32 and len(image["embeddings"]) == 1 and image["task"] is None
    prompted = client.post("/v1/embed", json={"image": b64(color_png("red")), "task": "red", "weight": 0.5}).json()
    assert prompted["task"] == "red" and prompted["version"] == 1 and prompted["weight"] == 0.5
    assert prompted["embeddings"] != image["embeddings"]
    texts = client.post("/v1/embed", json={"text": ["a red thing", "a green thing"]}).json()
    assert texts["kind"] == "text" and len(texts["embeddings"]) == 2
    added = client.post("/v1/gallery", json={"items": [{"id": "r1", "image": b64(color_png("red"))}, {"id": "g1", "image": b64(color_png("green"))}]})
    assert added.json() == {"added": ["r1", "g1"], "size": 2}
    more = client.post("/v1/gallery", files=[("files", ("b.png", color_png("blue"), "image/png"))], data={"ids": ["b1"]}).json()
    assert more["size"] == 3
    by_image = client.post("/v1/search", files={"file": ("q.png", color_png("green", seed=99), "image/png")}, data={"top_k": "2"}).json()
    assert by_image["query"] == "image" and by_image["results"][0]["id"] == "g1" and len(by_image["results"]) == 2
    by_text = client.post("/v1/search", json={"text": "a photo of something red", "top_k": 3}).json()
    assert by_text["query"] == "text" and {h["id"] for h in by_text["results"]} == {"r1", "g1", "b1"}
    again = client.post("/v1/gallery", json={"items": [{"id": "r1", "image": b64(color_png("blue"))}]}).json()
    assert again["size"] == 3  # an id given again is replaced


def test_tasks_listing_and_detail(ro_client):
    listing = ro_client.get("/v1/tasks").json()
    assert listing["generation"] == listing["served_generation"] == 2
    assert [(t["name"], t["version"], t["loaded_version"], t["num_classes"]) for t in listing["tasks"]] == [("green", 1, 1, 2), ("red", 1, 1, 2)]
    detail = ro_client.get("/v1/tasks/red").json()
    assert detail["class_names"] == ["light red", "dark red"] and detail["versions"][0]["live"] is True
    assert error(ro_client.get("/v1/tasks/nope"), 404, "task_not_found") == "no task 'nope'"  # not where the store is
    error(ro_client.get("/v1/tasks/..%2Fetc"), 404)
    assert len(error(ro_client.get("/v1/tasks/" + "x" * 60_000), 404, "task_not_found")) < 300  # the name, shortened


def test_admin_endpoints_need_the_token(client, settings):
    error(client.delete("/v1/tasks/red"), 401, "unauthorized")
    error(client.delete("/v1/tasks/red", headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
    error(client.post("/v1/tasks/red/rollback", json={"version": 1}), 401)
    ok = {"Authorization": "Bearer s3cret"}
    assert settings.store not in error(client.delete("/v1/tasks/nope", headers=ok), 404, "task_not_found")
    gone = client.delete("/v1/tasks/red", headers=ok).json()
    assert gone == {"name": "red", "op": "delete", "version": 1, "generation": 3}
    error(client.post("/v1/tasks/red/rollback", headers=ok, json={"version": 7}), 404, "task_not_found")
    error(client.post("/v1/tasks/red/rollback", headers=ok, json={"version": "one"}), 422, "validation_error")
    error(client.post("/v1/tasks/red/rollback", headers=ok, json={"version": True}), 422, "validation_error")  # not 1
    back = client.post("/v1/tasks/red/rollback", headers=ok, json={"version": 1}).json()
    assert back["op"] == "rollback" and back["generation"] == 4


def test_admin_endpoints_are_refused_when_no_token_is_configured(settings, store, task_maker):
    publish_colors(store, task_maker, "red")
    with TestClient(create_app(settings.model_copy(update={"admin_token": None}))) as c:
        msg = error(c.delete("/v1/tasks/red", headers={"Authorization": "Bearer anything"}), 403, "admin_disabled")
        assert "KEEPCLIP_ADMIN_TOKEN" in msg
        assert c.get("/v1/tasks").json()["tasks"][0]["name"] == "red"


def test_health_metrics_docs(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["tasks"] == 2 and health["polling"] and health["backbone"]["name"] == "keepclip-tiny-a"
    client.post("/v1/classify", files={"file": ("r.png", color_png("red"), "image/png")})
    client.post("/v1/classify", json={"image": b64(color_png("blue"))})
    client.post("/v1/classify", json={"image": "???"})
    text = client.get("/metrics").text
    for line in (
        'keepclip_requests_total{endpoint="/v1/classify",method="POST",status="200"} 2.0',
        'keepclip_requests_total{endpoint="/v1/classify",method="POST",status="422"} 1.0',
        'keepclip_routed_total{task="red"} 1.0',
        'keepclip_routed_total{task="none"} 1.0',
        "keepclip_store_generation 2.0",
        "keepclip_loaded_tasks 2.0",
        "keepclip_batch_wait_seconds 0.002",  # the settings' BATCH_WAIT_TIMEOUT_S (auto would show the fitted one)
    ):
        assert line in text, line
    assert "keepclip_batch_size_bucket" in text and "keepclip_gate_weight_bucket" in text
    assert 'keepclip_request_latency_seconds_count{endpoint="/v1/classify",method="POST",status="200"} 2.0' in text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()  # Swagger UI from the app itself: works offline
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        assert asset in docs.text and client.get(asset).status_code == 200 and len(client.get(asset).content) > 10_000
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "/docs-assets/redoc.standalone.js" in redoc.text and "fonts.googleapis" not in redoc.text
    schema = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/embed", "/v1/gallery", "/v1/search", "/v1/tasks", "/v1/tasks/{name}", "/v1/tasks/{name}/rollback", "/healthz", "/metrics"} <= set(schema["paths"])


# ----------------------------------------------------------------------------- bad input
BAD_IMAGES = {
    "not an image": (b"%PDF-1.4 definitely not an image", 422, "invalid_image"),
    "truncated": (png(size=32)[:60], 422, "invalid_image"),
    "empty": (b"", 422, "empty_image"),
    "zero size": (png_header_size(0, 4), 422, None),
    "over the pixel limit": (solid_png(600, 600), 413, "image_too_large"),
    "decompression bomb header": (png_header_size(100_000, 100_000), 413, "image_too_large"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_get_4xx_over_multipart_and_json(ro_client, case):
    data, status, code = BAD_IMAGES[case]
    error(ro_client.post("/v1/classify", files={"file": ("x.png", data, "image/png")}), status, code)
    if data:
        error(ro_client.post("/v1/classify", json={"image": b64(data)}), status, code)
    assert ro_client.post("/v1/classify", files={"file": ("r.png", color_png("red"), "image/png")}).status_code == 200


BAD_BODIES = {
    "malformed json": (dict(content=b'{"image": ', headers={"content-type": "application/json"}), 400, "invalid_json"),
    "json array": (dict(json=[1, 2]), 422, "validation_error"),
    "invalid base64": (dict(json={"image": "not base64 !!"}), 422, "invalid_base64"),
    "missing image": (dict(json={"labels": ["a"]}), 422, "validation_error"),
    "top_k wrong type": (dict(json={"image": "AAAA", "top_k": "many"}), 422, "validation_error"),
    "top_k too large": (dict(json={"image": b64(png()), "top_k": 1000}), 422, "validation_error"),
    "labels not a list": (dict(json={"image": b64(png()), "labels": "cat"}), 422, "validation_error"),
    "labels wrong items": (dict(json={"image": b64(png()), "labels": [1, 2]}), 422, "validation_error"),
    "empty labels": (dict(json={"image": b64(png()), "labels": []}), 422, "validation_error"),
    "blank label": (dict(json={"image": b64(png()), "labels": ["cat", " "]}), 422, "validation_error"),
    "too many labels": (dict(json={"image": b64(png()), "labels": [f"l{i}" for i in range(9)]}), 422, "validation_error"),
    "task and labels": (dict(json={"image": b64(png()), "task": "red", "labels": ["a"]}), 422, "validation_error"),
    "task wrong type": (dict(json={"image": b64(png()), "task": 5}), 422, "validation_error"),
    "unknown field": (dict(json={"image": b64(png()), "colour": "red"}), 422, "validation_error"),
    "unknown task": (dict(json={"image": b64(png()), "task": "nope"}), 404, "task_not_found"),
    "wrong content type": (dict(content=b"abc", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    "multipart without file": (dict(data={"task": "red"}, files={"other": ("x", b"1")}), 422, "validation_error"),
    "multipart two tasks": (dict(data={"task": ["red", "green"]}, files={"file": ("x.png", png())}), 422, "validation_error"),
    "broken multipart": (dict(content=b"--xx\r\nnope", headers={"content-type": "multipart/form-data; boundary=xx"}), 422, None),
    # what an outside hostile-client trial broke (500s, a 100,000-character echo, loose types): refused, as JSON
    "json nested 1000 deep": (dict(content=b'{"image": ' + b"[" * 1000 + b"]" * 1000 + b"}", headers=_JSON), 400, "invalid_json"),
    "lone surrogate label": (dict(content=b'{"image": "%s", "labels": ["\\ud800"]}' % b64(png()).encode(), headers=_JSON), 400, "invalid_json"),
    "lone surrogate task": (dict(content=b'{"image": "%s", "task": "\\ud800"}' % b64(png()).encode(), headers=_JSON), 400, "invalid_json"),
    "NaN literal": (dict(content=b'{"image": "%s", "top_k": NaN}' % b64(png()).encode(), headers=_JSON), 400, "invalid_json"),
    "top_k true": (dict(json={"image": b64(png()), "top_k": True}), 422, "validation_error"),
    "task of 100,000 characters": (dict(json={"image": b64(png()), "task": "x" * 100_000}), 404, "task_not_found"),
    "image as a text field": (dict(files={"image": (None, "cat.png")}), 422, "validation_error"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_requests_get_4xx_json_and_the_service_keeps_serving(ro_client, case):
    kwargs, status, code = BAD_BODIES[case]
    error(ro_client.post("/v1/classify", **kwargs), status, code)
    assert ro_client.post("/v1/classify", json={"image": b64(color_png("green"))}).json()["task"] == "green"


def test_bodies_over_the_byte_limit_are_refused_before_reading(ro_client):
    big = b"x" * (300 * 1024)
    assert "limit" in error(ro_client.post("/v1/classify", content=big, headers={"content-type": "application/json"}), 413, "payload_too_large")

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(300):
            yield b"y" * 1024

    error(ro_client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"}), 413, "payload_too_large")
    error(ro_client.post("/v1/gallery", files=[("files", ("a.png", big, "image/png"))], data={"ids": ["a"]}), 413)


def test_other_endpoints_refuse_bad_input(ro_client):
    error(ro_client.post("/v1/embed", json={}), 422, "validation_error")
    error(ro_client.post("/v1/embed", json={"text": "a", "image": b64(png())}), 422)
    error(ro_client.post("/v1/embed", json={"text": "a", "task": "nope"}), 404, "task_not_found")
    error(ro_client.post("/v1/embed", json={"text": "a", "weight": 2}), 422)
    error(ro_client.post("/v1/embed", json={"text": []}), 422)
    error(ro_client.post("/v1/gallery", json={"items": []}), 422)
    error(ro_client.post("/v1/gallery", json={"items": [{"id": "a", "image": b64(png())}, {"id": "a", "image": b64(png())}]}), 422)
    error(ro_client.post("/v1/gallery", json={"items": [{"id": "a", "image": b64(b"nope")}]}), 422, "invalid_image")
    error(ro_client.post("/v1/gallery", files=[("files", ("a.png", png()))], data={"ids": ["a", "b"]}), 422)
    error(ro_client.post("/v1/search", json={"top_k": 3}), 422)
    error(ro_client.post("/v1/search", json={"text": "x", "top_k": 0}), 422)
    error(ro_client.post("/v1/search", json={"text": ""}), 422)
    error(ro_client.get("/v1/nothing-here"), 404, "not_found")
    error(ro_client.put("/v1/classify"), 405, "method_not_allowed")
    assert ro_client.get("/healthz").status_code == 200


def test_committed_openapi_schema_is_current(ro_client):
    """service/openapi.json is the published contract; regenerate with `python -m service.api > service/openapi.json`."""
    from pathlib import Path

    committed = json.loads((Path(__file__).resolve().parents[3] / "service" / "openapi.json").read_text())
    assert ro_client.get("/openapi.json").json() == committed
