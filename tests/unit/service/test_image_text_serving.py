"""The engine serves image-text prompt tasks (kind "image-text-prompts") beside residual-prompt tasks: the same
features and classes as the learner's own inference, routed like every kind (the task-identity head only for
artifacts made before they kept a fingerprint),
weights other than 0 and 1 refused, and the ONNX runtime hands such tasks to torch."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from backbone import PixelPipeline, load_backbone
from backbone.token_prompts import TokenPromptConfig, TokenPrompts, class_text
from service.engine import Engine, WeightNotSupported
from service.runtime import TorchRuntime
from testkit.tasks import color_sample, make_color_task, make_image_text_task
from training.image_text_prompts import prompted_images

from .conftest import TINY_JSON


@pytest.fixture(scope="module")
def learned(task_maker):
    torch.manual_seed(0)
    return {name: make_image_text_task(task_maker, name) for name in ("red", "green")}


@pytest.fixture
def engine(settings, store):
    engine = Engine(TorchRuntime.load(settings.model, settings.pretrained, "cpu"), store, settings)
    yield engine
    engine.close()


def pil(name, seed=11):
    return Image.fromarray(color_sample(name, 1, seed=seed)[0])


def reference(task_maker, artifact, image: Image.Image):
    """What the learner's own inference gives for one image: prompted feature and class text."""
    backbone = task_maker.backbone
    prompts = TokenPrompts(backbone.model, backbone.tokenizer, TokenPromptConfig.from_dict(artifact.recipe["prompts"])).load(artifact.prompts)
    pixels = PixelPipeline(backbone.preprocess).pixels(image)[None]
    return prompted_images(backbone, prompts, pixels)[0], class_text(backbone, prompts, artifact.class_names)


def test_an_explicit_task_gets_the_learners_features_and_classes(engine, store, task_maker, learned):
    store.publish(learned["red"])
    assert engine.sync() and engine.state.tasks["red"].kind == "image-text-prompts" and not engine.state.errors
    image = pil("red")
    feature, text = reference(task_maker, learned["red"], image)
    [embedded] = engine.embed_images([engine.preprocess(image)], task="red")
    torch.testing.assert_close(embedded.embedding, feature, atol=1e-5, rtol=1e-5)
    [result] = engine.classify([engine.preprocess(image)], task="red", top_k=2)
    logits = engine.runtime.logit_scale() * feature @ text.T
    assert result.task == "red" and result.gate == 1.0
    assert [s.label for s in result.scores] == [learned["red"].class_names[i] for i in logits.argsort(descending=True)]
    assert result.scores[0].logit == pytest.approx(float(logits.max()), abs=1e-4)
    frozen = engine.runtime.encode_image(engine.preprocess(image)[None])[0]
    assert not torch.allclose(embedded.embedding, frozen)
    assert torch.equal(engine.embed_images([engine.preprocess(image)], task="red", weight=0.0)[0].embedding, frozen)


IDENTITY_STATS = ("class_means", "covariance", "class_counts")  # what an artifact made before the fingerprint holds


def test_image_text_tasks_are_routed_like_every_kind_and_claim_no_unlearned_image(engine, store, task_maker, learned):
    for name in ("red", "green"):
        store.publish(learned[name])
    store.publish(make_color_task(task_maker, "blue"))  # a residual-prompt task
    engine.sync()
    assert engine.state.identity is None and set(engine.state.router.names) == {"red", "green", "blue"}
    batch = [engine.preprocess(pil(name, seed=30 + i)) for i, name in enumerate(["red", "green", "blue", "green", "red"])]
    results = engine.classify(batch)
    assert [r.task for r in results] == ["red", "green", "blue", "green", "red"]
    assert [r.gate for r in results if r.task != "blue"] == [1.0] * 4 and 0 < results[2].gate <= 1  # tokens in full
    explicit = engine.classify(batch[:2], task="red") + engine.classify(batch[1:2], task="green")
    assert results[0].scores == explicit[0].scores and results[1].scores == explicit[2].scores
    # an image of no learned domain: no task claims it, the frozen CLIP answer (issue 16)
    [other] = engine.classify([engine.preprocess(pil("yellow"))])
    assert other.task is None and other.gate == 0.0


def test_artifacts_without_a_fingerprint_go_to_the_identity_heads_pick(engine, store, task_maker, learned):
    for name in ("red", "green"):
        old = learned[name]
        store.publish(dataclasses.replace(old, stats={k: old.stats[k] for k in IDENTITY_STATS}))
    store.publish(make_color_task(task_maker, "blue"))  # a residual-prompt task, routed by the gate first
    engine.sync()
    assert engine.state.identity.names == ("green", "red") and set(engine.state.router.names) == {"blue"}
    batch = [engine.preprocess(pil(name, seed=30 + i)) for i, name in enumerate(["red", "green", "blue", "green", "red"])]
    results = engine.classify(batch)
    assert [r.task for r in results] == ["red", "green", "blue", "green", "red"]
    assert [r.gate for r in results if r.task != "blue"] == [1.0] * 4 and 0 < results[2].gate <= 1
    # the head always names a task: an image of no learned domain gets one of them (why new artifacts keep a fingerprint)
    assert engine.classify([engine.preprocess(pil("yellow"))])[0].task in {"red", "green"}
    # a new identity head only when the image-text tasks change
    head = engine.state.identity
    store.publish(make_color_task(task_maker, "cyan"))
    engine.sync()
    assert engine.state.identity is head


def test_weights_between_0_and_1_are_refused_for_prompt_tokens(engine, store, learned):
    store.publish(learned["red"])
    engine.sync()
    image = engine.preprocess(pil("red"))
    with pytest.raises(WeightNotSupported, match="weight must be 0 or 1, got 0.5"):
        engine.embed_images([image], task="red", weight=0.5)
    with pytest.raises(WeightNotSupported, match="image-text-prompts"):
        engine.embed_texts(["a red thing"], task="red", weight=0.3)
    texts, version = engine.embed_texts(["light red"], task="red")
    assert version == 1 and torch.allclose(texts[0], engine.state.tasks["red"].text_prompted[0], atol=1e-6)


def test_unservable_image_text_artifacts_are_refused_with_the_reason(engine, store, learned):
    good = learned["green"]
    short = dataclasses.replace(good, stats={**good.stats, "class_means": good.stats["class_means"][:1]})
    flat = dataclasses.replace(good, name="flat", stats={**good.stats, "covariance": torch.zeros_like(good.stats["covariance"])})
    for artifact in (short, flat):
        store.publish(artifact)
    engine.sync()
    assert not engine.state.tasks and engine.state.identity is None
    assert "class_means (2, D)" in engine.state.errors["green"] and "positive definite" in engine.state.errors["flat"]


def test_the_onnx_runtime_serves_image_text_tasks_by_torch(tiny_checkpoint, tmp_path, learned):
    from service.runtime_onnx import OnnxRuntime

    onnx = OnnxRuntime(load_backbone(TINY_JSON, tiny_checkpoint, "cpu"), cache_dir=str(tmp_path / "onnx"))
    eager = TorchRuntime(load_backbone(TINY_JSON, tiny_checkpoint, "cpu"))
    artifact = learned["red"]
    config = TokenPromptConfig.from_dict(artifact.recipe["prompts"])
    for runtime in (onnx, eager):
        runtime.load_task("red@v1", artifact.prompts, config)
    assert onnx.served_by_torch("red@v1")
    images = torch.stack([onnx.preprocess(pil(n, seed=5)) for n in ("red", "green", "red")])
    mixed = ["red@v1", None, "red@v1"]
    torch.testing.assert_close(onnx.encode_image(images, mixed, [1.0] * 3), eager.encode_image(images, mixed, [1.0] * 3), atol=1e-4, rtol=1e-4)
    names, templates = artifact.class_names, artifact.templates
    torch.testing.assert_close(onnx.class_text(names, templates, "red@v1"), eager.class_text(names, templates, "red@v1"), atol=1e-5, rtol=1e-5)
    onnx.delete_task("red@v1")
    assert not onnx.served_by_torch("red@v1")
    assert np.isfinite(onnx.encode_image(images).numpy()).all()


def test_over_http_the_task_serves_and_a_fractional_weight_is_a_422(settings, store, learned):
    from fastapi.testclient import TestClient

    from service.api import create_app

    from .conftest import color_png

    store.publish(learned["red"])
    with TestClient(create_app(settings)) as client:
        files = {"file": ("r.png", color_png("red"), "image/png")}
        classified = client.post("/v1/classify", files=files)
        assert classified.status_code == 200 and classified.json()["task"] == "red" and classified.json()["gate"] == 1.0
        refused = client.post("/v1/embed", files=files, data={"task": "red", "weight": "0.5"})
        assert refused.status_code == 422 and "weight must be 0 or 1" in refused.json()["error"]["message"]
        text = client.post("/v1/embed", json={"text": "light red", "task": "red", "weight": 0.25})
        assert text.status_code == 422 and "image-text-prompts" in text.json()["error"]["message"]
        tasks = client.get("/v1/tasks").json()
        assert [t["kind"] for t in tasks["tasks"]] == ["image-text-prompts"]
