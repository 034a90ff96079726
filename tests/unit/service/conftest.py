"""Service unit fixtures: a tiny backbone saved as a checkpoint (so every engine loads the same weights and
fingerprint), hand-made colour tasks, and a fresh store per test."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from backbone import PromptedCLIP, load_backbone
from prompts_store import open_store
from service.settings import ServiceSettings
from testkit.tasks import color_images, color_sample, make_color_task, save_checkpoint
from tests.conftest import TINY_CONFIGS, tiny_backbone

TINY_JSON = str(TINY_CONFIGS / "keepclip-tiny-a.json")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    return save_checkpoint(tiny_backbone(), tmp_path_factory.mktemp("tiny") / "tiny-a.safetensors")


@pytest.fixture(scope="session")
def task_maker(tiny_checkpoint) -> PromptedCLIP:
    """A PromptedCLIP on the served weights, to make tasks with `make_color_task(task_maker, name)`."""
    return PromptedCLIP(load_backbone(TINY_JSON, tiny_checkpoint, "cpu"))


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "store")


@pytest.fixture
def settings(tiny_checkpoint, store) -> ServiceSettings:
    return ServiceSettings(
        model=TINY_JSON, pretrained=tiny_checkpoint, device="cpu", store=store.url, ui=False,
        admin_token="s3cret", poll_interval_s=0.05, batch_wait_timeout_s=0.002,
    )


def png(rgb=(220, 30, 30), size=32, seed=5, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(color_images(rgb, 1, size, seed=seed)[0]).save(buf, fmt)
    return buf.getvalue()


def color_png(name: str, seed: int = 5) -> bytes:
    """A PNG drawn from colour task `name`'s image distribution."""
    buf = io.BytesIO()
    Image.fromarray(color_sample(name, 1, seed=seed)[0]).save(buf, "PNG")
    return buf.getvalue()


def publish_colors(store, model, *names, seed=0):
    return {n: store.publish(make_color_task(model, n, seed=seed)) for n in names}
