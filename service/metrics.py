"""Application metrics in Prometheus format (GET /metrics). Ray Serve exports its own replica metrics separately."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GATE_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


class ServiceMetrics:
    """One registry per app instance, so in-process apps (tests) never collide."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "keepclip_requests", "HTTP requests by endpoint and status", ["endpoint", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "keepclip_request_latency_seconds",
            "HTTP request latency by endpoint and status",
            ["endpoint", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("keepclip_batch_size", "images per dynamic batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_wait = Gauge("keepclip_batch_wait_seconds", "longest wait for more images of a batch formed under "
                                "load, now (auto: the fitted fixed cost of a batch)", registry=r)
        self.routed = Counter("keepclip_routed", "task-agnostic images per routed task ('none' = frozen CLIP)", ["task"], registry=r)
        self.gate = Histogram("keepclip_gate_weight", "gate weight w of the routed task per image", buckets=GATE_BUCKETS, registry=r)
        self.generation = Gauge("keepclip_store_generation", "store generation the replica serves", registry=r)
        self.tasks = Gauge("keepclip_loaded_tasks", "tasks loaded in the replica", registry=r)
        self.refused = Gauge("keepclip_refused_tasks", "tasks whose live version the replica refused (damaged, another "
                             "backbone, unservable): an older version or none serves; /v1/tasks says why", registry=r)

    def watch_batcher(self, batcher) -> None:
        self.batch_wait.set_function(batcher.wait_limit)

    # engine hooks
    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def observe_route(self, task: str | None, weight: float) -> None:
        self.routed.labels(task=task or "none").inc()
        self.gate.observe(weight)

    def observe_state(self, generation: int, tasks: int, refused: int = 0) -> None:
        self.generation.set(generation)
        self.tasks.set(tasks)
        self.refused.set(refused)

    # HTTP hook
    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        labels = dict(endpoint=endpoint, method=method, status=str(status))
        self.requests.labels(**labels).inc()
        self.latency.labels(**labels).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
