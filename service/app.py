"""The Ray Serve application: one ingress deployment that owns the engine, batches with `service.batching.MicroBatcher`
(continuous batching rather than `@serve.batch`: see service/batching.py), and builds its FastAPI + Gradio app on the
replica (`__serve_build_asgi_app__`; a mounted Gradio app cannot be pickled).

    from service.app import build_app
    serve.run(build_app(ServiceSettings(store="./keepclip-store")), name="keepclip", route_prefix="/")

or, from a Serve config file (also KubeRay's `serveConfigV2`; see service/serve_config.yaml):

    applications:
      - name: keepclip
        route_prefix: /
        import_path: service.app:app_builder
        args: {store: s3://bucket/keepclip-store, model: ViT-B-16, pretrained: openai}
        deployments:
          - name: KeepclipDeployment
            user_config: {max_batch_size: 16, batch_wait_timeout_s: null, gate_threshold: 0.01}

Updates to tasks never go through `serve.run`/`serve deploy` (which restart replicas): every replica follows the
store's change feed itself. Runtime knobs (batch size and wait, gate threshold, router top-k, poll interval) arrive
through `user_config` -> `reconfigure` without a restart.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .ingress import haproxy_on, http_options, port_in_use, prepare_local_cluster
from .settings import RUNTIME_KNOBS, ServiceSettings

log = logging.getLogger(__name__)


@serve.deployment(name="KeepclipDeployment", health_check_period_s=5, graceful_shutdown_timeout_s=10)
@serve.ingress()
class KeepclipDeployment:
    def __init__(self, settings: ServiceSettings):
        import torch

        from .batching import engine_batcher, engine_executor
        from .engine import Engine
        from .metrics import ServiceMetrics

        logging.getLogger("service").setLevel(logging.INFO)
        threads = replica_torch_threads(settings)
        if threads:
            torch.set_num_threads(threads)  # before the engine: ONNX Runtime takes torch's count too
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.engine = Engine.from_settings(settings, metrics=self.metrics).start()
        self.executor = engine_executor(settings)
        self.batcher = engine_batcher(self.engine, settings, self.executor)
        log.info("keepclip replica up: %s, store %s, %d tasks, %d torch threads", self.engine.fingerprint["name"],
                 settings.store, len(self.engine.state.tasks), torch.get_num_threads())

    def __serve_build_asgi_app__(self):
        from .api import create_app
        from .limits import SlowClientGuard, UiRequestCap

        app = create_app(self.settings, engine=self.engine, batcher=self.batcher, executor=self.executor, metrics=self.metrics)
        if self.settings.ui:  # never-ending UI streams may hold only some of the replica's slots
            app.add_middleware(UiRequestCap, max_requests=self.settings.ui_max_requests)
        # outermost: Serve hands over a request before its body arrives, so a slow sender holds a replica slot
        app.add_middleware(SlowClientGuard, body_timeout_s=self.settings.body_timeout_s, max_body_reads=self.settings.max_body_reads)
        return app

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Runtime knobs from the Serve config's `user_config` (see settings.RUNTIME_KNOBS); no restart."""
        unknown = set(user_config or {}) - set(RUNTIME_KNOBS)
        if unknown:
            raise ValueError(f"unknown user_config keys {sorted(unknown)}; known: {list(RUNTIME_KNOBS)}")
        # null leaves a knob as it is, except the batch wait, where it means auto
        knobs = {k: v for k, v in (user_config or {}).items() if v is not None or k == "batch_wait_timeout_s"}
        if "max_batch_size" in knobs:
            self.batcher.set_max_batch_size(int(knobs["max_batch_size"]))
        if "batch_wait_timeout_s" in knobs:
            wait = knobs["batch_wait_timeout_s"]
            self.batcher.set_batch_wait_timeout_s(None if wait is None else float(wait))
        self.engine.reconfigure(**knobs)
        self.settings = self.settings.model_copy(update=knobs)
        log.info("reconfigured: %s", knobs)

    def check_health(self) -> None:
        if not self.engine.polling:
            raise RuntimeError("the store poller thread is not running")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


class PrimaryFirstRouter(FIFOMixin, RequestRouter):
    """`replica_routing: primary`: every request goes to one replica (the primary) while it is up and has a free slot;
    the others are hot standbys. What lives in a replica's memory (the gallery) then behaves as with one replica,
    and when the primary dies its in-flight requests fail but the next ones go to a standby at once, which stays
    primary (sticky: the restarted replica comes back empty and becomes a standby)."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._primary: ReplicaID | None = None

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        if not by_id:
            return []
        if self._primary not in by_id:
            self._primary = min(by_id, key=lambda rid: rid.unique_id)  # the same first choice in every proxy
        return [[by_id[self._primary]], [r for rid, r in by_id.items() if rid != self._primary]]  # ranks


def replica_torch_threads(settings: ServiceSettings) -> int | None:
    """torch intra-op threads of a replica: `torch_threads` when set; else 1 on CPU, so that the replica's other
    work (Serve's proxy, HTTP and multipart parsing, image decoding, which run beside each batch) keeps a core instead
    of waiting behind the model's threads; else (GPU) torch's default."""
    if settings.torch_threads:
        return settings.torch_threads
    from backbone.loading import resolve_device

    return 1 if resolve_device(settings.device).type == "cpu" else None


def resolve_replicas(settings: ServiceSettings) -> int:
    """`num_replicas`, with 0 ('auto') resolved: 2 when the Ray cluster has the CPUs and GPUs for two replicas,
    else 1. Without a running Ray (building the app in a test), 1."""
    if settings.num_replicas:
        return settings.num_replicas
    import ray

    if not ray.is_initialized():
        return 1
    total = ray.cluster_resources()
    fits = total.get("CPU", 0) >= 2 * settings.replica_cpus and total.get("GPU", 0) >= 2 * settings.replica_gpus
    return 2 if fits else 1


def build_app(args: ServiceSettings) -> Application:
    """The typed app builder: settings -> a bound Serve application (one ingress deployment)."""
    options: dict[str, Any] = {
        "num_replicas": resolve_replicas(args),
        "max_ongoing_requests": max(args.max_ongoing_requests, 2 * args.max_batch_size),
        "ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
        "user_config": args.runtime_config(),
        # the access log is written at INFO: asking for it asks for that level
        "logging_config": {"enable_access_log": args.access_log, "log_level": "INFO" if args.access_log else args.ray_log_level},
    }
    if args.malloc_arena_max:  # glibc reads it when the process starts: the replica's own worker gets it
        options["ray_actor_options"]["runtime_env"] = {"env_vars": {"MALLOC_ARENA_MAX": str(args.malloc_arena_max)}}
    if args.replica_routing == "primary" and not haproxy_on():  # under HAProxy: its balance algorithm `first`
        options["request_router_config"] = RequestRouterConfig(request_router_class=PrimaryFirstRouter)
    return KeepclipDeployment.options(**options).bind(args)


def app_builder(args: dict[str, Any]) -> Application:
    """`import_path: service.app:app_builder` for `serve run`/`serve deploy`/KubeRay; `args` are ServiceSettings
    fields (KEEPCLIP_* environment variables and KEEPCLIP_SETTINGS_FILE fill in the rest)."""
    args = dict(args or {})
    file = args.pop("settings_file", None)
    unknown = sorted(set(args) - set(ServiceSettings.model_fields))
    if unknown:  # a typo in a Serve config would otherwise be dropped silently (the settings ignore extra keys)
        raise ValueError(f"unknown keepclip settings in the Serve config args: {unknown}; known: {sorted(ServiceSettings.model_fields)}")
    return build_app(ServiceSettings.load(file=file, **args))


# ----------------------------------------------------------------------------- `keepclip serve`
def run_service(settings: ServiceSettings, address: str | None = None, blocking: bool = True, ready_timeout_s: float = 300) -> str:
    """Start (or join, with `address`) a Ray cluster, start Serve's HTTP proxy on settings.host:port, run the app.

    Blocking: waits until Ctrl-C/SIGTERM, then deletes the app (and shuts Serve and Ray down if this call started
    them). Returns the base URL.
    """
    import ray

    from backbone.loading import check_backbone

    logging.getLogger("ray.serve").setLevel(settings.ray_log_level)  # this process's Serve client
    joins = ray.is_initialized() or address is not None
    if not joins:  # a cluster keepclip starts here: what would make it fail later is refused now
        check_port_free(settings.host, settings.port)
        check_backbone(settings.model, settings.pretrained)
        prepare_local_cluster(settings)
    url = f"http://{settings.host}:{settings.port}{settings.route_prefix.rstrip('/')}"
    if not blocking:
        _start_app(settings, address, url, ready_timeout_s)
        return url
    try:
        _start_app(settings, address, url, ready_timeout_s)
        _serve_until_stopped(settings, url)
    except KeyboardInterrupt:  # Ctrl-C before the service was ready (or just then): stop as cleanly as after
        print("interrupted", flush=True)
    finally:
        print("stopping keepclip ...", flush=True)
        _stop(settings.app_name, started_ray=not joins)
    return url


def _stop(app_name: str, started_ray: bool) -> None:
    """Delete the app, and Serve and Ray where this process started them. Also after a failed start, so a failure
    to stop is logged rather than raised over the error that brought us here."""
    import ray

    try:
        if ray.is_initialized():  # not when stopped in ray.init: serve.delete would start a cluster of its own
            serve.delete(app_name)
            if started_ray:
                serve.shutdown()
    except Exception as e:  # e.g. Serve never started
        log.warning("stopping Serve: %s", e)
    finally:
        if started_ray:
            ray.shutdown()


def _start_app(settings: ServiceSettings, address: str | None, url: str, ready_timeout_s: float) -> None:
    import ray

    if not ray.is_initialized():
        with _interrupts_deferred():
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options=http_options(settings), logging_config={"log_level": settings.ray_log_level})
    serve.run(build_app(settings), name=settings.app_name, route_prefix=settings.route_prefix, blocking=False)
    _wait_ready(url, ready_timeout_s)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """A Ctrl-C inside ray.init can leave the node's processes started but not yet known to ray.shutdown (seen: its
    agents ran on after the stop): it takes effect once the block is done (a few seconds)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _serve_until_stopped(settings: ServiceSettings, url: str) -> None:
    """Until Ctrl-C/SIGTERM (turned into an event, so that a signal cannot land in the middle of the stop)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        front = "HAProxy" if haproxy_on() else "Serve's proxy"
        print(f"keepclip serving on {url} through {front}  (API docs {url}/docs, UI {url}/ui)  — Ctrl-C to stop", flush=True)
        _watch_ingress(settings.host, settings.port, front, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_port_free(host: str, port: int) -> None:
    """Before starting a local cluster: something already listening on the port would take the requests meant for
    this one (seen: a Ray HAProxy that outlived a cluster stopped with `ray stop --force`, answering 500 to all)."""
    if port_in_use(host, port):
        raise ConnectionError(
            f"{host}:{port} is in use: another keepclip serve or Ray Serve, or the HAProxy of a Ray cluster that was "
            "killed (`pgrep -af haproxy`); stop it or choose another --port")


class IngressGone(RuntimeError):
    """Nothing listens on the service's port any more: a dead process that looks alive helps nobody."""


def _watch_ingress(host: str, port: int, front: str, stop: threading.Event, every_s: float = 5, gone_after_s: float = 120) -> None:
    """Until `stop`: is something still listening on host:port? Serve's controller restarts a dead HAProxy (measured:
    ~30 s) or proxy; where that fails (e.g. another process took a port it needs), nothing answers while the replicas
    live on. After `gone_after_s` of refused connections, give up loudly (exit 1), for a supervisor to start keepclip
    again. Only a refusal counts: a slow or full server still accepts connections."""
    target = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    refused_since = None
    while not stop.wait(every_s):
        try:
            socket.create_connection((target, port), timeout=2).close()
            refused_since = None
        except ConnectionRefusedError:
            refused_since = refused_since or time.monotonic()
            if time.monotonic() - refused_since >= gone_after_s:
                raise IngressGone(f"nothing has listened on {target}:{port} for {gone_after_s:.0f} s ({front} stopped); "
                                  "keepclip stops, so that whatever supervises it can start it again") from None
        except OSError:  # a timeout or an unreachable host: busy or a network hiccup, not gone
            pass


def _wait_ready(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"keepclip did not answer {url}/healthz within {timeout_s:.0f} s")
        time.sleep(0.25)
