"""Task kinds as plug-ins: head tasks are answered from the frozen pass alone, mixed batches still group the prompt
tasks into one prompted pass, `w = 0` is the frozen answer, and a kind registered by a test is served with no change
to the engine."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from backbone import DEFAULT_TEMPLATES, TaskStats, fit_task_stats, image_features, text_classifier
from prompts_store import TaskArtifact
from service.kinds import ServedKind, UnservableTask, register_kind, servable_kinds
from testkit.tasks import color_sample, color_task_data, make_color_task
from training.head_learner import Features, fit_head
from training.settings import HeadSettings


@pytest.fixture
def engine(recording_engine):
    return recording_engine  # its runtime records the tower passes (conftest.RecordingRuntime)


def make_head_task(model, name: str, n: int = 32) -> TaskArtifact:
    """A head task fitted in closed form on a colour task's frozen features (training's own solver)."""
    images, labels, class_names = color_task_data(model, name, n=n)
    features = image_features(model, images)
    labels = torch.as_tensor(labels)
    text = text_classifier(model, class_names).float()
    val = torch.arange(n) % 4 == 0
    fit = fit_head(Features(features[~val], labels[~val]), Features(features[val], labels[val]), text,
                   float(model.logit_scale()), HeadSettings(width=256), len(class_names))
    return TaskArtifact(
        name=name, kind="head", class_names=class_names, backbone=model.backbone.fingerprint.to_dict(),
        templates=list(DEFAULT_TEMPLATES), recipe={"head": fit.head.config()}, prompts=fit.head.to_tensors(),
        stats=fit_task_stats(features, labels).to_tensors(),
    )


def pil(engine, *names, seed=7):
    return [engine.preprocess(Image.fromarray(color_sample(n, 1, seed=seed + 2 * i)[0])) for i, n in enumerate(names)]


def test_head_tasks_are_answered_from_the_frozen_pass_alone(engine, store, task_maker):
    store.publish(make_head_task(task_maker, "red"))
    store.publish(make_head_task(task_maker, "green"))
    engine.sync()
    assert {t.kind for t in engine.state.tasks.values()} == {"head"} and all(t.slot is None for t in engine.state.tasks.values())
    results = engine.classify(pil(engine, "red", "green", "blue", "red"))
    assert [r.task for r in results] == ["red", "green", None, "red"]
    assert engine.runtime.passes == [None]  # one tower pass: the frozen one that routing needed
    # the answer is the head's fused logits at the gate's weight
    head_task = engine.state.tasks["red"]
    image = pil(engine, "red")[0][None]
    frozen = engine.runtime.encode_image(image)
    expected = head_task.served.logits(frozen, frozen, torch.tensor([results[0].gate]))[0]
    assert results[0].scores[0].logit == pytest.approx(float(expected.max()), abs=1e-5)


def test_mixed_batches_group_the_prompt_tasks_into_one_prompted_pass(engine, store, task_maker):
    store.publish(make_head_task(task_maker, "red"))
    store.publish(make_color_task(task_maker, "green"))  # residual prompts
    engine.sync()
    results = engine.classify(pil(engine, "red", "green", "green", "red"))
    assert [r.task for r in results] == ["red", "green", "green", "red"]
    green = engine.state.tasks["green"].slot
    assert engine.runtime.passes == [None, [green, green]]  # the frozen pass, then one prompted pass for the prompt task


def test_head_at_weight_zero_is_the_frozen_answer_bit_for_bit(task_maker):
    artifact = make_head_task(task_maker, "red")
    from backbone.analytic_head import AnalyticHead

    head = AnalyticHead.from_parts(artifact.prompts, artifact.recipe["head"], 2)
    frozen = F.normalize(torch.randn(5, head.features.dim), dim=-1)
    zero_shot = torch.randn(5, 2)
    out = head.logits(frozen, zero_shot, torch.tensor([0.0, 1.0, 0.0, 0.3, 0.0]))
    assert torch.equal(out[[0, 2, 4]], zero_shot[[0, 2, 4]])
    assert not torch.equal(out[1], zero_shot[1])


def test_a_head_with_a_damaged_config_is_refused_with_the_reason(engine, store, task_maker):
    artifact = make_head_task(task_maker, "red")
    artifact.recipe["head"]["projection_sha256"] = "0" * 64
    store.publish(artifact)
    engine.sync()
    assert "red" not in engine.state.tasks and "random projection" in engine.state.errors["red"]
    bad = make_head_task(task_maker, "green")
    bad.prompts["head.weights"] = bad.prompts["head.weights"][:, :1]
    store.publish(bad)
    engine.sync()
    assert "do not match" in engine.state.errors["green"]


def test_a_kind_registered_by_a_test_is_served_without_touching_the_engine(engine, store, task_maker):
    @register_kind("test-nearest-mean")
    def load_nearest_mean(artifact, runtime, slot):
        means = F.normalize(artifact.prompts["class_means"].float(), dim=-1)
        stats = TaskStats.from_tensors(artifact.stats)
        text = runtime.class_text(artifact.class_names, artifact.templates)
        return ServedKind(text, text, lambda features, frozen, weights: 100.0 * frozen @ means.T, stats=stats)

    assert "test-nearest-mean" in servable_kinds()
    images, labels, names = color_task_data(task_maker, "red")
    features = image_features(task_maker, images)
    means = torch.stack([features[torch.as_tensor(labels) == c].mean(0) for c in range(2)])
    store.publish(TaskArtifact(
        name="red", kind="test-nearest-mean", class_names=names, backbone=task_maker.backbone.fingerprint.to_dict(),
        templates=list(DEFAULT_TEMPLATES), prompts={"class_means": means}, stats=fit_task_stats(features, torch.as_tensor(labels)).to_tensors(),
    ))
    engine.sync()
    [result] = engine.classify(pil(engine, "red"))
    assert result.task == "red" and result.scores[0].label in names
    frozen = engine.runtime.encode_image(pil(engine, "red")[0][None])
    expected = names[int((frozen @ F.normalize(means, dim=-1).T).argmax())]
    assert result.scores[0].label == expected


def test_an_unknown_kind_is_refused_by_name(engine, store, task_maker):
    artifact = make_color_task(task_maker, "red")
    artifact.kind = "no-such-kind"
    store.publish(artifact)
    engine.sync()
    assert "'no-such-kind' is not servable" in engine.state.errors["red"]
    with pytest.raises(UnservableTask):
        from service.kinds import load_kind

        load_kind(artifact, engine.runtime, "x")
