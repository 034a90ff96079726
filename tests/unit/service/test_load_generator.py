"""bench.service_speed's load generator (http.client, multipart bodies built from bytes) against the real app, served
by uvicorn on a local port: every image it sends is read as an upload, and refusals count as failures."""
from __future__ import annotations

import pytest

from bench.service_speed import http_load
from service.api import create_app
from testkit.net import served_in_thread

from .conftest import png


@pytest.fixture
def served(settings):
    """The app on 127.0.0.1 (at most 2 images per request) -> its URL."""
    with served_in_thread(create_app(settings.model_copy(update={"max_images_per_request": 2}))) as port:
        yield f"http://127.0.0.1:{port}"


def test_the_load_generator_sends_images_the_service_reads(served):
    images = [png((200, 20, 20)), png((20, 200, 20), fmt="JPEG"), png((20, 20, 200))]
    rate, latencies, failures = http_load(served, images, clients=2, seconds=1.0, per_request=2)
    assert failures == []
    assert latencies and rate == pytest.approx(2 * len(latencies) / 1.0, rel=0.5)


def test_refusals_count_as_failures(served):
    rate, latencies, failures = http_load(served, [png()], clients=1, seconds=0.5, per_request=3)
    assert rate == 0 and latencies == []
    assert failures and all(f.startswith("422: ") and "too_many_images" in f for f in failures)
