"""What an outside trial found against the app served by a real HTTP server (uvicorn on a local port, the UI mounted):
the UI must not hand out server files, must decode uploads as the API does, and HEAD must leave the connection usable."""
from __future__ import annotations

import http.client
import json

import pytest

from prompts_store import open_store
from service.api import create_app
from service.settings import ServiceSettings
from testkit.net import served_in_thread

from .conftest import TINY_JSON, png


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    """The app with its UI on 127.0.0.1 (40,000-pixel limit) -> (host, port)."""
    store = open_store(tmp_path_factory.mktemp("edges") / "store")
    settings = ServiceSettings(model=TINY_JSON, pretrained=tiny_checkpoint, device="cpu", store=store.url, ui=True,
                               max_image_pixels=40_000)
    with served_in_thread(create_app(settings)) as port:
        yield "127.0.0.1", port


def request(served, method, path, body=None, headers=None, connection=None):
    conn = connection or http.client.HTTPConnection(*served, timeout=60)
    conn.request(method, path, body, headers or {})
    response = conn.getresponse()
    return response.status, response.read()


def upload(served, data: bytes, name: str) -> str:
    """POST /ui/gradio_api/upload as the browser does -> the server path of the uploaded copy."""
    boundary = "keepclipTestBoundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, answer = request(served, "POST", "/ui/gradio_api/upload", body,
                             {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, answer
    return json.loads(answer)[0]


def classify_in_ui(served, path: str) -> tuple[str, str]:
    """The UI's Classify button over Gradio's API, the image named by its server path -> (event, data)."""
    file_data = {"path": path, "meta": {"_type": "gradio.FileData"}}
    status, answer = request(served, "POST", "/ui/gradio_api/call/classify", json.dumps({"data": [file_data]}),
                             {"Content-Type": "application/json"})
    assert status == 200, answer
    status, stream = request(served, "GET", f"/ui/gradio_api/call/classify/{json.loads(answer)['event_id']}")
    assert status == 200
    events = [line.split(": ", 1)[1] for line in stream.decode().splitlines() if line.startswith("event: ")]
    data = [line.split(": ", 1)[1] for line in stream.decode().splitlines() if line.startswith("data: ")]
    return events[-1], data[-1]


def test_the_ui_classifies_an_uploaded_image(served):
    event, data = classify_in_ui(served, upload(served, png(), "red.png"))
    assert event == "complete", data
    assert "frozen CLIP" in data  # an empty store: no task matches


def test_the_ui_will_not_read_a_server_file_by_its_path(served, tmp_path):
    secret = tmp_path / "not-uploaded.png"
    secret.write_bytes(png())  # a valid image: read, it would be classified
    event, data = classify_in_ui(served, str(secret))
    assert event == "error" and "not uploaded" in data
    assert "/gradio/" not in data  # no copy was made in Gradio's cache (from where GET /ui/gradio_api/file= serves it)


def test_the_ui_decodes_uploads_as_the_api_does(served):
    event, data = classify_in_ui(served, upload(served, png(size=300), "big.png"))  # 90,000 > 40,000 pixels
    assert event == "error" and "the limit is 40000" in data
    ico = png(fmt="ICO")
    event, data = classify_in_ui(served, upload(served, ico, "icon.ico"))
    assert event == "error" and "not an image in a format this service reads" in data


def test_head_answers_without_a_body_and_keeps_the_connection(served):
    conn = http.client.HTTPConnection(*served, timeout=30)
    for _ in range(5):
        conn.request("HEAD", "/healthz")
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b""
        assert int(response.headers["content-length"]) > 0  # what a GET would carry
        assert request(served, "GET", "/healthz", connection=conn)[0] == 200  # the same connection, still in step
