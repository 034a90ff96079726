"""Service unit fixtures: a tiny backbone saved as a checkpoint (so every engine loads the same weights and
fingerprint), hand-made colour tasks, a fresh store per test, and an engine whose runtime records its tower passes."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from backbone import PromptedCLIP, load_backbone
from prompts_store import open_store
from service.engine import Engine
from service.runtime import TorchRuntime
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


class RecordingRuntime(TorchRuntime):
    """The real torch runtime, recording its image-tower passes: `passes` (None for a frozen pass, else the tasks of
    a prompted one) and `resumed_at` (the block each prompted pass started at, None for the whole tower)."""

    def __init__(self, backbone):
        super().__init__(backbone)
        self.passes: list[list[str] | None] = []
        self.resumed_at: list[int | None] = []

    def encode_frozen(self, images):
        self.passes.append(None)
        return super().encode_frozen(images)

    def encode_image(self, images, tasks=None, weights=None, resume=None):
        self.passes.append(None if tasks is None else list(tasks))
        if tasks is not None:
            self.resumed_at.append(None if resume is None else resume.block)
        return super().encode_image(images, tasks, weights, resume)


@pytest.fixture
def recording_engine(settings, store):
    engine = Engine(RecordingRuntime(TorchRuntime.load(settings.model, settings.pretrained, "cpu").backbone), store, settings)
    yield engine
    engine.close()


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
