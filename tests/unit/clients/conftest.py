"""A stand-in for the service: a local HTTP server that answers each (method, path) as told, to drive the CLI's
error handling without Ray or a model."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class FakeService:
    url: str
    answers: dict = field(default_factory=dict)  # (method, path) -> (status, content type, body bytes)

    def answer(self, method: str, path: str, status: int, body, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers[(method, path)] = (status, content_type, data)


@pytest.fixture
def fake_service():
    service = FakeService(url="")

    class Handler(BaseHTTPRequestHandler):
        def _reply(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, content_type, body = service.answers.get(
                (self.command, self.path), (404, "application/json", b'{"error": {"code": "not_found", "message": "no route"}}')
            )
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _reply

        def log_message(self, *args):  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    service.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield service
    server.shutdown()
    server.server_close()
