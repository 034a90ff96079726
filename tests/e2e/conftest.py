"""End-to-end fixtures: one Serve HTTP proxy per session on the shared `ray_cluster`, and one keepclip application
on it (tiny backbone saved as a checkpoint, a local store with two hand-made colour tasks, UI on).

Generic on purpose: other e2e modules may use `ray_cluster` without any of this."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_CONFIGS, free_port, tiny_backbone

TINY_JSON = str(TINY_CONFIGS / "keepclip-tiny-a.json")
ADMIN_TOKEN = "e2e-admin-token"
APP_NAME = "keepclip"


@dataclass
class LiveService:
    url: str
    settings: object  # ServiceSettings
    store: object  # TaskStore
    maker: object  # PromptedCLIP on the served weights, to make tasks
    token: str = ADMIN_TOKEN

    def deploy(self) -> float:
        """(Re)deploy the application; returns seconds until /healthz answered."""
        from ray import serve

        from service.app import build_app

        start = time.monotonic()
        serve.run(build_app(self.settings), name=APP_NAME, route_prefix="/")
        wait_healthy(self.url)
        return time.monotonic() - start

    def restart(self) -> float:
        from ray import serve

        serve.delete(APP_NAME)
        return self.deploy()


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy")


@pytest.fixture(scope="session")
def serve_http(ray_cluster):
    """Serve's HTTP ingress (the service's default: HAProxy) on a free local port, once per session."""
    from ray import serve

    from service.ingress import http_options
    from service.settings import ServiceSettings

    port = free_port()
    serve.start(http_options=http_options(ServiceSettings(), host="127.0.0.1", port=port))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def keepclip_service(serve_http, tmp_path_factory) -> LiveService:
    from backbone import PromptedCLIP, load_backbone
    from prompts_store import open_store
    from service.settings import ServiceSettings
    from testkit.tasks import make_color_task, save_checkpoint

    root: Path = tmp_path_factory.mktemp("keepclip-e2e")
    checkpoint = save_checkpoint(tiny_backbone(), root / "tiny-a.safetensors")
    maker = PromptedCLIP(load_backbone(TINY_JSON, checkpoint, "cpu"))
    store = open_store(root / "store")
    for name in ("red", "green"):
        store.publish(make_color_task(maker, name))
    settings = ServiceSettings(
        model=TINY_JSON, pretrained=checkpoint, device="cpu", store=str(root / "store"), admin_token=ADMIN_TOKEN,
        poll_interval_s=0.1, batch_wait_timeout_s=0.005, max_body_bytes=256 * 1024, max_image_pixels=512 * 512,
        max_labels=8, torch_threads=2, ui=True,
    )
    service = LiveService(url=serve_http, settings=settings, store=store, maker=maker)
    service.deploy()
    yield service
    from ray import serve

    serve.delete(APP_NAME)
