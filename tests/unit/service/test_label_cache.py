"""Open-vocabulary label text is cached per (prompt slot, weight, label), bounded: a repeated request does no new
text-tower work, a new weight or a new task version computes afresh, and the cache never outgrows its bound."""
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import service.engine as engine_module
from service.api import create_app
from service.engine import Engine
from service.runtime import TorchRuntime
from testkit.tasks import color_sample, make_color_task
from tests.unit.service.conftest import color_png

LABELS = [f"label number {i}" for i in range(256)]


class CountingRuntime(TorchRuntime):
    """The real torch runtime, recording every class-text computation: (prompt slot, weight, number of labels)."""

    def __init__(self, backbone):
        super().__init__(backbone)
        self.text_calls: list[tuple[str | None, float, int]] = []

    def class_text(self, class_names, templates, task=None, weight=1.0):
        self.text_calls.append((task, float(weight), len(class_names)))
        return super().class_text(class_names, templates, task, weight)


@pytest.fixture
def engine(settings, store, task_maker):
    store.publish(make_color_task(task_maker, "red"))
    engine = Engine(CountingRuntime(TorchRuntime.load(settings.model, settings.pretrained, "cpu").backbone), store, settings)
    engine.sync()
    engine.runtime.text_calls.clear()  # the task's own class text, computed at load
    yield engine
    engine.close()


def image(engine, name: str, seed: int = 7) -> torch.Tensor:
    return engine.preprocess(Image.fromarray(color_sample(name, 1, seed=seed)[0]))


def test_a_repeated_request_over_http_does_no_new_text_work(engine, settings):
    body = {"labels": ",".join(LABELS), "top_k": "3"}
    with TestClient(create_app(settings, engine=engine)) as client:  # max_labels: 256 by default
        first = client.post("/v1/classify", files={"file": ("r.png", color_png("red"), "image/png")}, data=body).json()
        assert first["task"] == "red" and first["gate"] > 0  # routed: the task's prompts apply to the label text
        # the frozen text first, off the batch (Engine.encode_labels), then the routed task's prompted text in it
        calls = [(None, 1.0, 256), (engine.state.tasks["red"].slot, first["gate"], 256)]
        assert engine.runtime.text_calls == calls
        second = client.post("/v1/classify", files={"file": ("r.png", color_png("red"), "image/png")}, data=body).json()
    assert engine.runtime.text_calls == calls  # no new call
    assert second == first


def test_cached_rows_equal_fresh_ones_and_each_weight_and_the_frozen_text_have_their_own(engine):
    red, blue = image(engine, "red"), image(engine, "blue")
    [routed] = engine.classify([red], labels=LABELS[:4], top_k=4)
    [again] = engine.classify([red], labels=LABELS[:4], top_k=4)
    slot = engine.state.tasks["red"].slot
    assert engine.runtime.text_calls == [(slot, routed.gate, 4)]
    fresh = engine.runtime.class_text(LABELS[:4], engine_module.DEFAULT_TEMPLATES, task=slot, weight=routed.gate)
    assert torch.allclose(engine._label_text(tuple(LABELS[:4]), slot, routed.gate), fresh, atol=1e-6)
    assert [(s.label, s.score) for s in again.scores] == [(s.label, s.score) for s in routed.scores]
    engine.runtime.text_calls.clear()
    engine._label_text(tuple(LABELS[:4]), slot, routed.gate / 2)  # the prompts at another weight: other features
    assert engine.runtime.text_calls == [(slot, routed.gate / 2, 4)]
    [frozen] = engine.classify([blue], labels=LABELS[:4])
    assert frozen.task is None and engine.runtime.text_calls[-1] == (None, 1.0, 4)
    engine.classify([blue], labels=LABELS[2:6])  # two rows cached, two new
    assert engine.runtime.text_calls[-1] == (None, 1.0, 2)


def test_a_new_task_version_computes_afresh(engine, store, task_maker):
    red = image(engine, "red")
    engine.classify([red], labels=LABELS[:3])
    old_slot = engine.state.tasks["red"].slot
    store.publish(make_color_task(task_maker, "red", seed=1))
    engine.sync()
    engine.runtime.text_calls.clear()
    [result] = engine.classify([red], labels=LABELS[:3])
    new_slot = engine.state.tasks["red"].slot
    assert result.version == 2 and new_slot != old_slot
    assert [call[0] for call in engine.runtime.text_calls if call[2] == 3] == [new_slot]


def test_the_cache_is_bounded_and_a_request_larger_than_it_still_works(engine, monkeypatch):
    monkeypatch.setattr(engine_module, "LABEL_CACHE_SIZE", 8)
    blue = image(engine, "blue")
    [result] = engine.classify([blue], labels=LABELS[:20], top_k=20)
    assert len(result.scores) == 20 and len(engine._label_cache) == 8
    engine.classify([blue], labels=LABELS[12:20])  # the 8 most recent rows are the ones kept
    assert engine.runtime.text_calls[-1] == (None, 1.0, 20)
