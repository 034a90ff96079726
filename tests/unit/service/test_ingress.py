"""The ingress choice (service/ingress.py): the environment a cluster keepclip starts gets, and how build_app routes
under HAProxy (whose balance algorithm replaces Serve's request routers)."""
from __future__ import annotations

import os
import socket

import pytest

from service import ingress
from service.app import build_app
from service.settings import ServiceSettings


@pytest.fixture
def clean_env(monkeypatch):
    saved = dict(os.environ)  # prepare_local_cluster writes os.environ: none of it may outlive the test
    for key in (ingress.ENABLE, ingress.BALANCE, ingress.CLIENT_TIMEOUT, ingress.DRAINING_PERIOD, *ingress.SIDE_PORTS):
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_haproxy_is_the_default_and_primary_routing_becomes_balance_first(clean_env):
    clean_env.setattr(ingress, "haproxy_installed", lambda: True)
    assert ServiceSettings().ingress == "haproxy"
    ingress.prepare_local_cluster(ServiceSettings())
    assert (os.environ[ingress.ENABLE], os.environ[ingress.BALANCE]) == ("1", "first") and ingress.haproxy_on()
    assert os.environ[ingress.CLIENT_TIMEOUT] == "15"  # body_timeout_s 10 + 5: a stalled sender is closed then
    assert os.environ[ingress.DRAINING_PERIOD] == "3"  # one machine: HAProxy drops a stopping replica at once
    assert ingress.http_options(ServiceSettings(), port=9) == {"host": "127.0.0.1", "port": 9, "keep_alive_timeout_s": 15}


def test_balanced_routing_is_leastconn_and_proxy_sets_nothing(clean_env):
    clean_env.setattr(ingress, "haproxy_installed", lambda: True)
    assert ingress.cluster_env(ServiceSettings(replica_routing="balanced"))[ingress.BALANCE] == "leastconn"
    ingress.prepare_local_cluster(ServiceSettings(ingress="proxy"))
    assert ingress.ENABLE not in os.environ and not ingress.haproxy_on()


def test_without_a_binary_the_proxy_is_used(clean_env, caplog):
    clean_env.setattr(ingress, "haproxy_installed", lambda: False)
    assert ingress.cluster_env(ServiceSettings()) == {}
    assert "no HAProxy binary" in caplog.text


def test_an_explicit_environment_wins(clean_env):
    clean_env.setenv(ingress.ENABLE, "0")
    ingress.prepare_local_cluster(ServiceSettings())
    assert os.environ[ingress.ENABLE] == "0" and ingress.BALANCE not in os.environ
    clean_env.setenv(ingress.ENABLE, "1")
    clean_env.setenv(ingress.BALANCE, "roundrobin")
    ingress.prepare_local_cluster(ServiceSettings(body_timeout_s=2.5))
    assert os.environ[ingress.BALANCE] == "roundrobin" and os.environ[ingress.CLIENT_TIMEOUT] == "8"


def test_build_app_leaves_routing_to_haproxy(clean_env, tmp_path):
    settings = ServiceSettings(store=str(tmp_path), ui=False, num_replicas=2)
    assert build_app(settings)._bound_deployment._deployment_config.request_router_config.request_router_class.endswith("PrimaryFirstRouter")
    clean_env.setenv(ingress.ENABLE, "1")
    routed = build_app(settings)._bound_deployment._deployment_config.request_router_config.request_router_class
    assert "PrimaryFirstRouter" not in routed  # Serve's default, which HAProxy bypasses
    with pytest.raises(ValueError):
        ServiceSettings(ingress="nginx")


def test_side_ports_another_cluster_holds_are_moved(clean_env):
    """A second cluster on the machine (another keepclip serve) would fail to bind HAProxy's stats port, or send its
    fallback traffic to the first one's proxy: a taken side port is replaced by a free one, a set one is left."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        clean_env.setattr(ingress, "SIDE_PORTS", {"RAY_SERVE_HAPROXY_STATS_PORT": busy, "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": busy})
        clean_env.setenv("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "8501")
        moved = ingress.free_side_ports()
    assert list(moved) == ["RAY_SERVE_HAPROXY_STATS_PORT"] and int(moved["RAY_SERVE_HAPROXY_STATS_PORT"]) != busy
    assert ingress.free_side_ports() == {}  # nothing listens there any more: Ray's own default stays
